"""Which trials' checkpoints a search keeps: the ``checkpoints:`` section and the ranking behind it.

Why: every trial reports a checkpoint each epoch (what a retried or resumed trial continues
from), and a search of thousands of trials kept one per trial (~205 MB each for a negnet50).
Only the last checkpoints of the best ``keep_best`` ended trials stay, ranked as the search's
report ranks them (:meth:`dcanets.tune.state.SearchResult.ranked`: the best value of the search
metric over the trial's epochs, the last report of an epoch counting, a diverged trial never
ranked), so the best model export (``best_model/``) and a retrain or ``--resume`` of a top trial
find theirs. This module decides; :mod:`dcanets.tune.checkpoints` deletes, once Ray's experiment
snapshot no longer needs the folder. Ray-free: the schema imports it.
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from dcanets.engine.divergence import diverged
from dcanets.tune.state import is_finite
from dcanets.validation import Count

KEEP_BEST = 5  # the default: the rows of the report's table (--top 5)


class Checkpoints(BaseModel):
    """The ``checkpoints:`` section of a search file."""

    model_config = ConfigDict(extra="forbid")
    keep_best: Optional[Count] = Field(
        KEEP_BEST, description="ended trials whose last checkpoint is kept: the best N by the search metric "
                               "(null: every trial's); running and interrupted trials keep their latest")


class Ranking:
    """The search metric of the running trials (per epoch, the last report winning) and the ended
    trials whose checkpoints are kept, best first. ``end`` says which checkpoints leave the kept set."""

    def __init__(self, metric: str, mode: str, keep: Optional[int]) -> None:
        self.metric, self.sign, self.keep = metric, (-1.0 if mode == "max" else 1.0), keep
        self.epochs: Dict[str, Dict[Any, Tuple[Optional[float], bool]]] = {}  # running: epoch -> (value, diverged)
        # ended and kept: (signed score, position in the search's trial list, trial id, checkpoint), best
        # first; ties go to the earlier trial, as in the report (a stable sort of the trials in order)
        self.kept: List[Tuple[float, int, str, str]] = []

    def observe(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """A trial's result (one epoch): its metric value and whether it diverged."""
        value: Any = result.get(self.metric)
        self.epochs.setdefault(trial_id, {})[result.get("epoch")] = (float(value) if is_finite(value) else None,
                                                                      diverged(result))

    def score(self, trial_id: str, errored: bool = False) -> Optional[float]:
        """The trial's best value, signed so that lower is better; None when it is never ranked: no
        finite value, or a completed trial that diverged (a crashed one is ranked by its values)."""
        rows = self.epochs.get(trial_id, {}).values()
        values = [self.sign * v for v, _ in rows if v is not None]
        if not values or (not errored and any(d for _, d in rows)):
            return None
        return min(values)

    def end(self, trial_id: str, checkpoint: Optional[str], order: int, errored: bool = False) -> List[str]:
        """The trial ``order``-th in the search ended (``errored``: it crashed): the checkpoints no
        longer kept."""
        score = self.score(trial_id, errored)
        self.epochs.pop(trial_id, None)
        if checkpoint is None:
            return []
        if score is None:
            return [checkpoint]
        bisect.insort(self.kept, (score, order, trial_id, checkpoint))
        if self.keep is None or len(self.kept) <= self.keep:
            return []
        dropped, self.kept = self.kept[self.keep:], self.kept[:self.keep]
        return [path for *_, path in dropped]

    def kept_trials(self) -> List[str]:
        return [trial_id for _, _, trial_id, _ in self.kept]

    def state(self) -> Dict[str, Any]:
        return {"epochs": {t: list(e.items()) for t, e in self.epochs.items()}, "kept": [list(k) for k in self.kept]}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.epochs = {t: {epoch: tuple(v) for epoch, v in rows} for t, rows in state.get("epochs", {}).items()}
        self.kept = sorted(tuple(k) for k in state.get("kept", []))


__all__ = ["KEEP_BEST", "Checkpoints", "Ranking"]
