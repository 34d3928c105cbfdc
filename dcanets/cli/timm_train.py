"""``dcanets timm-train PATH/TO/train.py ARGS...``: timm's own training script, with dcanets' names.

timm's ``train.py`` sees a model or optimizer name only if something imported the package that
registers it; timm's maintainers answer that it "only needs to be imported somewhere" (timm issue
1694), and train.py has no flag for it (``--device-modules`` imports modules, but is meant for
device back-ends). This command is that import: it runs ``import dcanets`` (every plugin's models
and decompositions into timm's registries), then the script as ``__main__`` with ``runpy``, its
arguments untouched, as ``python train.py ARGS...`` would (``sys.argv[0]`` is the script, its folder
first on ``sys.path``). The DC decompositions need nothing more from the script: a model built by
``timm.create_model`` of a dcanets name is found by the optimizer built on its parameters
(``dcanets.builder``), and ρ > 0 or ``rho="auto"`` read their batch off the script's own passes
(``dcanets.optim.batches``). Under ``torchrun`` (``torchrun --nproc-per-node N -m dcanets
timm-train train.py ...``) the script's loop cannot average eq. 17's c over the ranks as
``dcanets train --nproc N`` does: the counter-loss decompositions refuse to step there, in one line
(``dcanets.optim._base.DCAOptimizer._require_global``); ``dcal2`` and timm's own optimizers run.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", type=Path, help="timm's train.py (or any script of its shape)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments, passed as they are")


def run(args: argparse.Namespace) -> int:
    import runpy
    import sys

    import dcanets  # noqa: F401  (plugin models and decompositions into timm's registries)

    script = Path(args.script)
    if not script.is_file():
        raise FileNotFoundError(2, "No such file (give the path of timm's train.py)", str(script))
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")   # its SystemExit(code) is the command's status
    return 0
