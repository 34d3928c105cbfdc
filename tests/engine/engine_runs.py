"""What several engine tests do with a run: compare histories, interrupt and resume.

A plain module beside the tests (pytest puts this folder on ``sys.path``; ``tests`` is no package).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from dcanets.engine import TrainConfig, train

TIMING = {"epoch_seconds", "images_per_s", "data_seconds", "train_seconds", "wall_seconds", "checkpoint"}


def numbers(history: List[Dict[str, Any]], drop: Optional[str] = None) -> List[Dict[str, Any]]:
    """The history without wall-clock fields (and without keys starting with ``drop``)."""
    return [{k: v for k, v in m.items() if k not in TIMING and not (drop and k.startswith(drop))} for m in history]


def interrupted_then_resumed(cfg: TrainConfig, at_epoch: int = 2) -> Dict[str, Any]:
    """Train ``cfg`` (which has an ``output``), stop it by KeyboardInterrupt after ``at_epoch``, resume it."""
    def crash(m: Dict[str, Any]) -> None:
        if m["epoch"] == at_epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=crash)
    assert cfg.output is not None
    return train(cfg, resume=Path(cfg.output))


class CodeRunningPayload:
    """What a crafted file carries: unpickling it would call ``os.system`` and create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        import os

        return os.system, (f"touch {self.marker}",)
