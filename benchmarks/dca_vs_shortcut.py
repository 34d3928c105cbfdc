""""DCA + vanilla network = SGD + shortcut network" (paper 000, §3), measured.

Three arms with the same data, budget, schedule and seeds, all trained by the one training
engine ``dcanets.engine.train``: a plain net with SGD, the same plain net with the counter-loss
DCA optimizer ``dcacounter`` (eq. 12, Newton direction of eq. 19, c of eq. 17 at the last
same-shape block; the committed full result predates that default and used c = ∇L'_0), and the
ResNet of the same depth with SGD. Training-loss curves and accuracies go to a table (stdout +
JSON) and a PNG.
No outcome is promised; whatever happens is reported.

    python benchmarks/dca_vs_shortcut.py --full    # 56-layer nets on digits, see BUDGET
    python benchmarks/dca_vs_shortcut.py --quick   # 20-layer nets, 256 images, 1 epoch (CI)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import figure_path, parse_args, progress, write_result  # noqa: E402

NAME = "dca_vs_shortcut"
FULL = dict(depth=56, epochs=10, limit=None, seeds=(0, 1))
QUICK = dict(depth=20, epochs=1, limit=256, seeds=(0,))
SHARED = dict(data="digits", lr=0.05, momentum=0.9, weight_decay=5e-4, sched="cosine", batch_size=128)


def arms(depth: int):
    return {
        f"plainnet{depth} + SGD": dict(model=f"cifar_plainnet{depth}", opt="momentum"),
        f"plainnet{depth} + dcacounter": dict(model=f"cifar_plainnet{depth}", opt="dcacounter",
                                               opt_kwargs={"rho": 0.0}),
        f"resnet{depth} + SGD": dict(model=f"cifar_resnet{depth}", opt="momentum"),
    }


def plot(results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, (name, runs) in enumerate(results.items()):
        for i, r in enumerate(runs):   # one colour per arm, one line style per seed
            ep = [h["epoch"] for h in r["history"]]
            kw = dict(label=name if i == 0 else None, color=f"C{k}", linestyle=("-", "--", ":")[i % 3])
            ax[0].plot(ep, [h["train_loss"] for h in r["history"]], **kw)
            ax[1].plot(ep, [h["val_acc"] for h in r["history"]], **kw)
    ax[0].set(xlabel="epoch", ylabel="training loss", yscale="log", title=title)
    ax[1].set(xlabel="epoch", ylabel="validation accuracy")
    ax[0].legend(title="solid: seed 0, dashed: seed 1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from dcanets.engine import TrainConfig, train

    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    seeds = tuple(args.seed + s for s in budget["seeds"])
    results = {}
    for name, arm in arms(budget["depth"]).items():
        results[name] = []
        for seed in seeds:
            progress(f"{NAME}: {name}, seed {seed}, {budget['epochs']} epochs")
            cfg = TrainConfig(epochs=budget["epochs"], limit=budget["limit"], seed=seed, **SHARED, **arm)
            final = train(cfg, progress=False)
            results[name].append({k: final[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                                        "wall_seconds", "history", "train_images")})
    print(f"| arm | final train loss | train acc | val acc | wall s "
          f"| (digits, {budget['epochs']} epochs, seeds {list(seeds)}) |")
    print("|---|---|---|---|---|---|")
    table = {}
    for name, runs in results.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("train_loss", "train_acc", "val_acc", "wall_seconds")}
        table[name] = mean
        print(f"| {name} | {mean['train_loss']:.4f} | {mean['train_acc']:.3f} | {mean['val_acc']:.3f} | "
              f"{mean['wall_seconds']:.0f} | |")
    fig = figure_path(NAME, args.quick)
    plot(results, fig, f"digits, depth {budget['depth']}, {budget['epochs']} epochs")
    write_result(NAME, args.quick, {
        "budget": {**SHARED, **{k: v for k, v in budget.items() if k != "seeds"}, "seeds": list(seeds),
                   "train_images": results[next(iter(results))][0]["train_images"], "threads": 1,
                   "engine": "dcanets.engine.loop.train"},
        "arms": {n: {**arms(budget['depth'])[n]} for n in results},
        "table": table, "runs": results, "figure": str(fig.name),
    }, args.out)


if __name__ == "__main__":
    main()
