"""``dcanets <command>``: one entry point, one module per command.

Each command has its module in this package, exposing ``add_arguments(parser)`` and
``run(args) -> int`` (and optionally ``check(args)``, which validates the flags' values before the
plugins, and so torch and timm, are imported). Only the chosen command's module is imported, so
``dcanets models`` does not pay for importing Ray, and ``--help`` or a mistyped flag answers
within a second. Every error a user can fix ends in one line on stderr saying what to
fix, and exit status 2: a bad flag (argparse), a bad value or file (ValueError, OSError), a broken
plugin (PluginError; ``dcanets --help`` still works then). ``DCANETS_DEBUG=1`` shows the traceback
instead. Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Any, List, NoReturn, Optional

from dcanets.cli.flags import unrecognized

# command -> (module exposing add_arguments/run, one-line help)
COMMANDS = {
    "models": ("dcanets.cli.models", "list the models dcanets plugins added to timm"),
    "plugins": ("dcanets.cli.models", "list loaded dcanets plugins and what each registered"),
    "train": ("dcanets.cli.train", "train one timm model with any timm optimizer (DCA ones included)"),
    "tune": ("dcanets.cli.tune", "search hyper-parameters with Ray Tune + Optuna, logged to MLflow"),
    "curvature": ("dcanets.cli.curvature", "estimate Hessian extremes of a model's loss and advise lr, rho, lambda"),
    "fidelity": ("dcanets.cli.fidelity", "cosine of an optimizer's steps with the shortcut network's gradient"),
    "shortcut-prior": ("dcanets.cli.shortcut_prior", "teacher-student, convex relaxation, deep linear and "
                       "multi-branch experiments (papers 001, 002)"),
    "timm-train": ("dcanets.cli.timm_train", "run timm's own train.py with dcanets' models and decompositions"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error first (``dcanets train: error: argument --lr: ...``), then
    where to look, instead of the whole usage block before the message; it keeps its flags, so an
    unknown one gets the closest known ones (``--smothing; did you mean: --smoothing``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: List[str] = []  # before argparse adds --help
        self.chosen: Optional["Parser"] = None  # the subcommand's parser, once chosen
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.extend(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.chosen or self
            owner.error(unrecognized(extras, owner.flags))
        return parsed


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="dcanets", description="Shortcut networks through DCA: models, DC optimizers, searches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run, _check=getattr(mod, "check", None))
            parser.chosen = p
    return parser


def _one_line_warnings(command: str) -> None:
    """The engine's data warnings (a truncated tar) as ``dcanets train: warning: ...``, every time."""
    from dcanets.engine.data import DataWarning

    default = warnings.showwarning  # callers wrap this in warnings.catch_warnings(), which restores both

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"dcanets {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", DataWarning)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # [Errno 13] ...: 'x'
        return f"{exc.strerror}: '{exc.filename}'"
    return " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message held


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from dcanets.plugins import PluginError

    try:
        args = build_parser(argv).parse_args(argv)
    except PluginError as exc:  # a command module imported a broken plugin while adding its flags
        print(f"dcanets: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            if getattr(args, "_check", None) is not None:
                args._check(args)  # the flags' values, before torch and the plugins are imported
            _one_line_warnings(args.command)
            from dcanets.plugins import get_plugin_manager

            get_plugin_manager()  # a broken plugin: its one-line PluginError, not a failure halfway through
            return int(args._run(args) or 0)
    except BrokenPipeError:  # `dcanets models | head`
        return 0
    except KeyboardInterrupt:
        print(f"dcanets {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, PluginError) as exc:
        if os.environ.get("DCANETS_DEBUG"):
            raise
        print(f"dcanets {args.command}: error: {_error_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
