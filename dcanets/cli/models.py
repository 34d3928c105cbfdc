"""``dcanets models`` and ``dcanets plugins``: what the plugins added to timm, and which plugin added it."""
from __future__ import annotations

import argparse


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


