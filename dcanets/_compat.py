"""Every use of a private (``_``-prefixed) name of PyTorch, timm, Ray or MLflow, in one file.

A library may rename its private names in any release. Keeping each use here, behind a small
function that says why no public API serves, means a new release breaks in one known place and
``tests/test_compat.py`` names the library and version that changed, instead of a KeyError deep
inside plugin loading. Anything a public API can do does not belong here.

Today: timm's ``register_model`` and optimizer registry have no inverse and the optimizer registry
has no public register function; Ray's ``ResultGrid`` does not expose its trials' statuses,
``Tuner`` does not expose the callbacks ``Tuner.restore`` unpickled, Tune's default output
engine has no public switch that silences it, and a trial's checkpoint book keeps every metric with
each checkpoint unless an undocumented variable says otherwise; PyTorch's autograd engine does
not say publicly whether the running backward pass will execute a given graph node, nor whether a
``torch.func`` transform or forward-mode AD is active, and ``nn.Module`` does not say whether it
has forward hooks; timm's ``Lookahead`` does not expose the optimizer it wraps; a DataLoader with
persistent workers cannot be told to end them. MLflow is used through public APIs only.
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, List

if TYPE_CHECKING:
    import torch
    from timm.optim import OptimInfo


def will_engine_execute_node(node: "torch.autograd.graph.Node") -> bool:
    """Whether the backward pass now running will execute ``node`` (call it from inside a backward).

    ``dcanets.optim.counter.ShortcutTap`` asks it about a private sentinel leaf's AccumulateGrad
    node to tell a plain ``loss.backward()`` (every leaf accumulates) from ``torch.autograd.grad``
    or ``backward(inputs=...)`` (only the named inputs do), so curvature and fidelity probes through
    the same model are not tapped.
    """
    import torch

    # torch._C._will_engine_execute_node is what the public torch.autograd.graph.register_multi_grad_hook
    # uses (PyTorch 2.x); no public function asks the engine this.
    return bool(torch._C._will_engine_execute_node(node))


def autograd_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) or a forward-mode AD level is active.

    ``dcanets.layers.shortcut``'s fused block tail is an in-place ``autograd.Function`` with a
    backward only; under these it takes the plain-op path, which every transform supports.
    """
    import torch

    # Neither is public: torch.func has no "am I being transformed" query and forward_ad exposes
    # dual levels only as context managers (PyTorch 2.x: these two names).
    return bool(torch._C._are_functorch_transforms_active()) or torch.autograd.forward_ad._current_level >= 0


def has_forward_hooks(module: "torch.nn.Module") -> bool:
    """Whether calling ``module`` would run a forward (pre-)hook, its own or a global one.

    The fused block tail applies the block's ReLU without calling the module; where a hook
    watches (or replaces) that module's output it calls the module as before.
    """
    from torch.nn.modules import module as nn_module

    # nn.Module keeps its hooks in private dicts and has no public "has hooks" query (PyTorch 2.x).
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def wrapped_optimizers(optimizer: Any) -> List[Any]:
    """The optimizer and the ones it wraps, outermost first (timm's ``Lookahead`` around a DCA
    optimizer: ``[lookahead, dca]``; a plain optimizer: ``[optimizer]``).

    ``dcanets.optim.protocol`` hands the model and the batch to the innermost one, and
    ``dcanets.analysis.fidelity`` saves and restores every level around a trial step.
    """
    # timm's Lookahead keeps the optimizer it wraps in _base_optimizer (timm 1.0; base_optimizer
    # in older releases) and has no public accessor for it.
    out = [optimizer]
    while True:
        inner = getattr(out[-1], "_base_optimizer", None) or getattr(out[-1], "base_optimizer", None)
        if inner is None or any(inner is o for o in out):
            return out
        out.append(inner)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer of :func:`wrapped_optimizers` (``optimizer`` itself when it wraps none)."""
    return wrapped_optimizers(optimizer)[-1]


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


def tuner_callbacks(tuner: Any) -> List[Any]:
    """The Tune callbacks a ``Tuner`` will run: after ``Tuner.restore``, the copies unpickled from
    its ``tuner.pkl``; empty under Ray Client (``ray://``), where the Tuner lives on the cluster.

    ``dcanets tune --resume`` from shared storage points the restored MLflow tracker at this
    session's search folder, which may not be the folder the search started in.
    """
    # Tuner keeps its TunerInternal in _local_tuner (Ray 2.x); TunerInternal.get_run_config() is
    # public, and Tuner.restore accepts no RunConfig or callbacks to replace the pickled ones.
    local = getattr(tuner, "_local_tuner", None)
    return list(local.get_run_config().callbacks or []) if local is not None else []


def quiet_tune_output() -> None:
    """Make ``RunConfig(verbose=0)`` print nothing: ``dcanets tune`` prints its own progress lines.

    Ray Tune's default output engine prints at ``verbose=0`` too (a box with the experiment's
    configuration, "View detailed results here", a TensorBoard hint); its legacy reporter, which
    ``verbose=0`` silences, is
    selected by ``RAY_AIR_NEW_OUTPUT=0``, a variable Ray reads (``ray.tune.experimental.output``,
    Ray 2.x) but does not document as a setting. A value the user set is kept. Read when
    ``Tuner.fit`` starts, so call it before.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def tune_keeps_only_checkpoint_score() -> None:
    """Make Tune keep only the score attribute's metric with each checkpoint a trial registers.

    ``dcanets tune`` keeps every checkpoint registration in Ray's per-trial book (``CheckpointConfig``
    without ``num_to_keep``, see ``dcanets.tune.checkpoints``), which by default stores the full
    result (~40 metrics) with each: per trial and epoch in the driver's memory and in every
    experiment snapshot. ``TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE=1``, which Ray 2.60's
    ``_CheckpointManager.register_checkpoint`` reads at each registration (``ray.train.constants``:
    "a temporary solution to avoid CheckpointManager OOM"; not in Ray's documented variables),
    stores only ``checkpoint_score_attribute`` (none: an empty mapping); the latest checkpoint keeps
    its full result. A value the user set is kept. Read in the driver at every registration.
    """
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")


@contextlib.contextmanager
def ray_init_keeps_sigterm_handler() -> Iterator[None]:
    """Inside the block, ``ray.init`` leaves the driver's SIGTERM handler alone.

    ``ray.init`` (Ray 2.x) puts its own SIGTERM handlers in the driver as it starts: ``sys.exit(15)``
    first, then the local node's, which kills the node's processes and calls ``sys.exit(1)``. A
    SIGTERM in the seconds ``ray.init`` takes then raises SystemExit wherever start-up is, inside
    Ray's C++ core worker too: the driver aborted (exit 134, a C++ stack) and left Ray's agents
    running. Both handlers are installed through ``ray._private.utils.set_sigterm_handler``, made a
    no-op here, so that ``dcanets tune`` keeps its own handler (which only records the signal until
    Ray is up, then stops the search as a signal during the search would, Ray included). No public
    setting keeps them out.
    """
    import ray._private.utils as ray_utils

    installer = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = installer


__all__ = ["will_engine_execute_node", "autograd_transforms_active", "has_forward_hooks", "wrapped_optimizers",
           "unwrap_optimizer", "register_optimizer", "unregister_optimizer", "unregister_model", "result_grid_trials",
           "tuner_callbacks", "quiet_tune_output", "tune_keeps_only_checkpoint_score", "ray_init_keeps_sigterm_handler",
           "end_dataloader_workers"]


def end_dataloader_workers(loader: "torch.utils.data.DataLoader") -> None:
    """End the worker processes of a ``persistent_workers`` DataLoader now.

    torch keeps them in the loader's private ``_iterator`` until the loader is garbage-collected; a
    run that ended by an exception (its frames kept by the traceback) would leave them running, and
    workers forked for the next run in the same process inherit their pipes (a resume then waits
    5 s per worker at shutdown). ``_shutdown_workers`` is what the iterator's own ``__del__`` calls.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None
