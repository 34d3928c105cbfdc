"""Paper 003, Prop. 1 / Thm. 1: the empirical stability boundary of GD on deep scalar products.

For w_L...w_1 fitting lambda (sigma = 1), GD starts next to the balanced equilibrium
|w_i| = |lambda|^{1/L} (Lyapunov's indirect method) and the largest step that still converges is
found by bisection on a log scale. Prop. 1's bound delta_max = 2/(L |lambda|^{2(L-1)/L}) is the
prediction; the ratio empirical / bound should be ~1 (Thm. 1 applies it per eigenvalue).
Uses ``dcanets.analysis.stability`` (the stability module of the DCA issue).
"""
from __future__ import annotations

import math

from common import figure_path, parse_args, progress, write_result
from dcanets.analysis.stability import scalar_product_max_step, simulate_scalar_product


def empirical_max_step(lam: float, L: int, iters: int, rounds: int, seed: int) -> float:
    bound = scalar_product_max_step(lam, L)
    lo, hi = math.log(bound / 4), math.log(bound * 4)
    for _ in range(rounds):
        mid = (lo + hi) / 2
        run = simulate_scalar_product(lam, L, math.exp(mid), iters=iters, seed=seed, tol=1e-6)
        lo, hi = (mid, hi) if run.converged else (lo, mid)
    return math.exp(lo)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.quick:
        grid, iters, rounds = [(1.5, 5), (0.5, 10)], 300, 6
    else:
        grid, iters, rounds = [(lam, L) for lam in (0.5, 1.5, 3.0, -1.5) for L in (2, 5, 10, 20)], 3000, 12
    rows = []
    for lam, L in grid:
        emp = empirical_max_step(lam, L, iters, rounds, args.seed)
        bound = scalar_product_max_step(lam, L)
        rows.append({"lambda": lam, "L": L, "bound": bound, "empirical": emp, "ratio": emp / bound})
        progress(f"lambda {lam:5.2f} L {L:3d}: bound {bound:.4g} empirical {emp:.4g} ratio {emp / bound:.3f}")
    plot(rows, figure_path("paper003_stability", args.quick))
    budget = {"iters": iters, "bisection_rounds": rounds, "sigma": 1.0,
              "start": "balanced equilibrium x (1 + 1e-3 N(0,1))",
              "converged": "|prod w - lambda| <= 1e-6 max(1, |lambda|) after iters"}
    write_result("paper003_stability", args.quick, {"budget": budget, "rows": rows}, args.out)


def plot(rows: list, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    b = [r["bound"] for r in rows]
    ax.loglog(b, [r["empirical"] for r in rows], "o")
    ax.loglog([min(b), max(b)], [min(b), max(b)], "k--", label="empirical = Prop. 1 bound")
    ax.set_xlabel("Prop. 1 bound 2/(L|λ|^{2(L-1)/L})"), ax.set_ylabel("largest converging step")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


if __name__ == "__main__":
    main()
