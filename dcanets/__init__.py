"""dcanets: shortcut networks through the Difference-of-Convex Algorithm.

Importing the package loads every ``dcanets`` plugin (built-in and third-party) and registers
their models and decompositions into timm, so ``timm.create_model("negnet18")`` and
``timm.optim.create_optimizer_v2(model, "<decomposition>")`` work after ``import dcanets``.
``dcanets.load_model("runs:/<run_id>/best_model")`` rebuilds the best model of a ``dcanets tune``
search.
"""
from dcanets.engine.export import load_model
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


try:
    get_plugin_manager()
except PluginError:
    # The command reports a broken plugin in one line (and `dcanets --help` still works): it calls
    # get_plugin_manager() again, which raises the same error. Anywhere else the import fails.
    if not _started_as_command():
        raise

__all__ = [
    "hookimpl", "PluginError", "get_plugin_manager", "list_models", "list_decompositions",
    "list_plugins", "register_plugin", "unregister_plugin", "load_model", "__version__",
]
