"""Paper 001: success rate of normalized GD against k (p = 8), no prior / prior / prior + warm-up,
under several teacher distributions, and against the teacher's angle to the shortcut direction.

Success: within tol = 1e-2 of the global optimum (||v - v*|| and ||a - a*|| / ||a*||); spurious:
within the same tol of paper 001's spurious optimum (v = -v*, a = a_bar). Every variant sees the
same teachers and the same a_0, so variants are compared teacher by teacher (paired difference,
exact McNemar p-value); each rate also gets a Wilson 95 % interval. Teacher distributions (named
options of dcanets.papers.p001_teacher_student): prior_sphere (||w*|| = 1, our earlier default),
prior_hemisphere (every filter the prior allows), prior_boundary (all at 90 degrees, the prior's
edge), generic (no prior). The sweep runs batched over teachers; a per-teacher Python loop on a
subset of the same run gives the speed-up.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers import p001_teacher_student as ts

NAME = "paper001_success_rate"
P = 8
TEACHER_DISTS = ["prior_sphere", "prior_hemisphere", "prior_boundary", "generic"]
PAIRS = {"warmup_vs_prior": ("prior", "prior_warmup"), "prior_vs_no_prior": ("no_prior", "prior")}


def budget(quick: bool) -> Dict[str, Any]:
    """Sizes of the run: the full one separates rates ~0.005 apart (paired, 4000 teachers)."""
    if quick:
        return {"k": [2, 8, 32], "teachers_per_k": 100, "steps": 1500,
                "angle_k": 8, "angles": [80.0, 90.0, 100.0], "angle_teachers": 100}
    return {"k": [2, 4, 8, 16, 32], "teachers_per_k": 4000, "steps": 3000,
            "angle_k": 16, "angles": [60.0, 80.0, 85.0, 88.0, 90.0, 92.0, 95.0, 100.0, 120.0],
            "angle_teachers": 2000}


def variants(steps: int) -> Dict[str, ts.GDConfig]:
    """The three procedures of the slides' plot with the run's step count (warm-up <= a third)."""
    return {name: dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 3))
            for name, cfg in ts.VARIANTS.items()}


def summarize_sweep(sweep: Dict[int, ts.SweepCell]) -> Dict[str, Any]:
    """Rates with intervals, paired differences, and how often warm-up's outcome is the sign of
    ``frozen_alignment`` at the prior's start (the mechanism we claim for warm-up)."""
    out: Dict[str, Any] = {"rates": {}, "paired": {}, "warmup_predicted": {}}
    for k, cell in sweep.items():
        results = cell.results
        out["rates"][str(k)] = {v: ts.summarize(r) for v, r in results.items()}
        out["paired"][str(k)] = {name: ts.paired_difference(results[a].success, results[b].success)
                                 for name, (a, b) in PAIRS.items() if a in results and b in results}
        if "prior_warmup" in results:
            u0 = ts.ones_direction(P).expand_as(cell.teachers.v)
            predicted = ts.frozen_alignment(cell.teachers, u0) > 0
            out["warmup_predicted"][str(k)] = (predicted == results["prior_warmup"].success).double().mean().item()
    return out


def angle_sweep(b: Dict[str, Any], configs: Dict[str, ts.GDConfig], seed: int) -> Dict[str, Any]:
    """Prior vs prior + warm-up at one k with every teacher at a fixed angle to the shortcut."""
    pair = {v: configs[v] for v in ("prior", "prior_warmup")}
    out = {}
    for deg in b["angles"]:
        teacher = f"angle:{deg:g}"
        sweep = ts.run_sweep([b["angle_k"]], P, b["angle_teachers"], pair, seed=seed, teacher=teacher)
        out[f"{deg:g}"] = summarize_sweep(sweep)
        r = out[f"{deg:g}"]["rates"][str(b["angle_k"])]
        progress(f"angle {deg:5.1f}: prior {r['prior']['success']:.3f} warm-up {r['prior_warmup']['success']:.3f}")
    return out


def vectorization(configs: Dict[str, ts.GDConfig], quick: bool, seed: int) -> Dict[str, Any]:
    """Batched GD against a per-teacher loop on the same teachers and config."""
    k, loop_n = 16, 5 if quick else 20
    teachers = ts.sample_teachers(loop_n, k, P, torch.Generator().manual_seed(seed))
    cfg = configs["prior"]
    t0 = time.perf_counter()
    ts.normalized_gd(teachers, cfg, torch.Generator().manual_seed(0))
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(loop_n):
        ts.normalized_gd(ts.slice_teachers(teachers, i), cfg, torch.Generator().manual_seed(i))
    loop_s = time.perf_counter() - t0
    progress(f"batched {batched_s:.2f}s vs loop {loop_s:.2f}s for {loop_n} teachers: x{loop_s / batched_s:.1f}")
    return {"k": k, "teachers": loop_n, "batched_s": batched_s, "loop_s": loop_s, "speedup": loop_s / batched_s}


def print_table(by_teacher: Dict[str, Any], ks: List[int]) -> None:
    print(f"{'teacher':>17} {'k':>3} {'no prior':>8} {'prior [95% CI]':>22} {'warm-up [95% CI]':>22} "
          f"{'warm-prior [95% CI]':>26} {'McNemar p':>9}")
    for teacher, res in by_teacher.items():
        for k in map(str, ks):
            r, d = res["rates"][k], res["paired"][k]["warmup_vs_prior"]
            cells = [f"{r[v]['success']:.4f} [{r[v]['success_low']:.3f}, {r[v]['success_high']:.3f}]"
                     for v in ("prior", "prior_warmup")]
            print(f"{teacher:>17} {k:>3} {r['no_prior']['success']:>8.3f} {cells[0]:>22} {cells[1]:>22} "
                  f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['p_value']:>9.2g}")


def _yerr(points: List[Dict[str, float]], centre: str, low: str, high: str) -> List[List[float]]:
    """matplotlib's asymmetric error bars from interval ends."""
    return [[x[centre] - x[low] for x in points], [x[high] - x[centre] for x in points]]


def _k_axis(ax: Any, ks: List[int]) -> None:
    """Log-scaled k axis labelled with the k values themselves."""
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()


def _plot_rates(ax: Any, by_teacher: Dict[str, Any], b: Dict[str, Any]) -> None:
    ks = b["k"]
    for (teacher, res), colour in zip(by_teacher.items(), ("C0", "C1", "C2", "C3")):
        for v, style in (("prior", "o-"), ("prior_warmup", "^--")):
            ax.plot(ks, [res["rates"][str(k)][v]["success"] for k in ks], style, color=colour, label=f"{teacher}: {v}")
    first = next(iter(by_teacher.values()))["rates"]
    ax.plot(ks, [first[str(k)]["no_prior"]["success"] for k in ks], "kx:", label="no prior")
    _k_axis(ax, ks)
    ax.set(xlabel="k (patches), p = 8", ylabel="success rate",
           title=f"{b['teachers_per_k']} teachers per k, {b['steps']} GD steps")
    ax.legend(fontsize=6)


def _plot_paired(ax: Any, by_teacher: Dict[str, Any], ks: List[int]) -> None:
    for teacher, res in by_teacher.items():
        diffs = [res["paired"][str(k)]["warmup_vs_prior"] for k in ks]
        ax.errorbar(ks, [d["difference"] for d in diffs], yerr=_yerr(diffs, "difference", "low", "high"),
                    marker="o", capsize=3, label=teacher)
    ax.axhline(0, color="k", lw=0.8)
    _k_axis(ax, ks)
    ax.set(xlabel="k", ylabel="success(warm-up) - success(prior)",
           title="paired difference, exact 95% interval")
    ax.legend(fontsize=7)


def _plot_angles(ax: Any, angles: Dict[str, Any], b: Dict[str, Any]) -> None:
    degs = [float(a) for a in angles]
    for v, style in (("prior", "o-"), ("prior_warmup", "^--")):
        r = [angles[a]["rates"][str(b["angle_k"])][v] for a in angles]
        ax.errorbar(degs, [x["success"] for x in r], yerr=_yerr(r, "success", "success_low", "success_high"),
                    fmt=style, capsize=3, label=v)
    ax.axvline(90, color="grey", ls=":", label="edge of the prior")
    ax.set(xlabel="angle between v* and 1/sqrt(p) (degrees)", ylabel="success rate",
           title=f"k = {b['angle_k']}, {b['angle_teachers']} teachers per angle")
    ax.legend(fontsize=7)


def plot(by_teacher: Dict[str, Any], angles: Dict[str, Any], b: Dict[str, Any], quick: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _plot_rates(axes[0], by_teacher, b)
    _plot_paired(axes[1], by_teacher, b["k"])
    _plot_angles(axes[2], angles, b)
    fig.tight_layout()
    fig.savefig(figure_path(NAME, quick), dpi=110)


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    b = budget(args.quick)
    configs = variants(b["steps"])
    t0 = time.perf_counter()
    by_teacher = {}
    for teacher in TEACHER_DISTS:
        sweep = ts.run_sweep(b["k"], P, b["teachers_per_k"], configs, seed=args.seed, teacher=teacher)
        by_teacher[teacher] = summarize_sweep(sweep)
        progress(f"{teacher}: {time.perf_counter() - t0:.1f}s")
    angles = angle_sweep(b, configs, args.seed)
    sweep_s = time.perf_counter() - t0
    progress(f"sweeps: {sweep_s:.1f}s")
    speed = vectorization(configs, args.quick, args.seed)
    print_table(by_teacher, b["k"])
    plot(by_teacher, angles, b, args.quick)
    write_result(NAME, args.quick, {
        "budget": {"p": P, **b, "tol": 1e-2, "warmup_steps": configs["prior_warmup"].warmup_steps,
                   "warmup_factor": configs["prior_warmup"].warmup_factor, "seed": args.seed,
                   "teachers": TEACHER_DISTS, "a_star": "N(0, I_k)"},
        "by_teacher": by_teacher, "angle_sweep": angles, "sweep_seconds": sweep_s, "vectorization": speed,
    }, args.out)


if __name__ == "__main__":
    main()
