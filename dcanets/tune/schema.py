"""The ``dcanets tune`` YAML schema: validate everything first, then map onto Ray/Optuna objects.

A search file is data, read top to bottom the way a Ray Tune user would write the Python::

    train:        fixed TrainConfig fields              -> dcanets.engine.TrainConfig
    space:        what Optuna samples, per trial        -> OptunaSearch(space=<define-by-run>)
    search_alg:   {type: OptunaSearch, sampler: {...}}  -> ray.tune.search.optuna.OptunaSearch
    scheduler:    {type: ASHAScheduler, ...kwargs}      -> ray.tune.schedulers.ASHAScheduler(**kwargs)
    tune_config:  metric, mode, num_samples, ...        -> ray.tune.TuneConfig(**kwargs)
    resources:    {cpu: 1, gpu: 0.5}                    -> tune.with_resources(trainable, ...)
    tracking:     {uri, experiment}                     -> MLflow (SQLite under the output by default)

Every problem is collected with its YAML path (``space.lr.low: must be > 0``) and raised as one
ValueError, so a user fixes the whole file in one pass and nothing has started yet.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

TOP_KEYS = ("name", "description", "train", "space", "search_alg", "scheduler", "tune_config",
            "resources", "tracking")
# The engine's contract (dcanets.engine.TrainConfig); used when train.py cannot be imported.
_CONTRACT_FIELDS = ("model", "model_kwargs", "data", "eval_data", "val_fraction", "split_seed", "limit",
                    "val_limit", "opt", "lr", "momentum", "weight_decay", "opt_kwargs", "sched",
                    "warmup_epochs", "epochs", "batch_size", "seed", "device", "amp", "augment", "output")
NESTED_FIELDS = ("opt_kwargs", "model_kwargs")  # space names may address their keys: opt_kwargs.rho
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
SPACE_TYPES = ("loguniform", "uniform", "int", "choice")
SCHEDULERS = {"asha": "ASHAScheduler", "fifo": "FIFOScheduler", "median": "MedianStoppingRule",
              "hyperband": "HyperBandScheduler"}
SAMPLERS = ("TPESampler", "RandomSampler", "CmaEsSampler", "QMCSampler", "GPSampler")
DERIVED = ":fraction"  # suffix of the sampled factor of a `times:` parameter (never a TrainConfig key)


def train_fields() -> tuple:
    try:
        from dcanets.engine.config import TrainConfig
    except ImportError:
        return _CONTRACT_FIELDS
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass
class TuneSpec:
    """A validated search file; ``raw`` is the YAML as written (logged as an MLflow artifact)."""

    name: str
    path: Path
    train: Dict[str, Any]
    space: Dict[str, Dict[str, Any]]
    search_alg: Dict[str, Any]
    scheduler: Dict[str, Any]
    tune_config: Dict[str, Any]
    resources: Dict[str, float]
    tracking: Dict[str, Any]
    raw: Dict[str, Any]

    @property
    def metric(self) -> str:
        return self.tune_config["metric"]

    @property
    def mode(self) -> str:
        return self.tune_config["mode"]


class _Errors:
    def __init__(self) -> None:
        self.items: List[str] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append(f"{path}: {msg}")

    def raise_if_any(self, source: Path) -> None:
        if self.items:
            lines = "\n  ".join(self.items)
            raise ValueError(f"{source}: {len(self.items)} problem(s) in the tune config:\n  {lines}")


# DC decomposition parameters (paper 000): rho >= 0 convexifies, lam > 0 is an L2 weight
NONNEGATIVE = {"rho": ">= 0", "lam": "> 0"}


def _ok(value: float, bound: str) -> bool:
    return value >= 0 if bound == ">= 0" else value > 0


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _section(doc: Dict[str, Any], key: str, err: _Errors) -> Dict[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        err.add(key, f"must be a mapping, got {type(value).__name__}")
        return {}
    return dict(value)


def load(path: str | Path, base: Optional[Path] = None) -> TuneSpec:
    """Read and validate a search file; relative data paths resolve against the file's folder
    (or ``base``: a resumed search reads its copy of the file but resolves like the original)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"tune config not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a tune config is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    return validate(doc, path, base or path.parent)


def validate(doc: Dict[str, Any], path: Path, base: Optional[Path] = None) -> TuneSpec:
    err = _Errors()
    for key in doc:
        if key not in TOP_KEYS:
            err.add(str(key), f"unknown key; known: {', '.join(TOP_KEYS)}")
    name = str(doc.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        err.add("name", f"letters, digits, '_', '.', '-' only (it names the output folder), got {name!r}")
    fields = train_fields()
    train = _check_train(_section(doc, "train", err), fields, base or path.parent, err)
    space = _check_space(_section(doc, "space", err), fields, train, err)
    tune_config = _check_tune_config(_section(doc, "tune_config", err), err)
    spec = TuneSpec(
        name=name, path=path, train=train, space=space,
        search_alg=_check_search_alg(_section(doc, "search_alg", err), err),
        scheduler=_check_scheduler(_section(doc, "scheduler", err), train, err),
        tune_config=tune_config, resources=_check_resources(_section(doc, "resources", err), err),
        tracking=_check_tracking(_section(doc, "tracking", err), err), raw=copy.deepcopy(doc))
    err.raise_if_any(path)
    return spec


def _check_train(train: Dict[str, Any], fields: tuple, base: Path, err: _Errors) -> Dict[str, Any]:
    for key in train:
        if key not in fields:
            err.add(f"train.{key}", f"not a TrainConfig field; known: {', '.join(fields)}")
    for key in ("epochs", "batch_size", "limit"):
        if key in train and train[key] is not None and (not isinstance(train[key], int) or train[key] < 1):
            err.add(f"train.{key}", f"must be an integer >= 1, got {train[key]!r}")
    if "epochs" not in train:
        err.add("train.epochs", "required (the budget per trial, and ASHA's max_t)")
    for key in NESTED_FIELDS:
        if key in train and not isinstance(train[key], dict):
            err.add(f"train.{key}", "must be a mapping")
    for key, bound in NONNEGATIVE.items():
        value = (train.get("opt_kwargs") or {}).get(key) if isinstance(train.get("opt_kwargs"), dict) else None
        if _is_num(value) and not _ok(value, bound):
            err.add(f"train.opt_kwargs.{key}", f"must be {bound}, got {value}")
    for key in ("data", "eval_data"):
        if isinstance(train.get(key), str):
            train[key] = _resolve_data(train[key], base, f"train.{key}", err)
    return train


def _resolve_data(value: str, base: Path, where: str, err: _Errors) -> str:
    """A name without a path separator or suffix (``digits``) is a built-in set; anything else is a
    path, relative to the YAML file's folder, made absolute because Tune changes each trial's cwd."""
    if "/" not in value and "." not in value:
        return value
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if not p.exists():
        err.add(where, f"data path not found: {p} (relative paths resolve against the YAML file's folder)")
    return str(p)


def _check_space(space: Dict[str, Any], fields: tuple, train: Dict[str, Any], err: _Errors) -> Dict[str, Dict[str, Any]]:
    if not space:
        err.add("space", "required: at least one parameter to search")
    seen: Dict[str, Dict[str, Any]] = {}
    for name, spec in space.items():
        where = f"space.{name}"
        head, _, tail = str(name).partition(".")
        if head not in fields or (tail and head not in NESTED_FIELDS) or (head in NESTED_FIELDS and not tail):
            err.add(where, f"must be a TrainConfig field or {'/'.join(NESTED_FIELDS)}.<key>; fields: {', '.join(fields)}")
        elif not tail and name in train:
            err.add(where, f"also fixed as train.{name}; keep one of the two")
        if not isinstance(spec, dict):
            err.add(where, "must be a mapping like {type: loguniform, low: 1e-4, high: 0.1}")
            continue
        _check_param(where, spec, seen, err)
        bound = NONNEGATIVE.get(tail) if head == "opt_kwargs" else None
        if bound and _is_num(spec.get("low")) and not _ok(spec["low"], bound):
            err.add(f"{where}.low", f"must be {bound} ({tail} of a DC decomposition), got {spec['low']}")
        seen[name] = spec
    return {k: dict(v) for k, v in space.items() if isinstance(v, dict)}


def _check_param(where: str, spec: Dict[str, Any], seen: Dict[str, Dict[str, Any]], err: _Errors) -> None:
    kind = spec.get("type")
    allowed = {"type", "when", "times", "over"}
    if kind not in SPACE_TYPES:
        err.add(f"{where}.type", f"must be one of {', '.join(SPACE_TYPES)}, got {kind!r}")
    elif kind == "choice":
        allowed |= {"values"}
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            err.add(f"{where}.values", "must be a non-empty list")
    else:
        allowed |= {"low", "high", "log", "step"}
        low, high = spec.get("low"), spec.get("high")
        for key, val in (("low", low), ("high", high)):
            if not _is_num(val):
                err.add(f"{where}.{key}", f"must be a number, got {val!r}")
        if _is_num(low) and _is_num(high):
            if kind == "loguniform" and low <= 0:
                err.add(f"{where}.low", "must be > 0 for loguniform")
            if low >= high:
                err.add(f"{where}.high", f"must be > low ({low})")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                err.add(f"{where}", "int bounds must be integers")
    for key in spec:
        if key not in allowed:
            err.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    for rel in ("times", "over"):
        other_name = spec.get(rel)
        if other_name is None:
            continue
        other = seen.get(other_name)
        if other is None:
            err.add(f"{where}.{rel}", f"must name a parameter declared above it in space, got {other_name!r}")
        elif other.get("type") == "choice" and not all(_is_num(v) for v in other.get("values", [])):
            err.add(f"{where}.{rel}", f"{other_name} must be numeric")
        if kind == "choice":
            err.add(f"{where}.{rel}", "only numeric parameters can be scaled by another")
    if spec.get("times") is not None and spec.get("over") is not None:
        err.add(where, "use one of times/over")
    when = spec.get("when")
    if when is not None:
        if not isinstance(when, dict) or not when:
            err.add(f"{where}.when", "must be a mapping {parameter: value or [values]}")
        else:
            for cond in when:
                if cond not in seen:
                    err.add(f"{where}.when.{cond}", "must name a parameter declared above it in space")


def _check_tune_config(tc: Dict[str, Any], err: _Errors) -> Dict[str, Any]:
    from ray.tune import TuneConfig

    known = {f.name for f in dataclasses.fields(TuneConfig)} - {"search_alg", "scheduler", "trial_name_creator", "trial_dirname_creator"}
    for key in tc:
        if key not in known:
            err.add(f"tune_config.{key}", f"not a ray.tune.TuneConfig argument; known: {', '.join(sorted(known))}")
    tc.setdefault("metric", "val_acc")
    tc.setdefault("mode", "max" if str(tc["metric"]).endswith("acc") else "min")
    tc.setdefault("num_samples", 4)
    tc.setdefault("reuse_actors", True)  # one worker process imports torch/timm/dcanets once
    if tc["metric"] not in METRICS:
        err.add("tune_config.metric", f"must be one of {', '.join(METRICS)}, got {tc['metric']!r}")
    if tc["mode"] not in ("min", "max"):
        err.add("tune_config.mode", f"must be min or max, got {tc['mode']!r}")
    if not isinstance(tc["num_samples"], int) or tc["num_samples"] < 1:
        err.add("tune_config.num_samples", f"must be an integer >= 1, got {tc['num_samples']!r}")
    for key in ("time_budget_s", "max_concurrent_trials"):
        if tc.get(key) is not None and (not _is_num(tc[key]) or tc[key] <= 0):
            err.add(f"tune_config.{key}", f"must be > 0, got {tc[key]!r}")
    return tc


def _check_kwargs(where: str, cls: Any, kwargs: Dict[str, Any], err: _Errors, reserved=(), name: str = "") -> None:
    params = inspect.signature(cls).parameters
    for key in kwargs:
        if key in reserved:
            err.add(f"{where}.{key}", "set it in tune_config, which passes it to every component")
        elif key not in params:
            err.add(f"{where}.{key}", f"not an argument of {name or cls.__name__}; known: {', '.join(p for p in params if p not in reserved)}")


def _check_search_alg(sa: Dict[str, Any], err: _Errors) -> Dict[str, Any]:
    import optuna

    kind = sa.pop("type", "OptunaSearch")
    if str(kind).lower() not in ("optunasearch", "optuna"):
        err.add("search_alg.type", f"only OptunaSearch is supported, got {kind!r}")
    sampler = dict(sa.pop("sampler", None) or {"type": "TPESampler"})
    s_type = sampler.pop("type", "TPESampler")
    if s_type not in SAMPLERS:
        err.add("search_alg.sampler.type", f"must be one of {', '.join(SAMPLERS)}, got {s_type!r}")
    else:
        _check_kwargs("search_alg.sampler", getattr(optuna.samplers, s_type), sampler, err)
    sampler.setdefault("seed", 0)
    for key in sa:
        if key not in ("points_to_evaluate",):
            err.add(f"search_alg.{key}", "unknown key; allowed: type, sampler, points_to_evaluate")
    return {"type": "OptunaSearch", "sampler": {"type": s_type, **sampler}, **sa}


def _check_scheduler(sc: Dict[str, Any], train: Dict[str, Any], err: _Errors) -> Dict[str, Any]:
    from ray.tune import schedulers

    kind = sc.pop("type", "ASHAScheduler")
    kind = SCHEDULERS.get(str(kind).lower(), kind)
    cls = getattr(schedulers, str(kind), None)
    if kind not in SCHEDULERS.values() or cls is None:
        err.add("scheduler.type", f"must be one of {', '.join(SCHEDULERS.values())}, got {kind!r}")
        return {"type": kind, **sc}
    _check_kwargs("scheduler", cls, sc, err, reserved=("metric", "mode"), name=str(kind))
    if kind != "FIFOScheduler":
        # the engine's epoch, not Tune's training_iteration, which restarts at 1 after --resume
        sc.setdefault("time_attr", "epoch")
    if kind in ("ASHAScheduler", "HyperBandScheduler") and isinstance(train.get("epochs"), int):
        sc.setdefault("max_t", train["epochs"])  # budget unit = one epoch
    if kind == "ASHAScheduler":
        if "grace_period" in sc and "max_t" in sc and sc["grace_period"] > sc["max_t"]:
            err.add("scheduler.grace_period", f"must be <= max_t ({sc['max_t']})")
    return {"type": kind, **sc}


def _check_resources(res: Dict[str, Any], err: _Errors) -> Dict[str, float]:
    out = {"cpu": res.pop("cpu", 1), "gpu": res.pop("gpu", 0)}
    for key in res:
        err.add(f"resources.{key}", "unknown key; allowed: cpu, gpu")
    if not _is_num(out["cpu"]) or out["cpu"] <= 0:
        err.add("resources.cpu", f"must be > 0, got {out['cpu']!r}")
    if not _is_num(out["gpu"]) or out["gpu"] < 0:
        err.add("resources.gpu", f"must be >= 0 (fractions share a GPU), got {out['gpu']!r}")
    return out


def _check_tracking(tr: Dict[str, Any], err: _Errors) -> Dict[str, Any]:
    for key in tr:
        if key not in ("uri", "experiment", "enabled"):
            err.add(f"tracking.{key}", "unknown key; allowed: uri, experiment, enabled")
    return {"uri": tr.get("uri"), "experiment": tr.get("experiment"), "enabled": tr.get("enabled", True)}


def check_registries(spec: TuneSpec) -> None:
    """Names only the plugins know (models, decompositions): checked on the driver after
    ``import dcanets``, still before Ray starts, so a typo costs no cluster time."""
    import timm
    import timm.optim

    import dcanets  # noqa: F401  (registers the plugins' models and decompositions into timm)

    err = _Errors()
    opts = set(timm.optim.list_optimizers())
    for field, known, ok in (("model", None, timm.is_model), ("opt", opts, lambda n: n.lower().split("_")[-1] in opts)):
        if field in spec.train and not ok(spec.train[field]):
            err.add(f"train.{field}", f"unknown {field} {spec.train[field]!r}" + _near(spec.train[field], known))
        for i, value in enumerate(spec.space.get(field, {}).get("values", [])):
            if not ok(value):
                err.add(f"space.{field}.values[{i}]", f"unknown {field} {value!r}" + _near(value, known))
    err.raise_if_any(spec.path)


def _near(name: str, known: Optional[set]) -> str:
    from dcanets.plugins import did_you_mean

    if known is None:
        import timm

        known = set(timm.list_models())
    return did_you_mean(name, known)


class DefineByRun:
    """The ``space`` section as an Optuna define-by-run function (picklable, so Tuner.restore
    restores it). Order matters: ``when`` and ``times`` refer to parameters declared above."""

    def __init__(self, space: Dict[str, Dict[str, Any]]) -> None:
        self.space = space

    def __call__(self, trial: Any) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        for name, spec in self.space.items():
            if not self._active(spec.get("when"), values):
                continue
            scaled = spec.get("times") or spec.get("over")
            key = f"{name}{DERIVED}" if scaled else name
            values[name] = self._suggest(trial, key, spec)
            if spec.get("times"):
                values[name] *= values[spec["times"]]  # e.g. rho = fraction * lam
            elif spec.get("over"):
                values[name] /= values[spec["over"]]   # e.g. rho = fraction * lam = fraction / lr
        return values

    @staticmethod
    def _active(when: Optional[Dict[str, Any]], values: Dict[str, Any]) -> bool:
        for key, want in (when or {}).items():
            allowed = want if isinstance(want, list) else [want]
            if key not in values or values[key] not in allowed:
                return False
        return True

    @staticmethod
    def _suggest(trial: Any, key: str, spec: Dict[str, Any]) -> Any:
        kind = spec["type"]
        if kind == "choice":
            return trial.suggest_categorical(key, spec["values"])
        if kind == "int":
            return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=spec.get("step", 1),
                                     log=bool(spec.get("log", False)))
        log = kind == "loguniform" or bool(spec.get("log", False))
        return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=log,
                                   step=None if log else spec.get("step"))


def trial_train_config(base: Dict[str, Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """Fixed train fields overlaid with one trial's sampled values (``opt_kwargs.rho`` nests)."""
    cfg = copy.deepcopy(base)
    for name, value in params.items():
        if DERIVED in name:
            continue
        head, _, tail = name.partition(".")
        if tail:
            cfg.setdefault(head, {})
            cfg[head] = {**(cfg[head] or {}), tail: value}
        else:
            cfg[name] = value
    return cfg


def build_search_alg(spec: TuneSpec):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler_kwargs = dict(spec.search_alg["sampler"])
    sampler = getattr(optuna.samplers, sampler_kwargs.pop("type"))(**sampler_kwargs)
    extra = {k: v for k, v in spec.search_alg.items() if k not in ("type", "sampler")}
    return OptunaSearch(space=DefineByRun(spec.space), metric=spec.metric, mode=spec.mode,
                        sampler=sampler, **extra)


def build_scheduler(spec: TuneSpec):
    from ray.tune import schedulers

    kwargs = {k: v for k, v in spec.scheduler.items() if k != "type"}
    return getattr(schedulers, spec.scheduler["type"])(**kwargs)


def is_finite(x: Any) -> bool:
    return _is_num(x) and math.isfinite(x)
