"""``dcanets <command>``: one entry point, one module per command.

Each command lives in the module that does the work and exposes ``add_arguments(parser)`` and
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
    "models": ("dcanets.cli", "list the models dcanets plugins added to timm"),
    "plugins": ("dcanets.cli", "list loaded dcanets plugins and what each registered"),
    "train": ("dcanets.train", "train one timm model with any timm optimizer (DCA ones included)"),
    "tune": ("dcanets.tune", "search hyper-parameters with Ray Tune + Optuna, logged to MLflow"),
    "curvature": ("dcanets.curvature", "estimate Hessian extremes of a model's loss and advise lr, rho, lambda"),
    "shortcut-prior": ("dcanets.shortcut_prior", "teacher-student, convex relaxation, deep linear and multi-branch experiments (papers 001, 002)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``models`` and ``plugins``."""
    parser.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'cifar_neg*'")


def run(args: argparse.Namespace) -> int:
    import fnmatch

    import dcanets

    if args.command == "plugins":
        models, decomps = dcanets.list_models(), dcanets.list_decompositions()
        for name, module in dcanets.list_plugins():
            n_m = sum(p == name for p in models.values())
            n_d = sum(p == name for p in decomps.values())
            print(f"{name:24s} {module:40s} models={n_m} decompositions={n_d}")
        return 0
    import timm

    for name, plugin in dcanets.list_models().items():
        if fnmatch.fnmatch(name, args.pattern):
            cfg = timm.models.get_pretrained_cfg(name)
            size = "x".join(map(str, cfg.input_size)) if cfg else "?"
            print(f"{name:28s} plugin={plugin:18s} input={size}")
    return 0


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
