"""One plugin manager per process: load the plugins, then push what they add into timm.

Loading happens once, on ``import dcanets`` (and so inside every Ray worker that imports it).
Entry points are loaded one by one rather than with ``load_setuptools_entrypoints`` so that a
plugin which fails to import is reported by name instead of as a bare traceback.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import pluggy

from dcanets import hookspecs

GROUP = "dcanets"
DISABLE_ENV = "DCANETS_DISABLE_PLUGINS"


class PluginError(RuntimeError):
    """A plugin failed to load or tried to take a name that is already taken."""


@dataclass(frozen=True)
class Registered:
    """One name a plugin added to a timm registry."""

    name: str
    plugin: str
    kind: str  # "model" or "decomposition"


_pm: Optional[pluggy.PluginManager] = None
_registered: Dict[Tuple[str, str], Registered] = {}


def _disabled() -> set:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name in _disabled() or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # any error in third-party code, reported with its name
            raise PluginError(
                f"dcanets plugin '{ep.name}' ({ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or set "
                f"{DISABLE_ENV}={ep.name} to skip it."
            ) from exc
        pm.register(plugin, name=ep.name)


def _collect(pm: pluggy.PluginManager, hook_name: str) -> Iterable[Tuple[str, object]]:
    """Call one hook plugin by plugin so that a failure names its plugin."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            items = impl.function() or ()
        except Exception as exc:
            raise PluginError(
                f"dcanets plugin '{impl.plugin_name}' raised in {hook_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for item in items:
            yield impl.plugin_name, item


def _claim(name: str, plugin: str, kind: str, taken_by_timm: Optional[str]) -> bool:
    """Record that ``plugin`` adds ``name``; False when it already did (a repeated load)."""
    previous = _registered.get((kind, name))
    if previous is not None:
        if previous.plugin == plugin:
            return False
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
    return True


def _register_models(pm: pluggy.PluginManager) -> None:
    import timm.models

    for plugin, fn in _collect(pm, "dcanets_register_models"):
        name = getattr(fn, "__name__", None)
        if not callable(fn) or not name:
            raise PluginError(f"dcanets plugin '{plugin}' returned a non-function model entry {fn!r}")
        owner = None
        if timm.models.is_model(name) and (("model", name) not in _registered):
            owner = timm.models.model_entrypoint(name).__module__
        if _claim(name, plugin, "model", owner):
            timm.models.register_model(fn)


def _register_decompositions(pm: pluggy.PluginManager) -> None:
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    for plugin, info in _collect(pm, "dcanets_register_decompositions"):
        if not isinstance(info, OptimInfo):
            raise PluginError(f"dcanets plugin '{plugin}' returned {info!r}, expected a timm.optim.OptimInfo")
        name = info.name
        if name != name.lower() or "_" in name:
            raise PluginError(
                f"dcanets plugin '{plugin}' registers decomposition '{name}': names must be lower "
                "case with no '_' (timm reads 'a_b' as prefix 'a' + optimizer 'b')"
            )
        known = name in default_registry._optimizers and ("decomposition", name) not in _registered
        if _claim(name, plugin, "decomposition", "timm.optim" if known else None):
            default_registry.register(info)


def register_plugin(plugin: object, name: Optional[str] = None) -> str:
    """Register a plugin object at run time (tests, notebooks) and push its additions into timm.

    If what it adds clashes, the plugin is unregistered again before the error propagates.
    """
    pm = get_plugin_manager()
    name = pm.register(plugin, name=name)
    try:
        _push(pm)
    except PluginError:
        unregister_plugin(name)
        raise
    return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin and every name it added from timm's registries."""
    from timm.models import _registry
    from timm.optim._optim_factory import default_registry

    get_plugin_manager().unregister(name=name)
    for key, entry in list(_registered.items()):
        if entry.plugin != name:
            continue
        del _registered[key]
        if entry.kind == "model":
            _registry._model_entrypoints.pop(entry.name, None)
            _registry._clear_model_entries(entry.name)
        else:
            default_registry._optimizers.pop(entry.name, None)


def _push(pm: pluggy.PluginManager) -> None:
    _register_models(pm)
    _register_decompositions(pm)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created and loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        _pm = pm  # set before pushing so a plugin that imports dcanets does not recurse
        _push(pm)
    return _pm


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean: a, b"`` for the registry names closest to a misspelt one, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), sorted(known), n=4)
    return f"; did you mean: {', '.join(close)}" if close else ""


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
    "PluginError", "get_plugin_manager", "register_plugin", "unregister_plugin",
    "list_models", "list_decompositions", "list_plugins", "did_you_mean",
]
