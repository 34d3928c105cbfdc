"""``TrainConfig``: everything one training run depends on, and its validation.

A ``dcanets train`` run, a Ray Tune trial and a reproduction are each one of these, handed to
``dcanets.engine.loop.train``. The CLI flags and the tune YAML's ``train:`` section are both
generated from, or checked against, this one definition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class TrainConfig:
    """Everything one training run depends on; a tuner trial is one of these."""

    model: str = "cifar_resnet20"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # num_classes/in_chans come from the data
    data: str = "digits"              # digits | synthetic[:N] | image-folder dir or .tar | torchvision dir
    eval_data: Optional[str] = None   # held-out image-folder dir/tar, evaluated at the end
    val_fraction: float = 0.1
    split_seed: Optional[int] = None  # seed of the train/validation split (None: ``seed``)
    limit: Optional[int] = None       # use at most this many training images (quick runs)
    val_limit: Optional[int] = None   # at most this many validation images (None: in proportion to limit)
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)  # to create_optimizer_v2, e.g. rho, lam
    sched: str = "cosine"             # cosine | step | none
    warmup_epochs: float = 0.0        # linear lr warm-up from ~0, then the schedule over the rest
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # mixed precision, CUDA only
    augment: Optional[bool] = None    # None: crop+flip for RGB data, none for 1-channel data
    output: Optional[str] = None      # directory for last.pt and metrics.json

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """A config from a mapping (a YAML file, a tuner sample); unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown training config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.sched not in ("cosine", "step", "none"):
            raise ValueError(f"unknown schedule '{self.sched}'; use cosine, step or none")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
