"""The dcanets plugin contract.

A plugin is any module or object with functions decorated by ``dcanets.hookimpl`` whose names
match the specs below. The built-in architectures and decompositions are plugins listed in code
(``DEFAULT_PLUGINS`` in ``dcanets/plugins.py``) and implement these same hooks; a third-party
package declares its plugin under the ``dcanets`` entry-point group (docs/plugins.md).

Both hooks are collected once per process (on ``import dcanets``), each implementation called
on its own so that an error can name the plugin that raised it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import pluggy

if TYPE_CHECKING:
    import timm.optim

hookspec = pluggy.HookspecMarker("dcanets")
hookimpl = pluggy.HookimplMarker("dcanets")


@hookspec
def dcanets_register_models() -> Sequence[Callable]:
    """Return the model entry points this plugin adds to timm's model registry.

    Each item is a timm-style builder ``fn(pretrained: bool = False, **kwargs) -> nn.Module``;
    it is registered under ``fn.__name__`` with ``timm.models.register_model``. Do not decorate
    it with ``register_model`` yourself: dcanets registers it so that it can refuse names that
    timm or another plugin already has. Default cfgs are read, as timm does, from the
    ``default_cfgs`` attribute of the builder's module (``timm.models.generate_default_cfgs``),
    so define that table in the module before the builders.

    Called once per process. Every implementation's list is registered; a name that clashes
    with timm or with another plugin is an error naming both.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this


@hookspec
def dcanets_register_decompositions() -> Sequence[timm.optim.OptimInfo]:
    """Return DC decompositions of a training loss, as optimizers for timm's registry.

    Each item is a ``timm.optim.OptimInfo`` whose ``opt_class`` is a ``torch.optim.Optimizer``
    accepting ``(params, lr, weight_decay, **defaults)``; params may be parameter groups, as
    ``timm.optim.create_optimizer_v2`` passes them. The name must be lower case without ``_``
    (timm splits optimizer names on ``_`` to read prefixes such as ``lookahead_``). After
    ``import dcanets``, ``create_optimizer_v2(model, name, ...)`` builds it.

    Called once per process. Every implementation's list is registered; a name timm or another
    plugin already has is an error naming both.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this
