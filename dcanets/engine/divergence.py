"""A diverged run: its training loss became NaN or infinite, and what a user is told about it.

The engine stops such a run after that epoch (more epochs would only burn a search's budget) and
sets ``diverged: true`` in its final metrics. That is a failure, never a success: ``dcanets train``
exits 1 with :func:`describe`'s line, and a search marks the trial DIVERGED (its table, trials.csv,
MLflow: status FAILED with the tags :data:`TAGS`), keeps it out of the ranking, and goes on.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

TAG, REASON = "diverged", "failure_reason"  # MLflow tags of a diverged trial's run


def diverged(metrics: Mapping[str, Any]) -> bool:
    """True when the epoch ``metrics`` (a history entry or a Tune result) has a non-finite train loss."""
    loss = metrics.get("train_loss")
    return isinstance(loss, (int, float)) and not math.isfinite(loss)


def first_diverged(history: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The first epoch of ``history`` whose train loss is not finite, or None."""
    return next((m for m in history if diverged(m)), None)


def describe(metrics: Mapping[str, Any]) -> str:
    """``diverged at epoch 3: train_loss nan``."""
    return f"diverged at epoch {metrics.get('epoch', '?')}: train_loss {metrics.get('train_loss')}"


def tags(metrics: Mapping[str, Any]) -> Dict[str, str]:
    """The MLflow tags of a diverged trial's run."""
    return {TAG: "true", REASON: describe(metrics)}


__all__ = ["REASON", "TAG", "describe", "diverged", "first_diverged", "tags"]
