"""Paper 001: success rate of normalized GD against k (p = 8), no prior / prior / prior + warm-up.

Success: within tol = 1e-2 of the global optimum (||v - v*|| and ||a - a*|| / ||a*||); spurious:
within the same tol of paper 001's spurious optimum (v = -v*, a = a_bar). Every variant sees the
same teachers (skip-prior teachers, a* ~ N(0, I)) and the same a_0. The sweep runs batched over
teachers; a per-teacher Python loop on a subset of the same run gives the speed-up.
"""
from __future__ import annotations

import time

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers import p001_teacher_student as ts

NAME = "paper001_success_rate"


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    quick = args.quick
    ks = [2, 8, 32] if quick else [2, 4, 8, 12, 16, 20, 24, 32]
    n = 50 if quick else 500
    steps = 1500 if quick else 3000
    variants = {name: ts.GDConfig(**{**cfg.__dict__, "steps": steps,
                                     "warmup_steps": min(cfg.warmup_steps, steps // 3)})
                for name, cfg in ts.VARIANTS.items()}
    t0 = time.perf_counter()
    rates = ts.success_rates(ks, 8, n, variants, seed=args.seed)
    sweep_s = time.perf_counter() - t0
    progress(f"sweep: {sweep_s:.1f}s")

    # per-teacher loop on a subset of the same teachers, same config: the vectorization speed-up
    k, loop_n = 16, 5 if quick else 20
    teachers = ts.sample_teachers(loop_n, k, 8, torch.Generator().manual_seed(args.seed))
    cfg = variants["prior"]
    t0 = time.perf_counter()
    ts.normalized_gd(teachers, cfg, torch.Generator().manual_seed(0))
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(loop_n):
        ts.normalized_gd(ts.slice_teachers(teachers, i), cfg, torch.Generator().manual_seed(i))
    loop_s = time.perf_counter() - t0
    speedup = loop_s / batched_s
    progress(f"batched {batched_s:.2f}s vs loop {loop_s:.2f}s for {loop_n} teachers: x{speedup:.1f}")

    print(f"{'k':>4} " + " ".join(f"{v:>22}" for v in variants))
    for k_ in ks:
        print(f"{k_:>4} " + " ".join(
            f"{rates[v][k_]['success']:>10.2f} (spur {rates[v][k_]['spurious']:.2f})" for v in variants))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v, style in zip(variants, ("o-", "s-", "^--")):
        ax.plot(ks, [rates[v][k_]["success"] for k_ in ks], style, label=f"{v} success")
    ax.plot(ks, [rates["no_prior"][k_]["spurious"] for k_ in ks], "x:", label="no_prior at spurious opt.")
    ax.axhspan(0.25, 0.75, color="grey", alpha=0.15, label="paper 001: trapped w.p. 1/4-3/4")
    ax.set(xlabel="k (patches), p = 8", ylabel="rate", title=f"{n} teachers per k, {steps} GD steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure_path(NAME, quick), dpi=120)

    write_result(NAME, quick, {
        "budget": {"p": 8, "k": ks, "teachers_per_k": n, "steps": steps, "tol": 1e-2,
                   "warmup_steps": variants["prior_warmup"].warmup_steps,
                   "warmup_factor": variants["prior_warmup"].warmup_factor, "seed": args.seed},
        "rates": {v: {str(k_): r for k_, r in d.items()} for v, d in rates.items()},
        "sweep_seconds": sweep_s,
        "vectorization": {"k": k, "teachers": loop_n, "batched_s": batched_s, "loop_s": loop_s,
                          "speedup": speedup},
    }, args.out)


if __name__ == "__main__":
    main()
