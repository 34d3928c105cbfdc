"""``dcanets <command>``: one entry point, one module per command.

Each command has its module in this package, exposing ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported, so ``dcanets models`` does
not pay for importing Ray. Errors a user can fix (ValueError, FileNotFoundError, PluginError)
end in one line on stderr and exit status 2; ``DCANETS_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# command -> (module exposing add_arguments/run, one-line help)
COMMANDS = {
    "models": ("dcanets.cli.models", "list the models dcanets plugins added to timm"),
    "plugins": ("dcanets.cli.models", "list loaded dcanets plugins and what each registered"),
    "train": ("dcanets.cli.train", "train one timm model with any timm optimizer (DCA ones included)"),
    "tune": ("dcanets.cli.tune", "search hyper-parameters with Ray Tune + Optuna, logged to MLflow"),
    "curvature": ("dcanets.cli.curvature", "estimate Hessian extremes of a model's loss and advise lr, rho, lambda"),
    "shortcut-prior": ("dcanets.cli.shortcut_prior", "teacher-student, convex relaxation, deep linear and multi-branch experiments (papers 001, 002)"),
}


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcanets", description="Shortcut networks through DCA: models, DC optimizers, searches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from dcanets.plugins import PluginError

    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `dcanets models | head`
        return 0
    except KeyboardInterrupt:
        print(f"dcanets {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PluginError) as exc:
        if os.environ.get("DCANETS_DEBUG"):
            raise
        print(f"dcanets {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
