"""The ``dcanets tune`` YAML schema: every section validated before anything starts.

A search file is data, read top to bottom the way a Ray Tune user would write the Python::

    train:        fixed TrainConfig fields              -> dcanets.engine.TrainConfig
    space:        what Optuna samples, per trial        -> OptunaSearch(space=<define-by-run>)
    search_alg:   {type: OptunaSearch, sampler: {...}}  -> ray.tune.search.optuna.OptunaSearch
    scheduler:    {type: ASHAScheduler, ...kwargs}      -> ray.tune.schedulers.ASHAScheduler(**kwargs)
    tune_config:  metric, mode, num_samples, ...        -> ray.tune.TuneConfig(**kwargs)
    resources:    {cpu: 1, gpu: 0.5, workers: 1}        -> tune.with_resources(trainable, ...) (workers: Ray Train)
    tracking:     {uri, experiment}                     -> MLflow ($MLFLOW_TRACKING_URI, else SQLite under the output)
    failure_config: {max_failures: 2}                   -> RunConfig(failure_config=ray.tune.FailureConfig(...))
    storage:      s3://bucket/prefix or a shared folder -> RunConfig(storage_path, storage_filesystem)
    checkpoints:  {keep_best: 5}                        -> the ended trials whose checkpoints stay (tune.retention)

Each section is a pydantic model (``SearchFile`` gathers them for ``dcanets tune --schema``); the
``train`` section and every sampled bound are checked by ``TrainConfig`` itself, exactly as
``dcanets train`` checks them. Sections are validated one by one and the cross-references
(``times:``, ``when:``, a field both fixed and searched) in plain code, so every problem is
collected with its YAML path (``space.lr.low: must be > 0, got 0``) and raised as one ValueError:
a user fixes the whole file in one pass, and nothing has started yet. The Ray and Optuna objects
are built from the validated sections in ``dcanets.tune.builders``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, Iterable, List, Literal, Optional, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dcanets import safe_yaml
from dcanets.engine.config import TrainConfig
from dcanets.names import did_you_mean
from dcanets.tune import storage as search_storage
from dcanets.tune.arguments import tune_config_arguments
from dcanets.tune.retention import Checkpoints
from dcanets.validation import (
    Count,
    Integer,
    NonNegative,
    Number,
    Positive,
    Problem,
    dotted,
    fail,
    is_number,
    plain,
    problems_of,
    unknown_key,
)

NESTED_FIELDS = ("opt_kwargs", "model_kwargs")  # space names may address their keys: opt_kwargs.rho
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
SCHEDULERS = {"asha": "ASHAScheduler", "fifo": "FIFOScheduler", "median": "MedianStoppingRule",
              "hyperband": "HyperBandScheduler"}
SAMPLERS = ("TPESampler", "RandomSampler", "CmaEsSampler", "QMCSampler", "GPSampler")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ space
class _Param(_Strict):
    """What every sampled parameter may say about its relation to those declared above it."""

    type: str
    when: Optional[Dict[str, Any]] = Field(
        None, description="sample only when these parameters (declared above) have these values: {opt: dcacounter}")
    times: Optional[str] = Field(None, description="the sampled value is a factor of this parameter (declared above)")
    over: Optional[str] = Field(None, description="the sampled value is divided by this parameter (declared above)")

    @field_validator("when")
    @classmethod
    def _when_not_empty(cls, when: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if when is not None and not when:
            fail("must name at least one parameter: {parameter: value or [values]}")
        return when

    @field_validator("over")
    @classmethod
    def _one_of_times_over(cls, over: Optional[str], info: ValidationInfo) -> Optional[str]:
        if over is not None and info.data.get("times") is not None:
            fail("use one of times and over, not both")
        return over


class _Range(_Param):
    low: Number
    high: Number
    log: bool = Field(False, description="sample on a log scale")
    step: Optional[Positive] = Field(None, description="quantization step (not with log)")

    @field_validator("high")
    @classmethod
    def _above_low(cls, high: float, info: ValidationInfo) -> float:
        low = info.data.get("low")
        if low is not None and high <= low:
            fail(f"must be > low ({low})")
        return high


class LogUniform(_Range):
    """A float sampled log-uniformly in [low, high]."""

    type: Literal["loguniform"]

    @field_validator("low")
    @classmethod
    def _positive(cls, low: float) -> float:
        if low <= 0:
            fail("must be > 0 for loguniform")
        return low


class Uniform(_Range):
    """A float sampled uniformly in [low, high]."""

    type: Literal["uniform"]


class Float(_Range):
    """A float sampled in [low, high], as Optuna's ``suggest_float`` (``log: true``: log-uniformly)."""

    type: Literal["float"]

    @field_validator("log")
    @classmethod
    def _positive_when_log(cls, log: bool, info: ValidationInfo) -> bool:
        low = info.data.get("low")
        if log and low is not None and low <= 0:
            fail(f"log: true needs low > 0, got low {plain(low)}")
        return log


class IntRange(_Range):
    """An integer sampled in [low, high]."""

    type: Literal["int"]
    low: Integer
    high: Integer
    step: Optional[Count] = None


class Choice(_Param):
    """One of ``values`` (``categorical``: Optuna's name for it)."""

    type: Literal["choice", "categorical"]
    values: List[Any] = Field(min_length=1)

    @field_validator("times", "over")
    @classmethod
    def _numeric_only(cls, other: Optional[str]) -> Optional[str]:
        if other is not None:
            fail("only numeric parameters can be scaled by another")
        return other


# dcanets' names, and Optuna's (suggest_float, suggest_int, suggest_categorical) beside them
PARAM_TYPES: Dict[str, Type[_Param]] = {"loguniform": LogUniform, "uniform": Uniform, "int": IntRange, "choice": Choice,
                                       "float": Float, "categorical": Choice}
SpaceParam = Annotated[Union[LogUniform, Uniform, Float, IntRange, Choice], Field(discriminator="type")]


# ------------------------------------------------------------------------- the other sections
class Sampler(BaseModel):
    """An ``optuna.samplers`` class and its keyword arguments."""

    model_config = ConfigDict(extra="allow")  # checked against the sampler's signature
    type: Literal[SAMPLERS] = "TPESampler"  # type: ignore[valid-type]
    seed: Optional[Integer] = Field(0, description="sampler seed: the same seed samples the same trials")


class SearchAlg(_Strict):
    type: str = Field("OptunaSearch", description="only OptunaSearch is supported")
    sampler: Sampler = Field(default_factory=Sampler)
    points_to_evaluate: Optional[List[Dict[str, Any]]] = Field(
        None, description="trials to run first, e.g. [{lr: 0.05}] (a times: parameter's factor is name:fraction)")

    @field_validator("type")
    @classmethod
    def _optuna(cls, kind: str) -> str:
        if kind.lower() not in ("optunasearch", "optuna"):
            fail(f"only OptunaSearch is supported, got {kind!r}")
        return "OptunaSearch"


class Scheduler(BaseModel):
    """A ``ray.tune.schedulers`` class and its keyword arguments (``max_t`` defaults to ``train.epochs``)."""

    model_config = ConfigDict(extra="allow")  # checked against the scheduler's signature
    type: str = Field("ASHAScheduler", description=f"one of {', '.join(SCHEDULERS.values())} (or asha, fifo, ...)")
    grace_period: Optional[Count] = Field(None, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: Optional[Number] = Field(None, description="ASHA/HyperBand: halving rate")
    max_t: Optional[Count] = Field(None, description="ASHA/HyperBand: epochs of the longest trial (default: epochs)")

    @field_validator("type")
    @classmethod
    def _known(cls, kind: str) -> str:
        kind = SCHEDULERS.get(kind.lower(), kind)
        if kind not in SCHEDULERS.values():
            fail(f"must be one of {', '.join(SCHEDULERS.values())}, got {kind!r}")
        return kind

    @field_validator("reduction_factor")
    @classmethod
    def _reduces(cls, factor: Optional[float]) -> Optional[float]:
        if factor is not None and factor <= 1:
            fail(f"must be > 1 (trials kept per rung = 1/reduction_factor), got {factor!r}")
        return factor


class TuneConfigSection(BaseModel):
    """``ray.tune.TuneConfig`` arguments (search_alg and scheduler come from their sections)."""

    model_config = ConfigDict(extra="allow")  # any other TuneConfig argument
    metric: Literal[METRICS] = Field("val_acc", description="the engine metric the search optimizes")  # type: ignore
    mode: Optional[Literal["min", "max"]] = Field(None, description="default: max for *_acc, min for *_loss")
    num_samples: Count = Field(4, description="trials to run")
    reuse_actors: bool = Field(True, description="one worker process imports torch/timm/dcanets once")
    time_budget_s: Optional[Positive] = Field(None, description="stop the search after this")
    max_concurrent_trials: Optional[Count] = None

    @model_validator(mode="after")
    def _mode_from_metric(self) -> "TuneConfigSection":
        if self.mode is None:
            self.mode = "max" if self.metric.endswith("acc") else "min"
        return self


class Resources(_Strict):
    cpu: Positive = Field(1, description="CPUs per trial (per worker of a gang)")
    gpu: NonNegative = Field(0, description="GPUs per trial (per worker); fractions share a GPU (0.25: 4 trials)")
    workers: Count = Field(1, description="DDP processes per trial: > 1 makes each trial a Ray Train gang of this "
                                          "many workers across the nodes; global batch = batch_size x workers")


class Tracking(_Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                 "sqlite:///<output>/mlflow.db; --tracking-uri overrides it)")
    experiment: Optional[str] = Field(None, description="MLflow experiment (default: the search name)")
    enabled: bool = Field(True, description="log to MLflow")


class FailureConfigSection(_Strict):
    """``ray.tune.FailureConfig`` arguments: what a trial that crashed or lost its node does.

    A retried trial resumes from its last epoch checkpoint (every trial reports one per epoch,
    kept in the search's storage) on whichever node has room: a node that died mid-trial costs
    the epoch in progress, not the trial. Ray's default, 0, is kept: a trial whose own code
    fails would fail again on every retry, so retries are asked for (on a cluster whose nodes
    can go away), not assumed.
    """

    max_failures: Integer = Field(0, ge=-1, description="retries of a failed trial, each from its last epoch "
                                                        "checkpoint (a lost node included); -1: no limit")


class Header(BaseModel):
    name: Optional[str] = Field(None, description="names the output folder (default: the file name)")
    description: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            fail(f"letters, digits, '_', '.', '-' only (it names the output folder), got {name!r}")
        return name


class TrainSection(TrainConfig):
    """Fixed TrainConfig fields of every trial; ``epochs`` is required (the budget per trial)."""

    model_config = ConfigDict(json_schema_extra={"required": ["epochs"]}, title="TrainSection")


class SearchFile(Header):
    """A ``dcanets tune`` search file (what ``dcanets tune --schema`` prints)."""

    model_config = ConfigDict(extra="forbid", title="dcanets tune search file")
    train: TrainSection
    space: Dict[str, SpaceParam] = Field(
        description="TrainConfig fields (or opt_kwargs.<key>, model_kwargs.<key>) sampled per trial, top to bottom")
    search_alg: SearchAlg = Field(default_factory=SearchAlg)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    tune_config: TuneConfigSection = Field(default_factory=TuneConfigSection)
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)
    failure_config: FailureConfigSection = Field(default_factory=FailureConfigSection)
    storage: Optional[str] = Field(
        None, description="where Ray Tune keeps trial checkpoints and results, reachable from every node: a folder "
                          "on a shared filesystem or a URI such as s3://bucket/prefix (an S3-compatible server: "
                          "s3://bucket/prefix?endpoint_override=http://host:9000); default: the search folder")
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)


# ------------------------------------------------------------------------------- the spec
@dataclasses.dataclass
class TuneSpec:
    """A validated search file, section by section as its models; ``train`` keeps the fixed
    fields as written (typed), ``raw`` the YAML as written (logged as an MLflow artifact)."""

    name: str
    path: Path
    train: Dict[str, Any]
    space: Dict[str, SpaceParam]
    search_alg: SearchAlg
    scheduler: Scheduler
    tune_config: TuneConfigSection
    resources: Resources
    tracking: Tracking
    raw: Dict[str, Any]
    storage: Optional[str] = None  # a URI, or an absolute path; None: the search folder itself
    failure_config: FailureConfigSection = dataclasses.field(default_factory=FailureConfigSection)
    checkpoints: Checkpoints = dataclasses.field(default_factory=Checkpoints)

    @property
    def metric(self) -> str:
        return self.tune_config.metric

    @property
    def mode(self) -> str:
        return str(self.tune_config.mode)  # never None: TuneConfigSection fills it in from the metric


class _Problems:
    """Every problem found so far, each with its YAML path; raised together at the end."""

    def __init__(self) -> None:
        self.items: List[str] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append(f"{path}: {msg}")

    def extend(self, problems: Iterable[Problem], prefix: str) -> None:
        for path, msg in problems:
            self.add(".".join(p for p in (prefix, path) if p), msg)

    def parse(self, model: Type[BaseModel], value: Any, where: str) -> Optional[Any]:
        """``model`` validated from ``value``, or None with its problems recorded under ``where``."""
        try:
            return model.model_validate(value if value is not None else {})
        except ValidationError as exc:
            self.extend(problems_of(exc, model), where)
            return None

    def raise_if_any(self, source: Path) -> None:
        """One problem: one line. Several: the first on the first line, then every one, indented."""
        if len(self.items) == 1:
            raise ValueError(f"{source}: {self.items[0]}")
        if self.items:
            raise ValueError(f"{source}: {len(self.items)} problem(s) in the tune config, the first: "
                             f"{self.items[0]}\n  " + "\n  ".join(self.items))


def load(path: str | Path, base: Optional[Path] = None) -> TuneSpec:
    """Read and validate a search file; relative data paths resolve against the file's folder
    (or ``base``: a resumed search reads its copy of the file but resolves like the original)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"tune config not found: {path}")
    try:
        doc = safe_yaml.load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a tune config is a YAML mapping with keys {', '.join(SearchFile.model_fields)}")
    return validate(doc, path, base or path.parent)


def validate(doc: Dict[str, Any], path: Path, base: Optional[Path] = None) -> TuneSpec:
    """The spec of an already-parsed search file, or one ValueError listing every problem."""
    err = _Problems()
    for key in doc:
        if key not in SearchFile.model_fields:
            err.add(str(key), unknown_key(key, SearchFile.model_fields, listing="known"))
    header = err.parse(Header, {"name": doc.get("name") or path.stem, "description": doc.get("description")}, "")
    train = _check_train(_mapping(doc, "train", err), base or path.parent, err)
    space = _check_space(_mapping(doc, "space", err), train, err)
    search_alg = _check_search_alg(doc.get("search_alg"), err)
    scheduler = _check_scheduler(doc.get("scheduler"), train, err)
    tune_config = _check_tune_config(doc.get("tune_config"), err)
    resources = err.parse(Resources, doc.get("resources"), "resources")
    tracking = err.parse(Tracking, doc.get("tracking"), "tracking")
    failure = err.parse(FailureConfigSection, doc.get("failure_config"), "failure_config")
    storage = search_storage.parse_into(doc.get("storage"), base or path.parent, err)
    checkpoints = err.parse(Checkpoints, doc.get("checkpoints"), "checkpoints")
    err.raise_if_any(path)  # each None above recorded a problem, raised just now
    assert header and search_alg and scheduler and tune_config and resources and tracking and failure and checkpoints
    return TuneSpec(name=str(header.name), path=path, train=train, space=space, search_alg=search_alg,
                    scheduler=scheduler, tune_config=tune_config, resources=resources, tracking=tracking,
                    raw=copy.deepcopy(doc), storage=storage, failure_config=failure, checkpoints=checkpoints)


def _mapping(doc: Dict[str, Any], key: str, err: _Problems) -> Dict[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        err.add(key, f"must be a mapping, got {type(value).__name__}")
        return {}
    return dict(value)


# ------------------------------------------------------------------------------------ train
def _check_train(train: Dict[str, Any], base: Path, err: _Problems) -> Dict[str, Any]:
    """The fixed fields, checked by TrainConfig (defaults fill in the rest) and kept as written
    (but typed: ``epochs: '3'`` becomes 3), with data paths made absolute."""
    if "epochs" not in train:
        err.add("train.epochs", "required (the budget per trial, and ASHA's max_t)")
    for key in ("data", "eval_data"):
        if isinstance(train.get(key), str):
            train[key] = _resolve_data(train[key], base, f"train.{key}", err)
    problems = TrainConfig.problems(train)
    err.extend(problems, "train")
    if problems:
        return train
    cfg = TrainConfig.from_dict(train)
    return {key: getattr(cfg, key) for key in train}


def _resolve_data(value: str, base: Path, where: str, err: _Problems) -> str:
    """A name without a path separator or suffix (``digits``) is a built-in set; anything else is a
    path, relative to the YAML file's folder, made absolute because Tune changes each trial's cwd."""
    if "/" not in value and "." not in value:
        return value
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if not p.exists():
        err.add(where, f"data path not found: {p} (relative paths resolve against the YAML file's folder)")
    return str(p)


# ------------------------------------------------------------------------------------ space
def _check_space(space: Dict[str, Any], train: Dict[str, Any], err: _Problems) -> Dict[str, SpaceParam]:
    """Each parameter by its model, then what needs the others: names, references, and every
    bound or choice checked as a TrainConfig value with the fixed fields around it."""
    if not space:
        err.add("space", "required: at least one parameter to search")
    declared: Dict[str, Dict[str, Any]] = {}  # parameters above the current one, as written
    out: Dict[str, SpaceParam] = {}
    for name, raw in space.items():
        where = f"space.{name}"
        _check_name(str(name), where, train, err)
        if not isinstance(raw, dict):
            err.add(where, "must be a mapping like {type: loguniform, low: 1e-4, high: 0.1}")
            continue
        _check_references(raw, where, declared, list(space), err)
        param = _parse_param(raw, where, err)
        if param is not None:
            out[name] = param
            if param.times is None and param.over is None:  # a scaled one samples a factor, not the value
                _check_values(str(name), raw, train, err)
        declared[name] = raw
    return out


def _check_name(name: str, where: str, train: Dict[str, Any], err: _Problems) -> None:
    head, _, tail = name.partition(".")
    fields = TrainConfig.model_fields
    if head not in fields or (tail and head not in NESTED_FIELDS) or (head in NESTED_FIELDS and not tail):
        err.add(where, unknown_key(head, fields, f"must be a TrainConfig field or {'/'.join(NESTED_FIELDS)}.<key>",
                                   "fields"))
    elif not tail and name in train:
        err.add(where, f"also fixed as train.{name}; keep one of the two")


def _parse_param(raw: Dict[str, Any], where: str, err: _Problems) -> Optional[SpaceParam]:
    model = PARAM_TYPES.get(raw.get("type"))  # type: ignore[arg-type]
    if model is None:
        err.add(f"{where}.type", f"must be one of {', '.join(PARAM_TYPES)}, got {raw.get('type')!r}")
    return err.parse(model, raw, where) if model else None


def _check_references(raw: Dict[str, Any], where: str, declared: Dict[str, Dict[str, Any]], names: List[str],
                      err: _Problems) -> None:
    """``times``/``over``/``when`` name parameters declared above: Optuna samples top to bottom."""
    for rel in ("times", "over"):
        other = raw.get(rel)
        if other is None or not isinstance(other, str):
            continue
        if other not in declared:
            hint = "; it is declared below: move it above" if other in names else did_you_mean(other, declared)
            err.add(f"{where}.{rel}", f"must name a parameter declared above it in space, got {other!r}{hint}")
        elif not all(is_number(v) for v in declared[other].get("values", [])):
            err.add(f"{where}.{rel}", f"{other} must be numeric")
    when = raw.get("when")
    for cond in when if isinstance(when, dict) else ():
        if cond not in declared:
            err.add(f"{where}.when.{cond}", "must name a parameter declared above it in space"
                    + did_you_mean(cond, declared))


def _check_values(name: str, param: Dict[str, Any], train: Dict[str, Any], err: _Problems) -> None:
    """``space.lr.low: must be > 0, got 0``: each bound or choice as TrainConfig would see it."""
    if "values" in param:
        candidates = [(f"values[{i}]", value) for i, value in enumerate(param["values"])]
    else:
        candidates = [("low", param["low"]), ("high", param["high"])]
    head, _, tail = name.partition(".")
    nested: Dict[str, Any] = train[head] if isinstance(train.get(head), dict) else {}
    for key, value in candidates:
        trial = {**train, head: {**nested, tail: value} if tail else value}
        for path, msg in TrainConfig.problems(trial):
            if path == name:
                err.add(f"space.{name}.{key}", msg)


# ---------------------------------------------------------------------- algorithm, scheduler
def _check_kwargs(where: str, target: Callable, kwargs: Dict[str, Any], err: _Problems,
                  reserved: Tuple[str, ...] = (), name: str = "") -> None:
    params = [p for p in inspect.signature(target).parameters if p not in reserved]
    for key in kwargs:
        if key in reserved:
            err.add(f"{where}.{key}", "set it in tune_config, which passes it to every component")
        elif key not in params:
            err.add(f"{where}.{key}", unknown_key(key, params, f"not an argument of {name}", "known"))


def _as_dict(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check_search_alg(raw: Any, err: _Problems) -> Optional[SearchAlg]:
    import optuna

    sa = err.parse(SearchAlg, raw, "search_alg")
    sampler = _as_dict(_as_dict(raw).get("sampler"))
    kind = sampler.get("type", "TPESampler")
    if kind in SAMPLERS:  # keys checked on the raw mapping: reported even when a value is wrong too
        kwargs = {k: v for k, v in sampler.items() if k not in Sampler.model_fields}
        _check_kwargs("search_alg.sampler", getattr(optuna.samplers, kind), kwargs, err, name=kind)
    return sa


def _check_scheduler(raw: Any, train: Dict[str, Any], err: _Problems) -> Optional[Scheduler]:
    from ray.tune import schedulers

    sc = err.parse(Scheduler, raw, "scheduler")
    kwargs = {k: v for k, v in _as_dict(raw).items() if k != "type"}
    kind = str(_as_dict(raw).get("type", "ASHAScheduler"))
    kind = SCHEDULERS.get(kind.lower(), kind)
    if kind in SCHEDULERS.values():
        _check_kwargs("scheduler", getattr(schedulers, kind), kwargs, err, reserved=("metric", "mode"), name=kind)
    if sc is None:
        return None
    if sc.type != "FIFOScheduler" and (sc.model_extra or {}).get("time_attr") is None:
        # the engine's epoch, not Tune's training_iteration, which restarts at 1 after --resume
        sc = sc.model_copy(update={"time_attr": "epoch"})
    epochs = train.get("epochs")
    if sc.type in ("ASHAScheduler", "HyperBandScheduler") and sc.max_t is None and isinstance(epochs, int):
        sc.max_t = epochs if epochs >= 1 else None  # budget unit = one epoch
    if sc.type == "ASHAScheduler" and sc.max_t is not None and (sc.grace_period or 1) > sc.max_t:
        err.add("scheduler.grace_period", f"must be <= max_t ({sc.max_t})")
    return sc


def _check_tune_config(raw: Any, err: _Problems) -> Optional[TuneConfigSection]:
    tc = err.parse(TuneConfigSection, raw, "tune_config")
    known = tune_config_arguments()
    for key in _as_dict(raw):
        if key not in known:
            err.add(f"tune_config.{key}", unknown_key(key, known, "not a ray.tune.TuneConfig argument", "known"))
    return tc


# ------------------------------------------------------------------------------ registries
def check_registries(spec: TuneSpec) -> None:
    """Names only the plugins know (models, decompositions): checked on the driver after
    ``import dcanets``, still before Ray starts, so a typo costs no cluster time."""
    import timm
    import timm.optim

    import dcanets  # noqa: F401  (registers the plugins' models and decompositions into timm)

    err = _Problems()
    opts, models = set(map(str, timm.optim.list_optimizers())), set(map(str, timm.list_models()))
    for field, known, ok in (("model", models, timm.is_model),
                             ("opt", opts, lambda n: n.lower().split("_")[-1] in opts)):
        if field in spec.train and not ok(spec.train[field]):
            err.add(f"train.{field}", f"unknown {field} {spec.train[field]!r}" + did_you_mean(spec.train[field], known))
        searched = spec.space.get(field)
        for i, value in enumerate(searched.values if isinstance(searched, Choice) else []):
            if not ok(value):
                err.add(dotted(("values", i), f"space.{field}"),
                        f"unknown {field} {value!r}" + did_you_mean(value, known))
    err.raise_if_any(spec.path)


__all__ = ["Choice", "FailureConfigSection", "Float", "IntRange", "LogUniform", "Resources", "Sampler", "Scheduler",
           "SearchAlg", "SearchFile", "SpaceParam", "Tracking", "TrainSection", "TuneConfigSection", "TuneSpec",
           "Uniform", "check_registries", "load", "validate"]
