"""dcanets: shortcut networks through the Difference-of-Convex Algorithm.

Importing the package loads every ``dcanets`` plugin (built-in and third-party) and registers
their models and decompositions into timm, so ``timm.create_model("negnet18")`` and
``timm.optim.create_optimizer_v2(model, "<decomposition>")`` work after ``import dcanets``.
``dcanets.load_model("runs:/<run_id>/best_model")`` rebuilds the best model of a ``dcanets tune``
search.
"""
from typing import TYPE_CHECKING, Any

from dcanets.hookspecs import hookimpl
from dcanets.plugins import (
    PluginError,
    get_plugin_manager,
    list_decompositions,
    list_models,
    list_plugins,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"


def _started_as_command() -> bool:
    """Whether this process is the ``dcanets`` command (``dcanets ...`` or ``python -m dcanets[.cli]``)."""
    import os
    import sys

    if os.path.basename(sys.argv[0]).split(".")[0] == "dcanets":
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("dcanets", "dcanets.cli") for a, b in zip(argv, argv[1:]))


if TYPE_CHECKING:
    from dcanets.engine.export import load_model


def __getattr__(name: str) -> Any:
    """``load_model`` on first use: it needs torch, which ``dcanets --help`` should not wait for."""
    if name == "load_model":
        from dcanets.engine.export import load_model

        return load_model
    raise AttributeError(f"module 'dcanets' has no attribute {name!r}")


if not _started_as_command():
    get_plugin_manager()
# The command loads the plugins itself once its flags are parsed (dcanets.cli.main), so that
# `dcanets <command> --help` and a mistyped flag answer without importing torch and timm, and a
# broken plugin is reported in one line.

__all__ = [
    "hookimpl", "PluginError", "get_plugin_manager", "list_models", "list_decompositions",
    "list_plugins", "register_plugin", "unregister_plugin", "load_model", "__version__",
]
