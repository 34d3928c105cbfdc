"""dcanets: shortcut networks through the Difference-of-Convex Algorithm.

Importing the package loads every ``dcanets`` plugin (built-in and third-party) and registers
their models and decompositions into timm, so ``timm.create_model("negnet18")`` and
``timm.optim.create_optimizer_v2(model, "<decomposition>")`` work after ``import dcanets``.
"""
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

get_plugin_manager()

__all__ = [
    "hookimpl", "PluginError", "get_plugin_manager", "list_models", "list_decompositions",
    "list_plugins", "register_plugin", "unregister_plugin", "__version__",
]
