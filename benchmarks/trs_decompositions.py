"""Proximal vs projective DCA (plain and boosted) on random trust-region subproblems (paper 000, §2).

For each instance (A = Q diag(U[-1,1]) Qᵀ, b ~ N(0, I), r = 1; "hard" = b ⟂ the λ_min eigenvector)
the exact optimum F* comes from the eigen-decomposition + secular equation; every method starts
from the same random point in the ball and runs until (F − F*)/max(1, |F*|) ≤ 1e-6 (callback),
convergence elsewhere, or the iteration cap. Reported per (kind, n, method): median iterations and
wall time to the target over the seeds that reached it, the fraction that reached it, and the
time ratio against plain projective DCA on the same instances.
"""
from __future__ import annotations

import time

import numpy as np

from common import figure_path, median, parse_args, progress, write_result
from dcanets.dca import exact_trs, minimize, random_trs, trs_problem

METHODS = {"projective": ("projective", False), "proximal": ("proximal", False),
           "projective+boost": ("projective", True), "proximal+boost": ("proximal", True)}
TARGET = 1e-6


def run_one(A, b, r, fstar, x0, decomposition, boosted, max_iter):
    prob = trs_problem(A, b, r, decomposition)
    reached = lambda x, f: (f - fstar) / max(1.0, abs(fstar)) <= TARGET   # noqa: E731
    t0 = time.perf_counter()
    res = minimize(prob, x0, boosted=boosted, max_iter=max_iter, xtol=1e-13, ftol=0.0, callback=reached)
    return {"reached": res.status == "callback", "nit": res.nit, "time_s": time.perf_counter() - t0,
            "gap": (res.fun - fstar) / max(1.0, abs(fstar))}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes, seeds, max_iter = ([10, 50], 2, 5000) if args.quick else ([10, 50, 200], 3, 40000)
    kinds = ["easy", "hard"]
    rows = []
    for kind in kinds:
        for n in sizes:
            per = {m: [] for m in METHODS}
            for s in range(seeds):
                A, b, r = random_trs(n, seed=args.seed + 1000 * n + s, hard=kind == "hard")
                fstar = exact_trs(A, b, r).fun
                x0 = trs_problem(A, b, r).sample(np.random.default_rng(s))
                for m, (dec, boosted) in METHODS.items():
                    per[m].append(run_one(A, b, r, fstar, x0, dec, boosted, max_iter))
            base = [o["time_s"] for o in per["projective"]]
            for m, outs in per.items():
                ok = [o for o in outs if o["reached"]]
                row = {"kind": kind, "n": n, "method": m, "seeds": seeds, "reached": f"{len(ok)}/{seeds}",
                       "median_iters": median([o["nit"] for o in ok]) if ok else None,
                       "median_time_ms": round(1e3 * median([o["time_s"] for o in ok]), 2) if ok else None,
                       "time_ratio_vs_projective": round(median([o["time_s"] / t for o, t in zip(outs, base)]), 2),
                       "worst_final_gap": max(o["gap"] for o in outs)}
                rows.append(row)
                progress(f"{kind:4s} n={n:4d} {m:17s} reached {row['reached']}  iters {row['median_iters']}  "
                         f"time {row['median_time_ms']} ms  ratio {row['time_ratio_vs_projective']}")
    budget = {"sizes": sizes, "seeds_per_size": seeds, "kinds": kinds, "target_rel_gap": TARGET,
              "max_iter": max_iter, "start": "same uniform random point in the ball for every method",
              "rho": "projective: lambda_max(A); proximal: -lambda_min(A) + 0.1*||A||",
              "boost": "Armijo t0=1, beta=0.5, alpha=1e-4, 12 tries",
              "statistic": ("medians over seeds that reached the target; "
                            "ratio = median over seeds of time/time_projective")}
    write_result("trs_decompositions", args.quick, {"budget": budget, "rows": rows}, args.out)
    plot(rows, figure_path("trs_decompositions", args.quick))


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ["easy", "hard"]):
        for m in METHODS:
            pts = [(r["n"], r["median_iters"]) for r in rows if r["kind"] == kind and r["method"] == m
                   and r["median_iters"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="n", ylabel="median iterations to 1e-6 gap", title=f"{kind} TRS")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
