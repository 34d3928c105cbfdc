"""What every benchmark script shares: quick/full modes, machine facts, result files, timing.

Benchmarks are scripts, not tests: ``python benchmarks/<name>.py --quick`` (CI) or ``--full``
(the numbers in the README). Each writes ``benchmarks/results/<name>[_quick].json`` holding the
budget it ran with next to every number, so a figure never travels without its budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def shared_data(relpath: str) -> str:
    """A data set from the workplace's shared folder, which sits beside the repository
    (``<repo>/../shared/data``); ``$DCANETS_SHARED_DATA`` points elsewhere."""
    root = os.environ.get("DCANETS_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(Path(root) / relpath)


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny budget, for CI")
    mode.add_argument("--full", action="store_true", help="the budget behind the README's numbers (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    if extra:
        extra(parser)
    return parser.parse_args()


def machine() -> Dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, quick: bool, payload: Dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}{'_quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "mode": "quick" if quick else "full", "machine": machine(),
           "peak_rss_mb": round(peak_rss_mb(), 1), **payload}
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


def figure_path(name: str, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{'_quick' if quick else ''}.png"


def alternate(fns: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    """Time each callable once per round, in turn, so machine noise hits all of them alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
