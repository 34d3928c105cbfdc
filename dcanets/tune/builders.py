"""The Ray Tune and Optuna objects of a validated search file (``dcanets.tune.schema.TuneSpec``).

Why apart from the schema: the schema says what a search file may hold and runs before anything
starts; these build what runs (the define-by-run space, the sampler and search algorithm, the
scheduler, ``TuneConfig``, ``FailureConfig``) and map one trial's sampled values back onto its
``TrainConfig`` fields. Each section maps one-to-one onto the object of the same name, its
options as keyword arguments (unset ones left to Ray's and Optuna's defaults); ``short_params``
writes a trial's sampled values back on one line.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

from pydantic import BaseModel

from dcanets.tune import schema

DERIVED = ":fraction"  # suffix of the sampled factor of a `times:` parameter (never a TrainConfig key)


def plain(section: BaseModel) -> Dict[str, Any]:
    """A section's values as Ray and Optuna take them (and MLflow logs them): unset options left out."""
    return section.model_dump(exclude_none=True)


def plain_space(space: Dict[str, schema.SpaceParam]) -> Dict[str, Dict[str, Any]]:
    """The ``space`` section as written (its keys only, typed), in declaration order."""
    return {name: param.model_dump(exclude_unset=True) for name, param in space.items()}


class DefineByRun:
    """The ``space`` section as an Optuna define-by-run function (picklable, so Tuner.restore
    restores it). Order matters: ``when`` and ``times`` refer to parameters declared above.
    It holds the space as plain data (``plain_space``): that is what ``tuner.pkl`` keeps."""

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
        if kind in ("choice", "categorical"):
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


def trial_params(base: Dict[str, Any], sampled: Mapping[str, Any]) -> Dict[str, Any]:
    """What a trial's MLflow run records as params: its whole effective TrainConfig (the fixed
    fields, the sampled values, the defaults; not ``output``, which is the worker's), so that
    ``params.opt`` or ``params.model`` filter trials, and the sampled factors of ``times:``/``over:``."""
    from dcanets.engine.config import ConfigError, TrainConfig

    cfg = trial_train_config(base, dict(sampled))
    try:
        full = TrainConfig.from_dict(cfg).to_dict()
    except ConfigError:  # the trial fails with this error itself; its run keeps what it was given
        full = cfg
    full.pop("output", None)
    return {**full, **{k: v for k, v in sampled.items() if DERIVED in k}}


def short_params(config: Mapping[str, Any]) -> str:
    """A trial's sampled values on one line (``lr=0.05 momentum=0.9``), without the sampled factors."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()
                    if DERIVED not in k)


def build_search_alg(spec: schema.TuneSpec) -> Any:
    """``OptunaSearch`` over the define-by-run space, with the sampler of ``search_alg.sampler``."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler_kwargs = plain(spec.search_alg.sampler)
    sampler = getattr(optuna.samplers, sampler_kwargs.pop("type"))(**sampler_kwargs)
    extra = {k: v for k, v in plain(spec.search_alg).items() if k not in ("type", "sampler")}
    return OptunaSearch(space=DefineByRun(plain_space(spec.space)), metric=spec.metric, mode=spec.mode,
                        sampler=sampler, **extra)


def build_scheduler(spec: schema.TuneSpec) -> Any:
    from ray.tune import schedulers

    kwargs = {k: v for k, v in plain(spec.scheduler).items() if k != "type"}
    return getattr(schedulers, spec.scheduler.type)(**kwargs)


def build_tune_config(spec: schema.TuneSpec) -> Any:
    """``ray.tune.TuneConfig``: the ``tune_config`` section with the search algorithm and scheduler."""
    from ray import tune

    kwargs = plain(spec.tune_config)
    if spec.resources.workers > 1:  # Tune cannot reset a gang's driver for the next trial: its thread waits in fit()
        kwargs["reuse_actors"] = False
    return tune.TuneConfig(search_alg=build_search_alg(spec), scheduler=build_scheduler(spec), **kwargs)


def build_failure_config(spec: schema.TuneSpec) -> Any:
    from ray import tune

    return tune.FailureConfig(**plain(spec.failure_config))


# what a gang trial (resources.workers > 1) reserves for itself: memory only, never a CPU or GPU its
# own workers could need (dcanets.tune.gang says why); the workers ask for theirs through Ray Train
GANG_DRIVER = {"cpu": 0, "gpu": 0, "memory": 256 * 2**20}


def trial_resources(spec: schema.TuneSpec) -> Dict[str, float]:
    """What each trial asks Ray for (``tune.with_resources``): its CPUs and GPUs, or a gang's driver's."""
    if spec.resources.workers > 1:
        return dict(GANG_DRIVER)
    return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


# A search interrupted before the space builder moved here has a tuner.pkl that names
# ``dcanets.tune.schema.DefineByRun``; Ray resolves that name when it restores the search, always
# after this module is imported (dcanets.tune.search imports it). Naming the class there too keeps
# such searches resumable without schema importing this module back.
schema.DefineByRun = DefineByRun  # type: ignore[attr-defined]


__all__ = ["DERIVED", "GANG_DRIVER", "DefineByRun", "build_failure_config", "build_scheduler", "build_search_alg",
           "build_tune_config", "plain", "plain_space", "short_params", "trial_params", "trial_resources",
           "trial_train_config"]
