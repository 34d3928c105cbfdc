"""``TrainConfig``: everything one training run depends on, and its validation.

A ``dcanets train`` run, a Ray Tune trial and a reproduction are each one of these, handed to
``dcanets.engine.train``. This pydantic model is the one place for each field's type, default,
help text and checks: the ``dcanets train`` flags are generated from it, the tune YAML's
``train:`` section and sampled values are validated by it, and ``dcanets tune --schema`` exports it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from typing_extensions import Annotated, TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

from dcanets.validation import (
    Count,
    Integer,
    NonNegative,
    Number,
    PathText,
    Positive,
    Problem,
    fail,
    format_problems,
    plain,
    problems_of,
    unknown_key,
)

UNKNOWN = ("not a TrainConfig field", "valid keys")  # how an unknown key is reported


class ConfigError(ValueError):
    """Invalid ``TrainConfig`` values: one line for a CLI, ``problems`` for a caller that adds a
    prefix (the tune schema reports ``train.lr: must be > 0, got 0``)."""

    def __init__(self, problems: List[Problem]) -> None:
        super().__init__(format_problems(problems))
        self.problems = problems


class OptKwargs(TypedDict, total=False):
    """Extra optimizer kwargs. The DC decompositions' two are checked (paper 000): a wrong sign
    would otherwise surface as a silent divergence; any other key passes through."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    rho: Annotated[NonNegative, Field(description="DC decomposition: rho >= 0 convexifies")]
    lam: Annotated[Positive, Field(description="DC decomposition: lam > 0 weights the L2 term")]


class TrainConfig(BaseModel):
    """Everything one training run depends on; a tuner trial is one of these."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), title="TrainConfig")

    model: str = Field("cifar_resnet20", description="timm model name")
    model_kwargs: Dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model kwargs (num_classes/in_chans come from the data)")
    data: PathText = Field(
        "digits", description="digits | synthetic[:N] | image-folder dir or .tar | torchvision CIFAR/MNIST dir")
    eval_data: Optional[PathText] = Field(None, description="held-out image-folder dir or .tar evaluated at the end")
    val_fraction: Number = Field(0.1, ge=0, lt=1, description="fraction held out for validation (fixed-seed split)")
    split_seed: Optional[Integer] = Field(
        None, description="seed of the train/validation split (default: seed); fix it to compare seeds on one split")
    limit: Optional[Count] = Field(None, description="use at most this many training images")
    val_limit: Optional[Count] = Field(
        None, description="at most this many validation images (default: in proportion to limit)")
    opt: str = Field("sgd", description="timm optimizer registry name (timm's sgd is Nesterov SGD)")
    lr: Number = Field(0.05, gt=0, description="peak learning rate")
    momentum: Number = Field(0.9, ge=0, description="momentum, passed when the optimizer has one")
    weight_decay: Number = Field(5e-4, ge=0, description="L2 weight decay (not on biases and norm parameters)")
    opt_kwargs: OptKwargs = Field(
        default_factory=lambda: OptKwargs(),
        description="extra optimizer kwargs, e.g. 'rho=0.01,lam=10' or JSON (DC decompositions: rho >= 0, lam > 0)")
    sched: Literal["cosine", "step", "none"] = Field(
        "cosine", description="lr schedule: cosine (per step, to 0), step (x0.1 at 50% and 75%) or none")
    # epochs before warmup_epochs: pydantic validates in this order and the warm-up check reads epochs
    epochs: Count = Field(10, description="training epochs (a search's budget per trial)")
    warmup_epochs: Number = Field(
        0.0, ge=0, description="linear lr warm-up length in epochs (may be fractional), < epochs")
    batch_size: Count = Field(128, description="training batch size")
    seed: Integer = Field(0, description="seed of initialization, shuffling and augmentation")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype: auto (bfloat16 where supported, else float16), bfloat16 or float16")
    channels_last: bool = Field(True, description="NHWC memory format for inputs and conv weights")
    compile: bool = Field(False, description="torch.compile the training forward (pays off on long runs)")
    augment: Optional[bool] = Field(None, description="pad-4 crop + flip (default: on for RGB data)")
    fidelity_every: Integer = Field(
        0, ge=0, description="direction-fidelity diagnostic every N training steps (0: off); see docs/fidelity.md")
    fidelity_reference: Literal["gradnet", "last", "self"] = Field(
        "gradnet", description="fidelity reference gradient: gradnet (shortcut twin), last (one-block twin) or self")
    output: Optional[PathText] = Field(
        None, description="directory for last.pt and metrics.json (dcanets train: runs/train/<model>-<time> if unset)")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:  # one line per problem, not pydantic's dump
            raise ConfigError(problems_of(exc, TrainConfig, unknown=UNKNOWN)) from None

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_epochs(cls, warmup: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")  # absent when epochs itself is invalid (reported there)
        if epochs is not None and warmup >= epochs:
            fail(f"must be < epochs ({epochs}), got {plain(warmup)}")
        return warmup

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """A config from a mapping (a YAML file, a tuner sample); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ConfigError([("", f"a training config is a mapping of fields, got {type(d).__name__}")])
        odd = [(str(key), unknown_key(key, cls.model_fields, *UNKNOWN)) for key in d if not isinstance(key, str)]
        if odd:
            raise ConfigError(odd)
        return cls(**d)  # pydantic routes even model_validate through __init__ once it is overridden

    @classmethod
    def problems(cls, d: Mapping[str, Any]) -> List[Problem]:
        """Every ``(field path, message)`` wrong with ``d``; empty when it makes a valid config."""
        try:
            cls.from_dict(d)
        except ConfigError as exc:
            return exc.problems
        return []

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump()

    # replaces pydantic v1's deprecated classmethod of this name: the engine calls cfg.validate()
    def validate(self) -> None:  # type: ignore[override]
        """Check again: attributes may have been assigned since construction."""
        type(self).from_dict(self.to_dict())
