"""Data pipeline share of training step time, with the decode-once uint8 cache (goal < 10%).

CIFAR-10 training tar (``../shared/data/cifar10/train.tar`` beside the repo, or ``--data``; in quick
mode a generated CIFAR-like stand-in tar when it is missing), batch 128, pad-4 crop + flip +
per-channel normalization on whole batches, cifar_resnet20 (and cifar_resnet56 in full mode)
trained by the engine (``dcanets.engine.loop``), SGD, one torch thread. Reports:

- the one-time decode of the tar into the cache (cold, into a fresh cache directory) and the
  warm load of that cache file; quick mode decodes only a 2,000-image training subset (+ its
  validation part), full mode all 50,000 images;
- ``data_seconds / train_seconds`` of the engine's epochs: the share of step time spent producing
  batches (indexing + augmentation + normalization);
- the pipeline alone (no model) in images/s against the naive per-epoch pipeline it replaces
  (timm dataset + PIL decode + torchvision transforms per image), measured in the same run;
- the loader on a split as an index view of the decoded set (now) against a contiguous copy of it
  (before), alternated in one run: the speed ratio (goal >= 0.98);
- peak RSS after decoding and at the end.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import (
    benchmark_data,
    data_label,
    figure_path,
    median,
    parse_args,
    peak_rss_mb,
    progress,
    write_result,
)


def extra(parser) -> None:
    parser.add_argument("--data", default=None,
                        help="image-folder tar/dir, CIFAR-10 layout (default: ../shared/data/cifar10/train.tar)")


def cold_decode(spec: str, limit: int | None, seed: int) -> dict:
    """Decode into the (fresh) cache directory, timed; then load the cache file alone, timed."""
    from dcanets.engine import data

    data.forget_decoded()
    t0 = time.perf_counter()
    train, val = data.load_split(spec, 0.1, seed, limit, progress=True)
    decode_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    data.forget_decoded()
    t0 = time.perf_counter()
    data.load_split(spec, 0.1, seed, limit, progress=False)
    warm_s = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in data.cache_dir().glob("*.pt")) / 2**20
    n = len(train) + len(val)
    return {"images_decoded": n, "decode_seconds": round(decode_s, 2),
            "decode_images_per_s": round(n / decode_s, 1), "warm_cache_load_seconds": round(warm_s, 2),
            "cache_file_mb": round(size_mb, 1), "peak_rss_after_decode_mb": round(rss, 1)}


def fresh_cache() -> tuple:
    """Point DCANETS_CACHE at an empty directory so the decode is measured cold."""
    from dcanets.engine import data

    keep = data.cache_dir()
    tmp = Path(tempfile.mkdtemp(prefix="dcanets-bench-cache-"))
    os.environ["DCANETS_CACHE"] = str(tmp)
    return keep, tmp


def hand_over(tmp: Path, keep: Path, full: bool) -> None:
    """Move a full decode to the user's cache (later runs skip the decode); drop the rest."""
    if full:
        keep.mkdir(parents=True, exist_ok=True)
        for f in tmp.glob("*.pt"):
            if not (keep / f.name).exists():
                shutil.move(str(f), keep / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def engine_share(spec: str, model: str, limit: int, epochs: int, seed: int) -> dict:
    """Train with the engine; the data share is data_seconds / train_seconds per epoch."""
    from dcanets.engine import TrainConfig, train

    cfg = TrainConfig(model=model, data=spec, limit=limit, epochs=epochs, batch_size=128, lr=0.1,
                      opt="momentum", weight_decay=5e-4, seed=seed, augment=True)
    rows = []
    final = train(cfg, on_epoch=lambda m: rows.append(m))
    measured = rows[1:] or rows  # epoch 1 includes one-off warm-up when there is a later epoch
    shares = [m["data_seconds"] / m["train_seconds"] for m in measured]
    return {"model": model, "train_images": final["train_images"], "epochs": epochs,
            "epochs_measured": len(measured), "images_per_s": round(median([m["images_per_s"] for m in measured]), 1),
            "data_share": round(median(shares), 4),
            "data_ms_per_batch": round(1000 * median([m["data_seconds"] for m in measured]) /
                                       (final["train_images"] // 128), 2),
            "train_loss_last": round(rows[-1]["train_loss"], 4)}


def pipeline_alone(spec: str, limit: int | None, seed: int, naive_images: int) -> dict:
    """Batches per second of the cached pipeline vs the per-epoch PIL pipeline, no model."""
    from timm.data import create_dataset
    from torchvision import transforms as T

    from dcanets.engine import data

    train, _ = data.load_split(spec, 0.1, seed, limit, progress=False)
    mean, std = data.channel_stats(train)
    loader = data.BatchLoader(train, 128, mean, std, shuffle=True, augment=True, drop_last=True, seed=seed)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    cached = n / (time.perf_counter() - t0)
    views = view_vs_copy(train, mean, std, seed)

    if spec.startswith("synthetic"):  # no files to decode per epoch: nothing to compare against
        return {"cached_images_timed": n, "cached_images_per_s": round(cached, 1), "view_vs_copy": views,
                "naive_pil": "skipped: generated data has no image files"}
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = create_dataset("", root=spec, transform=tf)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:naive_images].tolist()
    t0 = time.perf_counter()
    for k in range(0, len(idx), 128):
        torch.stack([ds[i][0] for i in idx[k:k + 128]])
    naive = len(idx) / (time.perf_counter() - t0)
    return {"cached_images_timed": n, "cached_images_per_s": round(cached, 1), "view_vs_copy": views,
            "naive_pil_images_per_s": round(naive, 1), "speedup": round(cached / naive, 1),
            "naive_images_timed": len(idx)}


def view_vs_copy(train, mean, std, seed: int, rounds: int = 9) -> dict:
    """Cached mode's loader on the split as it is now (an index view of the decoded set) against the
    former loader input (a contiguous copy of the split, what load_split returned before), the same
    batches in alternated rounds, timed in CPU time (wall time on the shared machine varies 2x
    between rounds): the regression check (goal: ratio >= 0.98)."""
    from dcanets.engine import data

    copy = data.ImageData(train.images.clone(), train.labels.clone(), train.classes, train.name)
    loaders = {name: data.BatchLoader(d, 128, mean, std, shuffle=True, augment=True, drop_last=True, seed=seed)
               for name, d in (("view", train), ("copy", copy))}
    first = {name: next(iter(loader))[0] for name, loader in loaders.items()}
    assert torch.equal(first["view"], first["copy"])  # the same batches: only the indexing differs
    rates: dict = {name: [] for name in loaders}
    for r in range(rounds):
        for name, loader in loaders.items():
            loader.set_epoch(r)
            t0 = time.process_time()
            n = sum(len(y) for _, y in loader)
            rates[name].append(n / (time.process_time() - t0))
    ratio = median(rates["view"]) / median(rates["copy"])
    return {"rounds": rounds, "images_per_round": len(loaders["view"]) * 128, "timing": "process CPU time",
            "view_images_per_cpu_s": round(median(rates["view"]), 1),
            "copy_images_per_cpu_s": round(median(rates["copy"]), 1),
            "view_over_copy_speed": round(ratio, 3), "goal": "view_over_copy_speed >= 0.98"}


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["model"] for r in rows]
    ax.bar(names, [100 * r["data_share"] for r in rows], color="tab:blue")
    ax.axhline(10, color="tab:red", ls="--", label="goal 10%")
    ax.set_ylabel("data share of step time (%)")
    ax.set_title("batch 128, CIFAR-10 tar, 1 thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    torch.set_num_threads(1)
    # 2,400 stand-in images hold the quick mode's 2,000-image decode subset and its validation part
    spec = benchmark_data("cifar10/train.tar", args.data, args.quick, images=2400)
    if args.quick:  # decode a 2k subset; train 2 epochs of 3 batches, time the second
        decode_limit, limit, models, epochs, naive = 2000, 384, ["cifar_resnet20"], 2, 256
    else:
        decode_limit, limit, models, epochs, naive = None, 3840, ["cifar_resnet20", "cifar_resnet56"], 2, 2048
    keep, tmp = fresh_cache()
    try:
        progress(f"decoding {spec} cold ({'2,000-image subset' if args.quick else 'all images'})")
        decode = cold_decode(spec, decode_limit, args.seed)
        print(f"decode: {decode}")
        rows, alone = measure(spec, models, limit, epochs, naive, args.seed, decode_limit)
    finally:
        hand_over(tmp, keep, decode_limit is None)
    budget = {"data": data_label(spec), "batch": 128, "train_images": limit, "epochs": epochs,
              "statistic": "median over epochs after the first (the first has one-off warm-up)",
              "torch_threads": 1, "decode": "cold, fresh cache dir; full mode all 50k, quick mode a 2k subset"}
    plot(rows, figure_path("data_pipeline", args.quick))
    write_result("data_pipeline", args.quick, {"budget": budget, "decode": decode, "rows": rows,
                                               "pipeline_alone": alone, "goal": "data_share < 0.10",
                                               "peak_rss_end_mb": round(peak_rss_mb(), 1)}, args.out)


def measure(spec: str, models: list, limit: int, epochs: int, naive: int, seed: int,
            pipeline_limit: int | None) -> tuple:
    rows = []
    for model in models:
        progress(f"training {model}: {limit} images x {epochs} epochs, batch 128")
        row = engine_share(spec, model, limit, epochs, seed)
        print(f"{model:16s} {row['images_per_s']:8.1f} img/s  data share {100 * row['data_share']:.2f}%  "
              f"({row['data_ms_per_batch']} ms/batch)")
        rows.append(row)
    progress("pipeline alone vs per-epoch PIL decoding")
    alone = pipeline_alone(spec, pipeline_limit, seed, naive)
    print(f"pipeline alone: {alone}")
    return rows, alone


if __name__ == "__main__":
    main()
