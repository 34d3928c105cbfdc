"""Paper 002, §3.2: non-convexity of multi-branch MLPs against the number of branches I.

multibranch_mlp_1h, total width 64 fixed, I in {1, 2, 4, ..., 64}, 512 sklearn digits (8x8, 10
classes), full-batch Adam (lr 1e-2). At the trained point: negative-curvature mass of the Hessian
spectral density (Lanczos, dcanets.analysis.curvature) and |lambda_min| / lambda_max; loss along random
filter-normalized lines (t in [-3, 3]) and its gap to its 1-D convex envelope. Compared with the
trend 2 / I of paper 002's duality-gap bound.
"""
from __future__ import annotations

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers.p002_multibranch import measure

NAME = "paper002_multibranch"


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    if args.quick:
        branches, steps, lines, lz, n = [1, 8, 64], 100, 2, 15, 256
    else:
        branches, steps, lines, lz, n = [1, 2, 4, 8, 16, 32, 64], 500, 10, 60, 512
    reports = measure(branches, total_width=64, depth=1, n=n, steps=steps, lines=lines,
                      lanczos_steps=lz, seed=args.seed)
    rows = {}
    for r in reports:
        rows[str(r.num_branches)] = {"train_loss": r.train_loss, **r.hessian, **r.lines,
                                     "bound_2_over_I": 2 / r.num_branches}
        progress(f"I={r.num_branches:3d} {rows[str(r.num_branches)]}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(branches, [rows[str(i)]["negative_mass"] + 1e-4 for i in branches], "o-",
              label="Hessian negative mass (+1e-4)")
    ax.loglog(branches, [rows[str(i)]["neg_ratio"] + 1e-4 for i in branches], "s-", label="|λmin|/λmax (+1e-4)")
    ax.loglog(branches, [rows[str(i)]["envelope_gap_mean"] + 1e-4 for i in branches], "^-",
              label="line envelope gap (+1e-4)")
    ax.loglog(branches, [2 / i for i in branches], "k--", label="2/I (paper 002 bound)")
    ax.set(xlabel="branches I (total width 64)", title=f"digits n={n}, {steps} Adam steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure_path(NAME, args.quick), dpi=110)
    write_result(NAME, args.quick, {"budget": {"model": "multibranch_mlp_1h", "total_width": 64,
                                               "data": f"sklearn digits n={n}", "steps": steps,
                                               "lines": lines, "line_radius": 3.0, "lanczos_steps": lz,
                                               "seed": args.seed}, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
