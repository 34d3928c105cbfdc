"""Paper 002, §2.1: GD on deep linear nets measured against the closed-form optimum.

Square 10x10 layers ``alpha I + W_i`` (alpha = 0 none, 1 identity, -1 NegNet), targets Y = A X +
0.1 noise with A's eigenvalues U[-1.5, 1.5] (n = 100); same lr for all; 8 seeds batched. Reported:
excess loss L - L* (L* = the truncated-SVD optimum) after the budget, median over seeds, and the
share of seeds within 1e-3 of L*.
"""
from __future__ import annotations

import math

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers.p002_deep_linear import SHORTCUTS, planted_problem, train

NAME = "paper002_deep_linear"


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    depths, steps, seeds = ([2, 5], 300, 4) if args.quick else ([2, 3, 5, 10, 20], 2000, 8)
    lr = 0.02
    x, y = planted_problem(10, 100, torch.Generator().manual_seed(args.seed), noise=0.1)
    table, curves = {}, {}
    for depth in depths:
        for shortcut in SHORTCUTS:
            res = train(x, y, depth, shortcut, steps, lr, seeds, seed=args.seed, record_every=20)
            fin = res.final_excess
            ok = fin.isfinite()
            table[f"{depth}_{shortcut}"] = {
                "median_excess": fin.median().item() if ok.all() else math.inf,
                "reached_1e-3": (ok & (fin < 1e-3)).float().mean().item(),
                "diverged": (~ok | (fin > 1e6)).float().mean().item(), "optimum_loss": res.optimum_loss}
            curves[f"{depth}_{shortcut}"] = res.excess
            progress(f"depth {depth:2d} {shortcut:8s} {table[f'{depth}_{shortcut}']}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3), sharey=True)
    for ax, depth in zip(axes, depths):
        for shortcut in SHORTCUTS:
            c = [min(max(e, 1e-12), 1e6) if math.isfinite(e) else 1e6 for e in curves[f"{depth}_{shortcut}"]]
            ax.semilogy([20 * i for i in range(len(c))], c, label=shortcut)
        ax.set(title=f"depth {depth}", xlabel="GD step")
    axes[0].set_ylabel("mean L - L*")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(figure_path(NAME, args.quick), dpi=110)
    write_result(NAME, args.quick, {"budget": {"d": 10, "n": 100, "depths": depths, "steps": steps,
                                               "lr": lr, "seeds": seeds, "seed": args.seed},
                                    "table": table}, args.out)


if __name__ == "__main__":
    main()
