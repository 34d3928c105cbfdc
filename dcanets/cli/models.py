"""``dcanets models`` and ``dcanets plugins``: what the plugins added to timm, and which plugin added it."""
from __future__ import annotations

import argparse

from dcanets.names import did_you_mean


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``models`` and ``plugins``."""
    parser.add_argument("pattern", nargs="?", default="*",
                        help="fnmatch filter on the model name (models) or the plugin name or module "
                             "(plugins), e.g. 'cifar_neg*'")


def run(args: argparse.Namespace) -> int:
    import fnmatch

    import dcanets

    if args.command == "plugins":
        models, decomps = dcanets.list_models(), dcanets.list_decompositions()
        shown = 0
        for name, module in dcanets.list_plugins():
            if not (fnmatch.fnmatch(name, args.pattern) or fnmatch.fnmatch(module, args.pattern)):
                continue
            n_m = sum(p == name for p in models.values())
            n_d = sum(p == name for p in decomps.values())
            print(f"{name:24s} {module:40s} models={n_m} decompositions={n_d}")
            shown += 1
        return _none_matched(args, shown, [name for name, _ in dcanets.list_plugins()])
    import timm

    shown = 0
    for name, plugin in dcanets.list_models().items():
        if fnmatch.fnmatch(name, args.pattern):
            cfg = timm.models.get_pretrained_cfg(name)
            size = "x".join(map(str, cfg.input_size)) if cfg else "?"
            print(f"{name:28s} plugin={plugin:18s} input={size}")
            shown += 1
    return _none_matched(args, shown, list(dcanets.list_models()))


def _none_matched(args: argparse.Namespace, shown: int, names: list) -> int:
    """Exit 1 with one line when the pattern matched nothing (as grep does), 0 otherwise."""
    import sys

    if shown:
        return 0
    what = "plugin" if args.command == "plugins" else "plugin model"
    hint = did_you_mean(args.pattern, names) or "; use * and ? as wildcards, e.g. 'cifar_*'"
    print(f"dcanets {args.command}: no {what} matches '{args.pattern}'{hint}", file=sys.stderr)
    return 1
