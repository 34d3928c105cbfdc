"""What every benchmark script shares: quick/full modes, machine facts, result files, timing.

Benchmarks are scripts, not tests: ``python benchmarks/<name>.py --quick`` (CI) or ``--full``
(the numbers in the README). Each writes ``benchmarks/results/<name>[_quick].json`` holding the
budget it ran with next to every number, so a figure never travels without its budget.
Benchmarks on the shared data sets (``../shared/data`` beside the repository) find them with
``benchmark_data``; without them, quick mode runs on a generated stand-in and full mode stops.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"


def shared_data(relpath: str) -> str:
    """A data set from the workplace's shared folder, which sits beside the repository
    (``<repo>/../shared/data``); ``$DCANETS_SHARED_DATA`` points elsewhere."""
    root = os.environ.get("DCANETS_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(Path(root) / relpath)


# shared data set -> the small generated set that stands in for it in quick mode: same image
# size, channels, class count and file format (an image-folder tar, read by the same code path)
STAND_INS: Dict[str, Dict[str, Any]] = {
    "cifar10/train.tar": dict(size=32, channels=3, num_classes=10, ext="jpg", like="CIFAR-10"),
    "mnist/train.tar": dict(size=28, channels=1, num_classes=10, ext="png", like="MNIST"),
}
_GENERATED: Dict[str, str] = {}  # path of each stand-in made by this process -> its description


def benchmark_data(relpath: str, given: str | None, quick: bool, images: int) -> str:
    """The data set a benchmark reads: ``--data`` when given (it must exist), else the shared
    copy (``shared_data(relpath)``), else, in quick mode only, a generated stand-in of the same
    shape with ``images`` images (a clone without ``../shared`` still runs every quick mode).
    Full mode without the data exits with one line naming the missing path."""
    if given is not None:
        if given in ("digits", "synthetic") or given.startswith("synthetic:") or Path(given).expanduser().exists():
            return given
        raise SystemExit(f"--data {given}: no such file or directory")
    path = shared_data(relpath)
    if Path(path).exists():
        return path
    if not quick:
        raise SystemExit(f"{path} not found: the full benchmark needs the real data set; pass --data PATH "
                         f"or set DCANETS_SHARED_DATA to the folder holding {relpath}")
    return _stand_in(relpath, path, images)


def _stand_in(relpath: str, missing: str, images: int) -> str:
    """Write a seeded stand-in image-folder tar into a temporary folder removed at exit (its
    decode cache too, so stand-ins never pile up in the user's cache)."""
    import atexit
    import shutil
    import tempfile

    from dcanets.engine import data

    shape = STAND_INS[relpath]
    tmp = Path(tempfile.mkdtemp(prefix="dcanets-standin-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ["DCANETS_CACHE"] = str(tmp / "cache")
    gen = data.synthetic(images, shape["num_classes"], shape["size"], shape["channels"], seed=0)
    tar = data.write_image_tar(gen, tmp / f"{shape['like'].lower().replace('-', '')}_standin.tar", shape["ext"])
    colour = "RGB" if shape["channels"] == 3 else "grayscale"
    fmt = "JPEG" if shape["ext"] == "jpg" else shape["ext"].upper()
    what = (f"{images} generated {shape['size']}x{shape['size']} {colour} {fmt}s, {shape['num_classes']} classes, "
            f"{shape['like']}-like")
    _GENERATED[str(tar)] = what
    print(f"no {missing}: quick mode on generated stand-in data ({what})", flush=True)
    return str(tar)


def data_label(path: str) -> str:
    """How a result file names its data set: the set's folder and file (``cifar10/train.tar``),
    not a path of the machine that ran it."""
    p = Path(str(path))
    if (":" in str(path) and not p.exists()) or not p.parent.name:  # synthetic:N, digits, a bare name
        return str(path)
    return f"{p.parent.name}/{p.name}"


def is_stand_in(path: str) -> bool:
    return str(path) in _GENERATED


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common flags (``--quick``/``--full``, ``--seed``, ``--out``) and a script's own; ``argv``: parse
    these instead of the command line (one script driving another)."""
    parser = argparse.ArgumentParser(description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny budget, for CI")
    mode.add_argument("--full", action="store_true", help="the budget behind the README's numbers (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    if extra:
        extra(parser)
    return parser.parse_args(argv)


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
    if _GENERATED:  # a number measured on generated data never passes for one on the real set
        doc["stand_in_data"] = sorted(_GENERATED.values())
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


def cifar_images(args: argparse.Namespace, count: int) -> Tuple[str, Any, Any]:
    """The CIFAR-10 images a one-thread measurement runs on: the real tar (``--data`` or the shared
    copy) or, in quick mode without it, a generated stand-in; returns the source and
    ``load_images``'s tensors."""
    import torch

    torch.set_num_threads(1)
    source = benchmark_data("cifar10/train.tar", args.data, args.quick, images=max(count, 64))
    x, y = load_images(source, count, args.seed)
    return source, x, y


def load_images(spec: str, count: int, seed: int) -> Tuple[Any, Any]:
    """``count`` images of a data source at seeded random positions, as float tensors normalised per
    channel (statistics of these images), with their labels: the batches of a measurement that
    needs real images but not a training split."""
    import torch

    from dcanets.engine import data

    total = data.source_size(spec)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:min(count, total)]
    images = data.load(spec, indices=sorted(order.tolist()), progress=False)
    return data.normalized(images.images), images.labels


def fill_block(text: str, marker: str, body: str, inline: bool = False) -> str:
    """Replace what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` in a Markdown page with
    ``body`` (on lines of its own; ``inline=True``: within one line, e.g. a table cell), so a page's
    generated numbers always come from a result file. Stops with one line if the marker is missing."""
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->)(.*?)(<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"marker <!-- {marker} --> missing")
    inner = body.strip() if inline else "\n" + body.rstrip() + "\n"
    return pattern.sub(lambda m: m.group(1) + inner + m.group(3), text)


def seeded_batches(x: Any, y: Any, batch: int, seed: int) -> Iterator[Tuple[Any, Any]]:
    """Endless batches of (x, y), a new seeded permutation each pass (the last partial batch dropped)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def warm_start(model: Any, data: Iterator[Tuple[Any, Any]], steps: int, sgd: Dict[str, float]) -> float:
    """``steps`` steps of ``torch.optim.SGD(**sgd)`` in train mode on the next batches; the last loss."""
    import torch

    from dcanets.engine.fidelity import optimizer_step

    opt = torch.optim.SGD(model.parameters(), **sgd)
    loss = float("nan")
    for _ in range(steps):
        x, y = next(data)
        loss = optimizer_step(model, opt, x, y)
    return loss
