"""Names a user types: the closest known ones to a misspelt name, and the one check of a model name.

At the bottom of the layers, beside ``validation.py`` (whose unknown-key messages use
:func:`did_you_mean`): it imports nothing of dcanets when it is imported, so the engine, the
commands and the search schema all say "unknown model" in the same words.
"""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean: a, b"`` for the registry names closest to a misspelt one, or ``""``."""
    close = difflib.get_close_matches(str(name), sorted(map(str, known)), n=4)
    return f"; did you mean: {', '.join(close)}" if close else ""


def check_model(name: str) -> None:
    """A one-line ValueError unless timm's model registry has ``name``, the plugins' models included.

    The plugins are loaded first (as ``import dcanets`` does), so a Ray worker or a fresh process
    knows the dcanets models too; the message offers the closest names and says where to list them.
    """
    import timm

    from dcanets.plugins import get_plugin_manager

    get_plugin_manager()  # registers the plugins' models into timm (once per process)
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}'{did_you_mean(name, timm.list_models())}; "
                         "`dcanets models` lists the plugins' models, timm.list_models() every model")


__all__ = ["did_you_mean", "check_model"]
