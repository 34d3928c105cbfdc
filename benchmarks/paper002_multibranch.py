"""Paper 002, §3.2: non-convexity of multi-branch MLPs against the number of branches I, compared
at equal training loss.

Paper 002 bounds the normalized duality gap of f = (1/I) sum_i f_i by 2/I: a bound that falls as
1/I, for identical sub-networks whose number grows. The gap itself cannot be computed for a
network, so at the point where each net first reaches a target training loss we measure proxies
(dcanets.papers.p002_multibranch): negative-curvature mass of the Hessian spectral density and
|lambda_min|/lambda_max (Lanczos), and the gap between the loss along random filter-normalized
lines (t in [-1, 1]) and its 1-D convex envelope; plus the Adam steps needed to reach the target.
Three settings: one hidden layer and three hidden layers with the total width 64 split over the
branches, and one hidden layer with 4 units per branch (total width 4 I, the paper's setting).
sklearn digits (8x8, 10 classes), full-batch Adam lr 1e-2, several seeds (data subset and init).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers.p002_multibranch import measure

NAME = "paper002_multibranch"
PROXIES = ["negative_mass", "neg_ratio", "envelope_gap_mean", "steps"]
SETTINGS: Dict[str, Dict[str, Any]] = {
    "total64_1h": {"depth": 1, "total_width": 64, "branch_width": None},
    "total64_3h": {"depth": 3, "total_width": 64, "branch_width": None},
    "branch4_1h": {"depth": 1, "total_width": 0, "branch_width": 4},
}


def budget(quick: bool) -> Dict[str, Any]:
    """Sizes of the run; every I must reach every target within ``max_steps``."""
    if quick:
        return {"settings": ["total64_1h", "total64_3h"], "branches": [1, 8, 64], "seeds": [0],
                "targets": [0.1], "max_steps": 1000, "n": 256, "lines": 2, "line_radius": 1.0,
                "lanczos_steps": 15}
    return {"settings": list(SETTINGS), "branches": [1, 2, 4, 8, 16, 32, 64], "seeds": [0, 1, 2, 3, 4],
            "targets": [0.05, 0.01], "max_steps": 6000, "n": 512, "lines": 8, "line_radius": 1.0,
            "lanczos_steps": 60}


def run_setting(name: str, target: float, b: Dict[str, Any], seed_offset: int) -> Dict[str, List[Dict[str, Any]]]:
    """Rows per I (one per seed) for one setting and target loss."""
    spec = SETTINGS[name]
    rows: Dict[str, List[Dict[str, Any]]] = {str(i): [] for i in b["branches"]}
    for seed in b["seeds"]:
        reports = measure(b["branches"], total_width=spec["total_width"] or 64, depth=spec["depth"], n=b["n"],
                          steps=b["max_steps"], lines=b["lines"], lanczos_steps=b["lanczos_steps"],
                          seed=seed + seed_offset, radius=b["line_radius"], target_loss=target,
                          branch_width=spec["branch_width"])
        for r in reports:
            rows[str(r.num_branches)].append({"seed": seed + seed_offset, "train_loss": r.train_loss,
                                              "steps": r.steps, "reached": r.reached,
                                              "total_width": r.total_width, **r.hessian, **r.lines})
    return rows


def trend(rows: Dict[str, List[Dict[str, Any]]], proxy: str) -> Dict[str, float]:
    """How ``proxy`` moves with I over the runs that reached the target: Spearman's rank
    correlation (all seeds pooled) and the log-log slope of the per-I median (-1 is the 1/I of
    the bound; NaN when a median is 0)."""
    from scipy.stats import spearmanr

    pairs = [(int(i), row[proxy]) for i, rs in rows.items() for row in rs if row["reached"]]
    values = [v for _, v in pairs]
    rho, p = math.nan, math.nan  # undefined for a constant proxy (a line gap of 0 everywhere)
    if len(set(values)) > 1:
        rho, p = spearmanr([i for i, _ in pairs], values)
    med = {int(i): statistics.median(r[proxy] for r in rs if r["reached"])
           for i, rs in rows.items() if any(r["reached"] for r in rs)}
    slope = math.nan
    if len(med) > 1 and min(med.values()) > 0:
        xs, ys = [math.log(i) for i in med], [math.log(v) for v in med.values()]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"spearman": float(rho), "p_value": float(p), "loglog_slope_of_median": slope,
            "median_by_I": {str(i): v for i, v in med.items()}}


FLOOR = 1e-6  # zeros are drawn here on the log axes


def _plot_proxy(ax: Any, results: Dict[str, Any], b: Dict[str, Any], proxy: str) -> None:
    """Every run (x: did not reach the target) and the per-I median, one colour per target."""
    for target, colour in zip(b["targets"], ("C0", "C1", "C2")):
        for i, rs in results[str(target)]["rows"].items():
            for r in rs:
                ax.scatter(int(i), max(r[proxy], FLOOR), s=10, alpha=0.4, color=colour,
                           marker="o" if r["reached"] else "x")
        med = results[str(target)]["trends"][proxy]["median_by_I"]
        ax.plot([int(i) for i in med], [max(v, FLOOR) for v in med.values()], "-", color=colour,
                label=f"median, target loss {target}")
    if proxy != "steps":
        first = results[str(b["targets"][0])]["trends"][proxy]["median_by_I"]
        ref = max(next(iter(first.values())), FLOOR)
        ax.plot(b["branches"], [ref / i for i in b["branches"]], "k--", lw=0.8, label="∝ 1/I (the 2/I bound's rate)")
    ax.set(xscale="log", yscale="log", xlabel="branches I")


def plot(results: Dict[str, Any], b: Dict[str, Any], quick: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(PROXIES), len(b["settings"]), figsize=(4.2 * len(b["settings"]), 11),
                             squeeze=False)
    labels = {"negative_mass": "Hessian negative mass", "neg_ratio": "|λmin|/λmax",
              "envelope_gap_mean": "line envelope gap", "steps": "Adam steps to target"}
    for col, setting in enumerate(b["settings"]):
        for row, proxy in enumerate(PROXIES):
            _plot_proxy(axes[row][col], results[setting], b, proxy)
            axes[row][col].set_ylabel(labels[proxy])
        axes[0][col].set_title(setting)
        axes[0][col].legend(fontsize=6)
    fig.suptitle(f"digits n={b['n']}, seeds {b['seeds']}, measured where the training loss first reaches the target "
                 f"(x: never reached; 0 drawn at {FLOOR:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure_path(NAME, quick), dpi=100)


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    b = budget(args.quick)
    results: Dict[str, Any] = {}
    t0 = time.perf_counter()
    for setting in b["settings"]:
        results[setting] = {}
        for target in b["targets"]:
            rows = run_setting(setting, target, b, args.seed)
            trends = {proxy: trend(rows, proxy) for proxy in PROXIES}
            results[setting][str(target)] = {"rows": rows, "trends": trends}
            progress(f"{setting} target {target}: " + ", ".join(
                f"{p} rho {t['spearman']:+.2f} slope {t['loglog_slope_of_median']:+.2f}" for p, t in trends.items())
                + f" ({time.perf_counter() - t0:.0f}s)")
    plot(results, b, args.quick)
    write_result(NAME, args.quick, {
        "budget": {**b, "models": {s: SETTINGS[s] for s in b["settings"]}, "data": f"sklearn digits n={b['n']}",
                   "optimizer": "full-batch Adam lr 1e-2", "base_seed": args.seed},
        "results": results, "seconds": time.perf_counter() - t0,
    }, args.out)


if __name__ == "__main__":
    main()
