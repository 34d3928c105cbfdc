"""Paper 002, eq. 8: vanilla GD on ||relu(W^T X) - Y||^2 against GD on the relaxed convex loss.

Planted neuron, Gaussian X (d = 20, n = 200), 20 inits per setting, lr = 1 / lambda_max(2 X X^T);
settings: noise 0 / 0.1, random / opposite (-W0) init. Reports the original loss per sample and
the recovery error ||W - W0|| / ||W0|| (means over inits) along the run.
"""
from __future__ import annotations

import torch

from common import figure_path, parse_args, write_result
from dcanets.papers.p002_relaxation import compare

NAME = "paper002_relaxation"


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    steps, runs = (100, 5) if args.quick else (500, 20)
    settings = [(noise, init) for noise in (0.0, 0.1) for init in ("random", "opposite")]
    results = {}
    for noise, init in settings:
        out = compare(runs=runs, steps=steps, noise=noise, seed=args.seed, init=init)
        results[f"noise{noise}_{init}"] = {k: {"original": r.original, "recovery": r.recovery}
                                           for k, r in out.items()}
        for k, r in out.items():
            hit = next((t for t, e in enumerate(r.recovery) if e < 1e-3), None)
            print(f"noise={noise} init={init:8s} {k:8s} final loss {r.original[-1]:.3e} "
                  f"recovery {r.recovery[-1]:.3e} steps to recovery<1e-3: {hit}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3), sharey=True)
    for ax, (key, res) in zip(axes, results.items()):
        for k, style in (("vanilla", "-"), ("relaxed", "--")):
            ax.semilogy([max(e, 1e-16) for e in res[k]["recovery"]], style, label=k)
        ax.set(title=key, xlabel="GD step")
    axes[0].set_ylabel("||W - W0|| / ||W0||")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(figure_path(NAME, args.quick), dpi=110)
    summary = {k: {kind: {"final_original_loss": v[kind]["original"][-1],
                          "final_recovery": v[kind]["recovery"][-1]} for kind in v} for k, v in results.items()}
    write_result(NAME, args.quick, {"budget": {"n": 200, "d": 20, "runs": runs, "steps": steps,
                                               "seed": args.seed}, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
