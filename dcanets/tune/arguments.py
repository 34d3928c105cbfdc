"""The keyword arguments of Ray Tune's and Optuna's classes, read off the installed versions.

Three sections of a search file are another library's keyword arguments (``tune_config``,
``scheduler``, ``search_alg.sampler``): the validation (``schema``) refuses keys those classes do
not take, and the editor schema (``editor_schema``) lists them. Both read them here, so neither
imports the other.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, List, Tuple


def parameters(target: Callable, reserved: Tuple[str, ...] = ()) -> List[str]:
    """The named parameters of ``target`` (``*args``/``**kwargs`` and ``reserved`` left out)."""
    return [p for p in inspect.signature(target).parameters if p not in reserved and p not in ("args", "kwargs")]


def tune_config_arguments() -> List[str]:
    """The ``ray.tune.TuneConfig`` arguments ``tune_config`` may set (search_alg and scheduler have sections)."""
    from ray.tune import TuneConfig

    return [f.name for f in dataclasses.fields(TuneConfig)
            if f.name not in ("search_alg", "scheduler", "trial_name_creator", "trial_dirname_creator")]


__all__ = ["parameters", "tune_config_arguments"]
