"""Every use of a private (``_``-prefixed) name of timm, Ray or MLflow, in one file.

A library may rename its private names in any release. Keeping each use here, behind a small
function that says why no public API serves, means a new release breaks in one known place and
``tests/test_compat.py`` names the library and version that changed, instead of a KeyError deep
inside plugin loading. Anything a public API can do does not belong here.

Today: timm's ``register_model`` and optimizer registry have no inverse and the optimizer registry
has no public register function; Ray's ``ResultGrid`` does not expose its trials' statuses. MLflow
is used through public APIs only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:
    from timm.optim import OptimInfo


def _optimizer_registry() -> Any:
    # timm.optim exports list_optimizers() and get_optimizer_info() to read the registry that
    # create_optimizer_v2() uses, but not the registry object itself, which is the only way to add
    # to it (timm 1.0: timm.optim._optim_factory.default_registry).
    from timm.optim._optim_factory import default_registry

    return default_registry


def register_optimizer(info: "OptimInfo") -> None:
    """Add ``info`` to the registry ``timm.optim.create_optimizer_v2`` builds optimizers from."""
    _optimizer_registry().register(info)  # OptimizerRegistry.register is public; the instance is not


def unregister_optimizer(name: str) -> None:
    """Remove an optimizer a plugin added (``dcanets.unregister_plugin``); a missing name is ignored."""
    # OptimizerRegistry has register() and register_alias() but no inverse; its dict is private.
    _optimizer_registry()._optimizers.pop(name, None)


def unregister_model(name: str) -> None:
    """Remove a model a plugin added, with its cfgs, so ``timm.is_model(name)`` is False again."""
    # timm.models.register_model has no inverse. timm itself clears a name's module, tag and cfg
    # entries with _clear_model_entries when a registration is overwritten; the entry point dict
    # is the one thing that function leaves.
    from timm.models import _registry

    _registry._model_entrypoints.pop(name, None)
    _registry._clear_model_entries(name)


def result_grid_trials(grid: Any) -> List[Any]:
    """The ``ray.tune.experiment.Trial`` objects behind a ``ResultGrid``, in the grid's order.

    ``dcanets tune`` reports each trial's status (TERMINATED, ERROR, PENDING...) as Tune holds it
    when ``Tuner.fit`` returns.
    """
    # ResultGrid exposes Result objects (error, metrics) and status counts, not per-trial status.
    # Public alternatives fall short: ray.tune.ExperimentAnalysis(grid.experiment_path) re-reads the
    # snapshot Tune writes *before* stopping the trials still running (RUNNING saved as PENDING, so a
    # search ended by time_budget_s would read as interrupted); a Callback's on_experiment_end sees
    # the final statuses, but Tuner.restore (--resume) runs an unpickled copy of the callbacks that
    # the driver cannot reach. ResultGrid is built from exactly these trials (Ray 2.x).
    return list(grid._experiment_analysis.trials)


__all__ = ["register_optimizer", "unregister_optimizer", "unregister_model", "result_grid_trials"]
