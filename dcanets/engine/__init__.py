"""The one training engine: a ``TrainConfig`` in, metrics (and checkpoints) out.

``dcanets train``, every Ray Tune trial and every reproduction under ``benchmarks/`` call
``train(TrainConfig(...))``.
"""
from typing import TYPE_CHECKING, Any

from dcanets.engine.config import TrainConfig

if TYPE_CHECKING:
    from dcanets.engine.loop import train


def __getattr__(name: str) -> Any:
    """``train`` on first use: ``TrainConfig`` alone (the commands' flags, the tune schema) needs no torch."""
    if name == "train":
        from dcanets.engine.loop import train

        return train
    raise AttributeError(f"module 'dcanets.engine' has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
