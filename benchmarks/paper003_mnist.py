"""Paper 003, section 5: double_resnet_mnist on MNIST, 12 epochs, no explicit regularization.

Trains with the project's one engine (``dcanets.engine.train``) on the MNIST training tar with a
fixed-seed validation split, logs train/validation accuracy per epoch next to the paper's final
97.91% (train) / 97.58% (test), and evaluates any held-out image-folder tar given as
``--eval-data``. ``--select`` first picks optimizer and learning rate on the validation split
from a few one-epoch trials on a subset (never on held-out data). ``--from-search DIR`` trains
nothing: it records the search of ``tune_configs/mnist_paper003_search.yaml`` (the paper's
unknowns chosen with ``dcanets tune`` on the validation split) from its output folder DIR: the
trials table, and the best trial's 12-epoch history as the result. ``--retrain-best --eval-data
TEST`` retrains that recorded best configuration from scratch with a fixed ``--seed`` and reports
its accuracy on the held-out set TEST (MNIST's official 10,000-image test split, the number paper
003 reports), in ``results/paper003_mnist_test.json``: the search's validation numbers are
selection-biased, this one is not. The JSON is rewritten after every epoch, so a long run in the
background can be watched. Without
``../shared/data/mnist/train.tar`` (and no ``--data``), ``--quick`` trains on a generated MNIST-like stand-in.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from common import RESULTS, benchmark_data, data_label, figure_path, parse_args, progress, write_result
from dcanets.engine import TrainConfig, train

PAPER = {"train_acc": 0.9791, "test_acc": 0.9758, "epochs": 12}
CANDIDATES = [("adam", 3e-3), ("adam", 1e-3), ("sgd", 0.1)]


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="MNIST image-folder tar or directory (default: ../shared/data/mnist/train.tar)")
    p.add_argument("--eval-data", default=None, help="held-out image-folder tar/dir evaluated at the end")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="at most this many training images")
    p.add_argument("--opt", default="adam")
    p.add_argument("--lr", type=float, default=3e-3, help="default: the --select winner")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--select", action="store_true", help="choose opt/lr on the validation split first")
    p.add_argument("--select-limit", type=int, default=3000)
    p.add_argument("--output", default=None, help="checkpoint directory (resume with the same command)")
    p.add_argument("--from-search", type=Path, default=None, metavar="DIR",
                   help="record a finished `dcanets tune` search folder instead of training")
    p.add_argument("--machine", default=None, help="with --from-search: where the search ran (e.g. the GPU)")
    p.add_argument("--retrain-best", action="store_true",
                   help="retrain the recorded search's best configuration (results/paper003_mnist.json) with "
                        "--seed and evaluate --eval-data (required: MNIST's official test split) at the end")


def config(args: argparse.Namespace, opt: str, lr: float, epochs: int, limit) -> TrainConfig:
    return TrainConfig(model="double_resnet_mnist", data=args.data, eval_data=None, val_fraction=0.1,
                       limit=limit, opt=opt, lr=lr, momentum=0.9, weight_decay=0.0, sched="cosine",
                       epochs=epochs, batch_size=args.batch_size, seed=args.seed, device="auto",
                       augment=False, output=args.output)


def select(args: argparse.Namespace) -> list:
    """One epoch per candidate on ``--select-limit`` images; ranked by validation accuracy."""
    trials = []
    for opt, lr in CANDIDATES:
        cfg = config(args, opt, lr, 1, args.select_limit)
        cfg.output = None
        res = train(cfg, progress=False)
        trials.append({"opt": opt, "lr": lr, "val_acc": res["val_acc"], "train_images": res["train_images"],
                       "val_images": res["val_images"], "epochs": 1})
        progress(f"select {opt} lr={lr}: val_acc {res['val_acc']:.4f}")
    return sorted(trials, key=lambda t: -t["val_acc"])


def plot(history: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [h["train_acc"] for h in history], "o-", label="train (running, this run)")
    ax.plot(ep, [h["val_acc"] for h in history], "s-", label="validation (this run)")
    ax.axhline(PAPER["train_acc"], color="C0", ls=":", label="paper train 97.91%")
    ax.axhline(PAPER["test_acc"], color="C1", ls=":", label="paper test 97.58%")
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy"), ax.set_title("double_resnet_mnist")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def trial_histories(search: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Per-epoch reports of every trial, from Ray's ``<trial>/result.json`` (one JSON line per epoch)."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for path in sorted(search.glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


def record_search(args: argparse.Namespace) -> None:
    """The search's trials table and its best trial (final validation accuracy at epoch 12)."""
    with (args.from_search / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    histories = trial_histories(args.from_search)
    full = [t for t in table if int(t["epochs"]) == PAPER["epochs"] and t["trial_id"] in histories]
    if not full:
        raise SystemExit(f"{args.from_search}: no trial ran all {PAPER['epochs']} epochs")
    best = max(full, key=lambda t: histories[t["trial_id"]][-1]["val_acc"])
    keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")
    history = [{k: h[k] for k in keep} for h in histories[best["trial_id"]]]
    cfg = histories[best["trial_id"]][-1]["config"]
    plot(history, figure_path("paper003_mnist", False))
    budget = {"epochs": PAPER["epochs"], "batch_size": 128, "train_images": 54000, "val_images": 6000,
              "split_seed": 0, "weight_decay": 0.0, "augment": False, "sched": "cosine",
              "search": "tune_configs/mnist_paper003_search.yaml", "trials": len(table),
              "trained_on": args.machine or "this machine"}
    write_result("paper003_mnist", False, {
        "budget": budget, "paper": PAPER, "best_trial": {"trial_id": best["trial_id"], "params": cfg},
        "selection": [{k: v if k in ("trial_id", "status", "opt") else _number(v) for k, v in t.items()
                       if k != "node_id"} for t in table],
        "history": history, "final": history[-1]})
    print(f"best trial {best['trial_id']} {cfg}: val_acc {history[-1]['val_acc']:.4f} at epoch 12 "
          f"(paper test 0.9758), {len(table)} trials")


SEARCH = Path(__file__).resolve().parents[1] / "tune_configs" / "mnist_paper003_search.yaml"


def best_config(args: argparse.Namespace) -> TrainConfig:
    """The recorded search's best trial as one run: the search file's fixed ``train:`` fields overlaid
    with the trial's sampled values (``model_kwargs.hidden`` nests), ``--seed``, ``--eval-data``."""
    import yaml

    params = json.loads((RESULTS / "paper003_mnist.json").read_text())["best_trial"]["params"]
    fields = dict(yaml.safe_load(SEARCH.read_text())["train"])
    for name, value in params.items():
        head, _, tail = name.partition(".")
        fields[head] = {**(fields.get(head) or {}), tail: value} if tail else value
    fields.update(data=args.data, eval_data=args.eval_data, seed=args.seed, output=args.output)
    if args.quick:
        fields.update(epochs=1, limit=600)
    return TrainConfig.from_dict(fields)


def retrain_best(args: argparse.Namespace) -> None:
    """Train :func:`best_config` (resuming from ``--output`` if it holds a checkpoint) and record its
    held-out accuracy next to the paper's test accuracy."""
    if not args.eval_data:
        raise SystemExit("--retrain-best needs --eval-data PATH: MNIST's official 10,000-image test split as an "
                         "image-folder tar or directory")
    args.data = benchmark_data("mnist/train.tar", args.data, args.quick, images=800)
    cfg = best_config(args)
    ckpt = Path(args.output) / "last.pt" if args.output else None
    final = train(cfg, resume=ckpt if ckpt is not None and ckpt.is_file() else None, progress=False)
    history = final.pop("history", [])
    budget = {"source": "results/paper003_mnist.json best_trial", "config": cfg.to_dict(),
              "train_images": final["train_images"], "val_images": final["val_images"],
              "eval_data": data_label(cfg.eval_data or ""), "eval_images": final.get("eval_images")}
    write_result("paper003_mnist_test", args.quick, {"budget": budget, "paper": PAPER, "history": history,
                                                     "final": final}, args.out)
    print(f"retrained best config, seed {cfg.seed}: val_acc {final['val_acc']:.4f}, held-out eval_acc "
          f"{final['eval_acc']:.4f} on {final.get('eval_images')} images (paper test 0.9758)")


def _number(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.from_search:
        return record_search(args)
    if args.retrain_best:
        return retrain_best(args)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    epochs = args.epochs or (1 if args.quick else PAPER["epochs"])
    limit = args.limit or (600 if args.quick else None)
    # 800 stand-in images hold the 600 quick training images and their validation part
    args.data = benchmark_data("mnist/train.tar", args.data, args.quick, images=800)
    opt, lr, trials = args.opt, args.lr, []
    if args.select and not (args.output and (Path(args.output) / "last.pt").is_file()):
        trials = select(args)
        opt, lr = trials[0]["opt"], trials[0]["lr"]
    cfg = config(args, opt, lr, epochs, limit)
    cfg.eval_data = args.eval_data
    name = "paper003_mnist"
    out = args.out or RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    partial = out.with_suffix(".partial.json")
    history = []
    t0 = time.perf_counter()

    def on_epoch(m: dict) -> None:
        history.append(m)
        progress(f"epoch {m['epoch']}: train_acc {m['train_acc']:.4f} val_acc {m['val_acc']:.4f} "
                 f"{m['images_per_s']:.1f} img/s {m['epoch_seconds']:.0f}s")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"config": cfg.to_dict(), "history": history,
                                       "elapsed_s": time.perf_counter() - t0}, indent=2, default=str))

    ckpt = Path(args.output) / "last.pt" if args.output else None
    resume = ckpt if ckpt is not None and ckpt.is_file() else None  # rerun the same command to resume
    if resume:
        progress(f"resuming from {resume}")
    final = train(cfg, on_epoch=on_epoch, resume=resume, progress=False)
    history = final.pop("history", history)  # includes epochs done before a resume
    plot(history, figure_path(name, args.quick))
    budget = {"data": Path(args.data).name, "epochs": epochs, "train_images": final["train_images"],
              "val_images": final["val_images"], "batch_size": cfg.batch_size, "seed": cfg.seed, "opt": opt, "lr": lr,
              "sched": cfg.sched, "weight_decay": 0.0, "augment": False,
              "wall_seconds": round(final["wall_seconds"], 1)}
    write_result(name, args.quick, {"budget": budget, "paper": PAPER, "selection": trials,
                                    "history": history, "final": final}, out)
    partial.unlink(missing_ok=True)
    print(f"final: train_acc {final['train_acc']:.4f} val_acc {final['val_acc']:.4f} "
          f"(paper 0.9791 / 0.9758) eval: {final.get('eval_acc', 'n/a')} wall {final['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
