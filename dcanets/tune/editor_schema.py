"""The JSON Schema of a search file that an editor checks while you type (``dcanets tune --schema``,
shipped as ``tune_configs/tune.schema.json``; a YAML file points at it with a first line
``# yaml-language-server: $schema=./tune.schema.json``).

Why more than pydantic's schema of the models: the CLI refuses unknown keys everywhere, and so
must the schema, but three sections take another library's keyword arguments (``scheduler``,
``search_alg.sampler``, ``tune_config``), which pydantic models leave open; here they are listed
from the installed Ray Tune and Optuna. ``train.opt`` lists timm's optimizer names after ``import
dcanets``, so ``opt: sgdd`` is flagged by the editor too.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

from dcanets.tune.arguments import parameters, tune_config_arguments
from dcanets.tune.schema import SAMPLERS, SCHEDULERS, SearchFile

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:dcanets:tune.schema.json"  # the shipped copy: tune_configs/tune.schema.json


def json_schema() -> Dict[str, Any]:
    """The JSON Schema of a search file, for editors (``# yaml-language-server: $schema=...``).

    As strict as ``dcanets tune`` where a schema can be: every section refuses unknown keys. The
    sections whose keys are another library's arguments (``scheduler``, ``search_alg.sampler``,
    ``tune_config``) list them, read off the installed Ray Tune and Optuna (the union over the
    classes a section may name; ``dcanets tune`` then checks them per class), and ``train.opt``
    lists the optimizer names timm's registry holds after ``import dcanets`` (the plugins'
    decompositions, and ``lookahead_<name>``). So the file depends on the installed versions:
    ``tune_configs/tune.schema.json`` is this output for the versions the tests run with.
    """
    doc = SearchFile.model_json_schema()
    defs = doc["$defs"]
    _close(defs["Scheduler"], scheduler_arguments(), "argument of the scheduler class")
    _close(defs["Sampler"], sampler_arguments(), "argument of the sampler class")
    _close(defs["TuneConfigSection"], tune_config_arguments(), "ray.tune.TuneConfig argument")
    opt = defs["TrainSection"]["properties"]["opt"]
    opt["enum"] = optimizer_names()
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, **doc}


def _close(section: Dict[str, Any], arguments: Iterable[str], what: str) -> None:
    """``section`` refuses keys other than its properties and ``arguments`` (added, untyped)."""
    props = section.setdefault("properties", {})
    for name in arguments:
        props.setdefault(name, {"description": what})
    section["additionalProperties"] = False


def scheduler_arguments() -> List[str]:
    """Every keyword argument of the schedulers a search may name (``metric``/``mode``: tune_config's)."""
    from ray.tune import schedulers

    names = {p for kind in SCHEDULERS.values() for p in parameters(getattr(schedulers, kind), ("metric", "mode"))}
    return sorted(names)


def sampler_arguments() -> List[str]:
    """Every keyword argument of the Optuna samplers a search may name."""
    import optuna

    return sorted({p for kind in SAMPLERS for p in parameters(getattr(optuna.samplers, kind))})


def optimizer_names() -> List[str]:
    """timm's optimizer names after ``import dcanets``, and each wrapped in Lookahead."""
    import timm.optim

    import dcanets  # noqa: F401  (the plugins' decompositions into timm's registry)

    names = sorted(map(str, timm.optim.list_optimizers()))
    return names + [f"lookahead_{n}" for n in names]


__all__ = ["SCHEMA_DIALECT", "SCHEMA_ID", "json_schema", "optimizer_names", "sampler_arguments",
           "scheduler_arguments"]
