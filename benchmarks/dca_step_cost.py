"""Optimizer step cost of the DC decompositions against SGD on the same model, one run.

A "step" is everything a training loop does per batch: zero_grad, forward, loss, backward(s) and
the update. ``dcal2`` is SGD with lr = 1/λ (paper 000, eq. 9). ``dcacounter``'s exact eq. 19 step
needs a = ∇L and eq. 17's c apart; in the plain loop its hooks (``ShortcutTap``) add one
vector–Jacobian product of the trunk below the last block to the loop's own backward, timed
here on its own ("extra VJP"). The closure path computes the same step from one forward with
the graph cut at the block and two products; ``c="skip"`` re-runs the whole forward and
backward. Arms are timed alternately, one step each per round, so machine noise hits them alike;
the ratios are medians over rounds, of wall time and of this process's CPU time (one thread: the
CPU time leaves out the time other jobs on a shared machine hold the core).

    python benchmarks/dca_step_cost.py --full    # cifar_plainnet56, batch 128, CPU, 1 thread
    python benchmarks/dca_step_cost.py --quick   # cifar_plainnet20, batch 32 (CI)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import median, parse_args, progress, write_result  # noqa: E402

NAME = "dca_step_cost"
MAIN = "dcacounter eq. 19 (plain loop)"
# arm -> (optimizer, options, how it is stepped: "plain" loop or "closure")
ARMS: Dict[str, Tuple[str, Dict, str]] = {
    "sgd": ("sgd", {}, "plain"),
    "dcal2": ("dcal2", {}, "plain"),
    "dcacounter c=skip (closure)": ("dcacounter", {"c": "skip"}, "closure"),      # 2 forward + backward
    MAIN: ("dcacounter", {}, "plain"),                                             # + 1 trunk VJP
    "dcacounter eq. 19 (closure path)": ("dcacounter", {}, "closure"),            # cut graph, 2 trunk VJPs
    "dcacounter beta_every=4 (plain loop)": ("dcacounter", {"beta_every": 4}, "plain"),
    "dcaquasihalf a + c (plain loop)": ("dcaquasihalf", {}, "plain"),             # fused: 1 backward
}


def _stepper(model, opt_name: str, options: Dict, how: str, x, y) -> Callable[[], None]:
    import timm.optim

    from dcanets.optim import prepare, take_step

    opt = timm.optim.create_optimizer_v2(model, opt_name, lr=0.01, weight_decay=5e-4, momentum=0.9, **options)
    if prepare(opt, model) and how == "plain":
        raise SystemExit(f"{opt_name} {options} needs a closure; it cannot be a plain-loop arm")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step() -> None:
        take_step(opt, closure, how == "closure")
    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def _forward_only(model, x, y) -> Callable[[], None]:
    """zero_grad + forward + loss: the part of a step before the backward."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y)
    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _alternate(fns: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, Dict[str, List[float]]]:
    """{clock: {arm: seconds per round}}: each arm once per round, in turn."""
    times: Dict[str, Dict[str, List[float]]] = {c: {k: [] for k in fns} for c in CLOCKS}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = {c: clock() for c, clock in CLOCKS.items()}
            fn()
            for c, clock in CLOCKS.items():
                times[c][key].append(clock() - t0[c])
    return times


def _time_extra_vjp(step: Callable[[], None]) -> Dict[str, List[float]]:
    """Record the seconds of the tap's extra vector–Jacobian product on every later step."""
    tap = step.optimizer.tap  # type: ignore[attr-defined]
    seconds: Dict[str, List[float]] = {c: [] for c in CLOCKS}
    inner = tap.vjp

    def timed(*args):
        t0 = {c: clock() for c, clock in CLOCKS.items()}
        out = inner(*args)
        for c, clock in CLOCKS.items():
            seconds[c].append(clock() - t0[c])
        return out
    tap.vjp = timed
    return seconds


def _summary(times: Dict[str, List[float]], extra: List[float]) -> Dict[str, Dict[str, float]]:
    """Medians, ratios to SGD, and the parts of the step (one clock)."""
    med = {k: median(v) for k, v in times.items()}
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    parts = {"forward_s": med["forward only"], "sgd_backward_and_update_s": med["sgd"] - med["forward only"],
             "extra_vjp_s": median(extra)}
    parts["extra_vjp_over_sgd_backward"] = parts["extra_vjp_s"] / parts["sgd_backward_and_update_s"]
    parts["floor_ratio"] = 1 + parts["extra_vjp_s"] / med["sgd"]     # SGD + the extra VJP, nothing else
    return {"median_seconds": med, "ratio_vs_sgd": {k: med[k] / med["sgd"] for k in med},
            "mean_seconds": mean, "mean_ratio_vs_sgd": {k: mean[k] / mean["sgd"] for k in mean},
            "parts": parts}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import copy

    import timm

    import dcanets  # noqa: F401

    torch.set_num_threads(1)
    model_name, batch, rounds = ("cifar_plainnet20", 32, 3) if args.quick else ("cifar_plainnet56", 128, 8)
    torch.manual_seed(args.seed)
    base = timm.create_model(model_name)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {k: _stepper(copy.deepcopy(base), opt, kw, how, x, y) for k, (opt, kw, how) in ARMS.items()}
    steps["forward only"] = _forward_only(copy.deepcopy(base), x, y)
    for fn in steps.values():   # warm-up (and the counter loss's first, probing pass)
        fn()
    extra = _time_extra_vjp(steps[MAIN])
    progress(f"{NAME}: {model_name}, batch {batch}, {rounds} alternating rounds")
    times = _alternate(steps, rounds)
    result = {c: _summary(times[c], extra[c]) for c in CLOCKS}
    for k in steps:
        w, c = result["wall"], result["cpu"]
        print(f"{k:40s} {w['median_seconds'][k] * 1000:9.1f} ms/step   x{w['ratio_vs_sgd'][k]:.2f} of SGD "
              f"(median wall)   x{c['ratio_vs_sgd'][k]:.2f} (median CPU)   "
              f"x{w['mean_ratio_vs_sgd'][k]:.2f} (mean wall)")
    for clock in CLOCKS:
        parts = result[clock]["parts"]
        print(f"{clock}: extra VJP of {MAIN}: {parts['extra_vjp_s'] * 1000:.1f} ms = "
              f"{parts['extra_vjp_over_sgd_backward']:.2f} x SGD's backward + update "
              f"({parts['sgd_backward_and_update_s'] * 1000:.1f} ms); SGD + extra VJP = x{parts['floor_ratio']:.2f}")
    write_result(NAME, args.quick, {
        "budget": {"model": model_name, "batch": batch, "image": "3x32x32 random", "rounds": rounds,
                   "threads": 1, "device": "cpu", "seed": args.seed,
                   "step": "zero_grad + forward + loss + backward(s) + update",
                   "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
        **result["wall"], "cpu_time": result["cpu"], "all_seconds": times, "extra_vjp_seconds": extra,
        "goals": {MAIN: "<= 1.3x", "dcal2": "~1.0x"},
        "arms": {k: {"opt": opt, "stepped": how, **kw} for k, (opt, kw, how) in ARMS.items()},
    }, args.out)


if __name__ == "__main__":
    main()
