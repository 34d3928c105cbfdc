"""``TrainConfig``: everything one training run depends on, and its validation.

A ``dcanets train`` run, a Ray Tune trial and a reproduction are each one of these, handed to
``dcanets.engine.train``. This pydantic model is the one place for each field's type, default,
help text and checks: the ``dcanets train`` flags are generated from it, the tune YAML's
``train:`` section and sampled values are validated by it, and ``dcanets tune --schema`` exports it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
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
# timm's scheduler names (timm.scheduler.create_scheduler_v2) that every supported timm (>= 1.0.15) builds;
# none and constant both hold lr after the warm-up (see docs/training.md, "Learning-rate schedules")
Schedule = Literal["cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "none"]
SCHEDULES = get_args(Schedule)


def _listed(value: Any) -> Any:
    """``'3,6'`` or ``'[3, 6]'`` (a flag) -> ``['3', '6']``; the items are then checked as numbers."""
    if isinstance(value, str):
        return [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
    return value


Milestones = Annotated[List[Positive], BeforeValidator(_listed)]
MinMax = Annotated[List[Number], BeforeValidator(_listed)]
Sizes = Annotated[List[Positive], BeforeValidator(_listed)]  # input_size (C,H,W), scale and ratio (low,high)


def check_sizes(name: str, value: Optional[List[float]]) -> Optional[List[Any]]:
    """``input_size``: C,H,W integers with C 1 or 3; ``scale``/``ratio``: low <= high (scale <= 1)."""
    if value is None:
        return None
    if name == "input_size":
        if len(value) != 3 or any(not float(v).is_integer() for v in value) or value[0] not in (1, 3):
            fail(f"must be C,H,W: three integers with C 1 or 3, got {[plain(v) for v in value]}")
        return [int(v) for v in value]
    if len(value) != 2 or value[0] > value[1] or (name == "scale" and value[1] > 1):
        bound = " <= 1" if name == "scale" else ""
        fail(f"must be low,high with 0 < low <= high{bound}, got {[plain(v) for v in value]}")
    return value


def _rho(value: Any) -> Any:
    """A DC decomposition's ρ: ``"auto"`` (measured by the optimizer) or a number >= 0."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        fail(f"must be a number >= 0 or 'auto', got {value!r}")
    try:
        number = float(value)
    except ValueError:
        fail(f"must be a number >= 0 or 'auto', got {value!r}")
    if number != number or number in (float("inf"), float("-inf")):
        fail(f"must be a finite number, got {value!r}")
    if number < 0:
        fail(f"must be >= 0, got {value!r}")
    return number


Rho = Annotated[Union[float, Literal["auto"]], BeforeValidator(_rho)]


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

    rho: Annotated[Rho, Field(description="DC decomposition: rho >= 0 (Hessian units) convexifies; 'auto' measures "
                                          "it; rho = 0 (the default) leaves G not convex: eq. 19's formula, not a "
                                          "DCA step")]
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
        description="extra optimizer kwargs, e.g. rho=0.01 lam=20, 'rho=0.01,lam=20' or JSON (DC decompositions: "
                    "rho >= 0, lam > 0, lam = 1/lr; at rho = 0 G is not convex, so the step is not a DCA step)")
    sched: Schedule = Field(
        "cosine", description="lr schedule, a timm scheduler name (none = constant); fitted into epochs")
    sched_on_updates: bool = Field(
        True, description="set the lr after every update (false: once per epoch; plateau is always per epoch)")
    # epochs before the warm-up and decay fields: pydantic validates in this order and their checks read epochs
    epochs: Count = Field(10, description="training epochs (a search's budget per trial)")
    warmup_epochs: Number = Field(
        0.0, ge=0, description="linear lr warm-up from warmup_lr to lr over this many epochs, < epochs")
    warmup_lr: NonNegative = Field(0.0, description="lr at the start of the warm-up")
    warmup_prefix: bool = Field(
        True, description="the decay starts after the warm-up (false: it spans all epochs, warm-up included)")
    min_lr: NonNegative = Field(0.0, description="lr that cosine, tanh and poly anneal to, and plateau's floor")
    decay_epochs: Optional[Positive] = Field(
        None, description="step: multiply the lr by decay_rate every this many epochs (unset: at decay_milestones)")
    decay_milestones: Optional[Milestones] = Field(
        None, description="multistep, step: epochs (after the warm-up) at which the lr is multiplied by decay_rate "
                          "(unset: at 50% and 75% of them)")
    decay_rate: Positive = Field(0.1, description="lr factor of step, multistep and plateau; poly's power")
    patience_epochs: Integer = Field(
        10, ge=0, description="plateau: epochs without improvement of eval_metric before the lr decays")
    eval_metric: Literal["val_acc", "val_loss"] = Field(
        "val_acc", description="what plateau watches: val_acc (higher is better) or val_loss (lower is better)")
    cooldown_epochs: NonNegative = Field(
        0.0, description="cosine, tanh, poly: last epochs held at min_lr (part of epochs)")
    lr_cycle_limit: Count = Field(
        1, description="cosine, tanh, poly: number of cycles (warm restarts) sharing the decay epochs")
    lr_cycle_mul: Positive = Field(1.0, description="cosine, tanh, poly: each cycle this many times the last's length")
    lr_cycle_decay: Positive = Field(0.5, description="cosine, tanh, poly: each cycle's peak lr this times the last's")
    batch_size: Count = Field(
        128, description="training batch size per process: the global batch is batch_size x processes (--nproc, "
                         "a search's workers); lr is used as given for the global batch, never scaled")
    label_smoothing: Number = Field(
        0.0, ge=0, lt=1, description="training loss: cross-entropy against targets smoothed by this much "
                                     "(validation loss is plain cross-entropy)")
    # timm's ImageNet recipe (dcanets/engine/recipe.py), named as timm's train.py names them
    mixup: NonNegative = Field(
        0.0, description="Mixup alpha: mix image pairs (and their targets) by Beta(alpha, alpha); 0: off")
    cutmix: NonNegative = Field(0.0, description="CutMix alpha: paste a box of the paired image, area from "
                                                 "Beta(alpha, alpha); 0: off")
    cutmix_minmax: Optional[MinMax] = Field(
        None, description="CutMix box side as a fraction of the image, drawn in [min, max) (turns CutMix on, "
                          "overrides cutmix's alpha)")
    mixup_prob: Number = Field(1.0, ge=0, le=1, description="probability of mixing a batch (or an element)")
    mixup_switch_prob: Number = Field(
        0.5, ge=0, le=1, description="with mixup and cutmix both on: probability of CutMix instead of Mixup")
    mixup_mode: Literal["batch", "pair", "elem"] = Field(
        "batch", description="draw the mixing per batch, per pair of images or per image")
    mixup_off_epoch: Integer = Field(0, ge=0, description="mix only the first N epochs (0: every epoch)")
    model_ema: bool = Field(False, description="keep an exponential moving average of the weights "
                                               "(timm.utils.ModelEmaV3), evaluated every epoch")
    model_ema_decay: Number = Field(0.9998, ge=0, lt=1, description="EMA decay per optimizer update")
    model_ema_warmup: bool = Field(False, description="EMA decay warm-up: 1 - (1 + step)^(-2/3), capped at the decay")
    clip_grad: Optional[Positive] = Field(
        None, description="clip the gradients before each optimizer step at this norm/value/factor (unset: off)")
    clip_mode: Literal["norm", "value", "agc"] = Field(
        "norm", description="norm: total L2 norm; value: each element; agc: adaptive, unit-wise (head excluded)")
    grad_accum_steps: Count = Field(
        1, description="optimizer update after this many batches, their gradients summed (effective batch "
                       "batch_size x N)")
    seed: Integer = Field(0, description="seed of initialization, shuffling and augmentation")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype: auto (bfloat16 where supported, else float16), bfloat16 or float16")
    channels_last: bool = Field(True, description="NHWC memory format for inputs and conv weights")
    sync_bn: bool = Field(
        False, description="several processes: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only; "
                           "default: each process normalizes its own part)")
    compile: bool = Field(False, description="torch.compile the training forward (pays off on long runs)")
    augment: Optional[bool] = Field(
        None, description="training augmentation: cached pad-4 crop + flip, stream timm's train transform "
                          "(default: on for RGB data)")
    # data modes, timm's layout and timm's transforms (dcanets/engine/data/; names as timm's train.py has them)
    data_mode: Literal["auto", "cached", "stream"] = Field(
        "auto", description="cached (decode once, small sets) | stream (DataLoader workers, any size) | auto (by size)")
    train_split: Optional[str] = Field(None, description="training split folder of the data root (default: train)")
    val_split: Optional[str] = Field(
        None, description="validation split folder of the data root (default: val, valid, validation, ...)")
    img_size: Optional[Count] = Field(None, description="image size (default: the model's; cached: the set's)")
    input_size: Optional[Sizes] = Field(None, description="C,H,W: overrides img_size, as in timm")
    crop_pct: Optional[Number] = Field(
        None, gt=0, le=1, description="stream evaluation: resize to img_size/crop_pct, centre crop (default: model's)")
    scale: Optional[Sizes] = Field(None, description="stream: RandomResizedCrop area range (default: 0.08,1)")
    ratio: Optional[Sizes] = Field(None, description="stream: RandomResizedCrop aspect range (default: 0.75,1.333)")
    hflip: Number = Field(0.5, ge=0, le=1, description="stream: horizontal flip probability")
    color_jitter: NonNegative = Field(0.4, description="stream: colour jitter strength (off when aa is set)")
    train_interpolation: Literal["random", "bilinear", "bicubic", "nearest"] = Field(
        "random", description="stream: RandomResizedCrop interpolation")
    aa: Optional[str] = Field(None, description="stream: timm augmentation policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: Number = Field(0.0, ge=0, le=1, description="random erasing probability (on the normalized batch)")
    remode: Literal["const", "rand", "pixel"] = Field("pixel", description="random erasing fill")
    recount: Count = Field(1, description="random erasing: at most this many boxes per image")
    workers: Integer = Field(4, ge=0, description="stream: DataLoader worker processes (0: in the training process)")
    max_bad_fraction: Number = Field(
        0.01, ge=0, lt=1, description="stream: unusable images per epoch skipped (named) up to this fraction, "
                                      "above it the run fails")

    @field_validator("input_size", "scale", "ratio")
    @classmethod
    def _shape_of_sizes(cls, value: Optional[List[float]], info: ValidationInfo) -> Optional[List[Any]]:
        return check_sizes(info.field_name or "", value)
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

    @field_validator("sched")
    @classmethod
    def _plateau_has_a_metric(cls, sched: str, info: ValidationInfo) -> str:
        if sched == "plateau" and info.data.get("val_fraction") == 0:
            fail("plateau watches a validation metric: needs val_fraction > 0")
        return sched

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_epochs(cls, warmup: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")  # absent when epochs itself is invalid (reported there)
        if epochs is not None and warmup >= epochs:
            fail(f"must be < epochs ({epochs}), got {plain(warmup)}")
        per_epoch = info.data.get("sched") == "plateau" or info.data.get("sched_on_updates") is False
        if per_epoch and not float(warmup).is_integer():  # timm's per-epoch warm-up moves in whole epochs
            fail(f"must be a whole number when the schedule steps per epoch, got {plain(warmup)}")
        return warmup

    @field_validator("decay_milestones")
    @classmethod
    def _increasing(cls, milestones: Optional[List[float]]) -> Optional[List[float]]:
        if milestones is not None and any(b <= a for a, b in zip(milestones, milestones[1:])):
            fail(f"must be increasing, got {[plain(m) for m in milestones]}")  # timm bisects them
        return milestones

    @field_validator("cooldown_epochs")
    @classmethod
    def _decay_left(cls, cooldown: float, info: ValidationInfo) -> float:
        epochs, warmup = info.data.get("epochs"), info.data.get("warmup_epochs")
        if epochs is None or warmup is None:
            return cooldown
        prefix = warmup if info.data.get("warmup_prefix", True) else 0.0
        if cooldown >= epochs - prefix:
            bound = "epochs - warmup_epochs" if prefix else "epochs"
            fail(f"must be < {bound} ({plain(epochs - prefix)}), got {plain(cooldown)}")
        return cooldown

    @field_validator("cutmix_minmax")
    @classmethod
    def _box_fractions(cls, minmax: Optional[List[float]]) -> Optional[List[float]]:
        if minmax is not None and not (len(minmax) == 2 and 0 <= minmax[0] < minmax[1] <= 1):
            fail(f"must be two fractions 0 <= min < max <= 1, got {[plain(m) for m in minmax]}")
        return minmax

    @model_validator(mode="after")
    def _mixup_pairs(self) -> "TrainConfig":
        if self.mixup_active and self.batch_size % 2:  # timm's Mixup mixes image i with image n-1-i
            fail(f"batch_size: must be even with mixup/cutmix (they mix pairs of images), got {self.batch_size}")
        return self

    @property
    def mixup_active(self) -> bool:
        """Mixup or CutMix is on (timm's train.py: ``mixup > 0 or cutmix > 0 or cutmix_minmax``)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

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
