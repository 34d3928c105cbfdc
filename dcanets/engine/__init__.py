"""The one training engine: a ``TrainConfig`` in, metrics (and checkpoints) out.

``dcanets train``, every Ray Tune trial and every reproduction under ``benchmarks/`` call
``train(TrainConfig(...))``.
"""
from dcanets.engine.config import TrainConfig
from dcanets.engine.loop import train

__all__ = ["TrainConfig", "train"]
