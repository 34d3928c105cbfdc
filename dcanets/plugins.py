"""One plugin manager per process: load the plugins, then push what they add into timm.

Loading happens once, on ``import dcanets`` (and so inside every Ray worker that imports it), in
two steps on the same pluggy manager with the same hooks:

1. the built-ins, :data:`DEFAULT_PLUGINS`, imported by module name as pytest and llm do: adding
   one needs no reinstall, and stale install metadata cannot lose the core models;
2. third-party packages, from the ``dcanets`` entry-point group (only they use it). They are
   loaded one by one rather than with ``load_setuptools_entrypoints`` so that a plugin which
   fails to import is reported by name instead of as a bare traceback.

Disabling: ``DCANETS_DISABLE_PLUGINS=name,other`` skips those plugins, third-party or built-in,
except the :data:`ESSENTIAL_PLUGINS` (like pytest's essential plugins): the engine's default model,
its decompositions and the example searches rely on them, so naming one there is an error, not a
silent no-op. The other built-ins are single-paper models and may be skipped.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Collection, Dict, Iterator, List, Optional, Tuple

import pluggy

from dcanets import _compat, hookspecs

GROUP = "dcanets"
DISABLE_ENV = "DCANETS_DISABLE_PLUGINS"

#: The built-in plugins (package ``dcanets_plugins``, folder ``plugins/``), registered in this order
#: before any third-party plugin. Each is registered under its last dotted component: ``shortcut``.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "dcanets_plugins.shortcut",
    "dcanets_plugins.cifar_shortcut",
    "dcanets_plugins.decompositions",
    "dcanets_plugins.double_resnet",
    "dcanets_plugins.teacher_student",
    "dcanets_plugins.multibranch",
)

#: Built-ins that cannot be disabled: the shortcut families and the decompositions are what
#: dcanets is; the other built-ins are single-paper models a user may leave out of ``dcanets models``.
ESSENTIAL_PLUGINS: frozenset[str] = frozenset({"shortcut", "cifar_shortcut", "decompositions"})


class PluginError(RuntimeError):
    """A plugin failed to load or tried to take a name that is already taken."""


@dataclass(frozen=True)
class Registered:
    """One name a plugin added to a timm registry."""

    name: str
    plugin: str
    kind: str  # "model" or "decomposition"


_pm: Optional[pluggy.PluginManager] = None
_load_error: Optional[PluginError] = None  # why loading failed: raised again by every later call
_registered: Dict[Tuple[str, str], Registered] = {}


def plugin_name(module: str) -> str:
    """The name a built-in is registered (and disabled) under: its module's last component."""
    return module.rpartition(".")[2]


def _disabled() -> set:
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    essential = sorted(names & ESSENTIAL_PLUGINS)
    if essential:
        raise PluginError(
            f"{DISABLE_ENV} names the essential built-in plugin(s) {', '.join(essential)}, which cannot be "
            f"disabled; only {', '.join(sorted({plugin_name(m) for m in DEFAULT_PLUGINS} - ESSENTIAL_PLUGINS))} "
            "and third-party plugins can."
        )
    return names


def _load_builtins(pm: pluggy.PluginManager) -> None:
    disabled = _disabled()
    for module in DEFAULT_PLUGINS:
        name = plugin_name(module)
        if name in disabled:
            continue
        try:
            plugin = importlib.import_module(module)
        except Exception as exc:  # a broken dcanets install: still say which plugin
            raise PluginError(f"dcanets built-in plugin '{name}' ({module}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        pm.register(plugin, name=name)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    disabled = _disabled()
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name in disabled or ep.value in DEFAULT_PLUGINS:  # the latter: a stale dcanets install
            continue
        if pm.has_plugin(ep.name):
            raise PluginError(f"dcanets plugin entry point '{ep.name}' ({ep.value}) has the name of a plugin "
                              "already loaded; rename the entry point.")
        try:
            plugin = ep.load()
        except Exception as exc:  # any error in third-party code, reported with its name
            raise PluginError(
                f"dcanets plugin '{ep.name}' ({ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or set "
                f"{DISABLE_ENV}={ep.name} to skip it."
            ) from exc
        pm.register(plugin, name=ep.name)


def _collect(pm: pluggy.PluginManager, hook_name: str, plugins: Collection[object]) -> Iterator[Tuple[str, object]]:
    """Call one hook on each of ``plugins``, one implementation at a time, so a failure names its plugin.

    Each call goes through pluggy (a subset hook caller holding only that implementation), so
    pluggy's tracing and call monitoring see it as they would see ``pm.hook.<name>()``.
    """
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.plugin not in plugins:
            continue
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        try:
            results = pm.subset_hook_caller(hook_name, remove_plugins=others)()
        except Exception as exc:
            raise PluginError(
                f"dcanets plugin '{impl.plugin_name}' raised in {hook_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for items in results:
            for item in items or ():
                yield impl.plugin_name, item


def _claim(name: str, plugin: str, kind: str, taken_by_timm: Optional[str]) -> None:
    """Record that ``plugin`` adds ``name``, or say who already has it."""
    previous = _registered.get((kind, name))
    if previous is not None:
        raise PluginError(
            f"dcanets plugin '{plugin}' registers {kind} '{name}', which plugin "
            f"'{previous.plugin}' already registered; rename one of them."
        )
    if taken_by_timm is not None:
        raise PluginError(
            f"dcanets plugin '{plugin}' registers {kind} '{name}', which timm already has "
            f"({taken_by_timm}); rename it, nothing is shadowed."
        )
    _registered[(kind, name)] = Registered(name, plugin, kind)


def _register_models(pm: pluggy.PluginManager, plugins: Collection[object]) -> None:
    import timm.models

    for plugin, fn in _collect(pm, "dcanets_register_models", plugins):
        name = getattr(fn, "__name__", None)
        if not callable(fn) or not name:
            raise PluginError(f"dcanets plugin '{plugin}' returned a non-function model entry {fn!r}")
        owner = None
        if timm.models.is_model(name) and ("model", name) not in _registered:
            owner = timm.models.model_entrypoint(name).__module__
        _claim(name, plugin, "model", owner)
        timm.models.register_model(fn)


def _register_decompositions(pm: pluggy.PluginManager, plugins: Collection[object]) -> None:
    from timm.optim import OptimInfo, list_optimizers

    for plugin, info in _collect(pm, "dcanets_register_decompositions", plugins):
        if not isinstance(info, OptimInfo):
            raise PluginError(f"dcanets plugin '{plugin}' returned {info!r}, expected a timm.optim.OptimInfo")
        name = info.name
        if name != name.lower() or "_" in name:
            raise PluginError(
                f"dcanets plugin '{plugin}' registers decomposition '{name}': names must be lower "
                "case with no '_' (timm reads 'a_b' as prefix 'a' + optimizer 'b')"
            )
        known = name in list_optimizers() and ("decomposition", name) not in _registered
        _claim(name, plugin, "decomposition", "timm.optim" if known else None)
        _compat.register_optimizer(info)


def _push(pm: pluggy.PluginManager, plugins: Collection[object]) -> None:
    """Register into timm what ``plugins`` (already on ``pm``) add, and nothing of the others."""
    _register_models(pm, plugins)
    _register_decompositions(pm, plugins)


def register_plugin(plugin: object, name: Optional[str] = None) -> str:
    """Register a plugin object at run time (tests, notebooks) and push its additions into timm.

    Only this plugin's hooks are called; those already loaded are not run again. If what it adds
    clashes, the plugin is unregistered again, with whatever it had added, before the error propagates.
    """
    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:  # pluggy: blocked (set_blocked); nothing of it is loaded
        raise PluginError(f"dcanets plugin '{name}' is blocked on the plugin manager")
    try:
        _push(pm, [plugin])
    except PluginError:
        unregister_plugin(registered)
        raise
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin and every name it added from timm's registries."""
    get_plugin_manager().unregister(name=name)
    for key, entry in list(_registered.items()):
        if entry.plugin != name:
            continue
        del _registered[key]
        if entry.kind == "model":
            _compat.unregister_model(entry.name)
        else:
            _compat.unregister_optimizer(entry.name)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created and loaded on first use: built-ins, then entry points."""
    global _pm, _load_error
    if _load_error is not None:  # a half-loaded registry is never handed out
        raise _load_error
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        try:
            _load_builtins(pm)
            _load_entry_points(pm)
            _pm = pm  # set before pushing so a plugin that imports dcanets does not recurse
            _push(pm, pm.get_plugins())
        except PluginError as exc:
            _load_error = exc
            raise
    return _pm


def _entries(kind: str) -> Dict[str, str]:
    get_plugin_manager()
    return {r.name: r.plugin for r in sorted(_registered.values(), key=lambda r: r.name) if r.kind == kind}


def list_models() -> Dict[str, str]:
    """Model names added to timm by plugins, each mapped to the plugin that added it."""
    return _entries("model")


def list_decompositions() -> Dict[str, str]:
    """Decomposition (optimizer) names added to timm by plugins, mapped to their plugin."""
    return _entries("decomposition")


def list_plugins() -> List[Tuple[str, str]]:
    """(plugin name, module or object) for every loaded plugin."""
    return [(name, getattr(p, "__name__", repr(p))) for name, p in get_plugin_manager().list_name_plugin()]


__all__ = [
    "DEFAULT_PLUGINS", "ESSENTIAL_PLUGINS", "PluginError", "get_plugin_manager", "register_plugin",
    "unregister_plugin", "list_models", "list_decompositions", "list_plugins",
]
