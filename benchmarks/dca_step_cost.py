"""Optimizer step cost of the DC decompositions against SGD on the same model, one run.

``dcacounter`` needs the loss twice per step (L and the counter loss L'_0 with the last
same-shape block skipped, paper 000, eqs. 10 and 19), ``dcal2`` is SGD with lr = 1/λ (eq. 9).
A "step" is everything a training loop does per batch: zero_grad, forward, loss, backward(s)
and the update. Steps of the three optimizers are timed alternately (benchmarks.common.alternate)
so machine noise hits them alike; the ratios are medians over rounds.

    python benchmarks/dca_step_cost.py --full    # cifar_plainnet56, batch 128, CPU, 1 thread
    python benchmarks/dca_step_cost.py --quick   # cifar_plainnet20, batch 32 (CI)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import alternate, median, parse_args, progress, write_result  # noqa: E402

NAME = "dca_step_cost"


def _stepper(model, opt_name: str, x, y, **opt_kwargs):
    import timm.optim

    from dcanets.optim.decompositions import prepare

    opt = timm.optim.create_optimizer_v2(model, opt_name, lr=0.01, weight_decay=5e-4, momentum=0.9,
                                           **opt_kwargs)
    needs_closure = prepare(opt, model)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step() -> None:
        if needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return step


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
    arms = {
        "sgd": ("sgd", {}),
        "dcal2": ("dcal2", {}),
        "dcacounter c=skip": ("dcacounter", {"c": "skip"}),                  # c = ∇L'_0: 2 passes
        "dcacounter (c=shortcut, eq. 17)": ("dcacounter", {}),               # 1 forward, 2 VJPs
        "dcacounter c=shortcut beta_every=4": ("dcacounter", {"c": "shortcut", "beta_every": 4}),
        "dcaquasihalf c=shortcut": ("dcaquasihalf", {"c": "shortcut"}),     # a + c in 1 VJP
    }
    steps = {k: _stepper(copy.deepcopy(base), v, x, y, **kw) for k, (v, kw) in arms.items()}
    for fn in steps.values():   # warm-up (and the counter loss's first, probing pass)
        fn()
    progress(f"{NAME}: {model_name}, batch {batch}, {rounds} alternating rounds")
    times = alternate(steps, rounds)
    med = {k: median(v) for k, v in times.items()}
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratios = {k: med[k] / med["sgd"] for k in med}
    mean_ratios = {k: mean[k] / mean["sgd"] for k in mean}   # amortised (beta_every > 1)
    for k in arms:
        print(f"{k:36s} {med[k] * 1000:9.1f} ms/step   x{ratios[k]:.2f} of SGD (median)   "
              f"x{mean_ratios[k]:.2f} (mean)")
    write_result(NAME, args.quick, {
        "budget": {"model": model_name, "batch": batch, "image": "3x32x32 random", "rounds": rounds,
                   "threads": 1, "device": "cpu", "seed": args.seed,
                   "step": "zero_grad + forward + loss + backward(s) + update"},
        "median_seconds": med, "ratio_vs_sgd": ratios, "mean_seconds": mean,
        "mean_ratio_vs_sgd": mean_ratios, "all_seconds": times,
        "goals": {"dcacounter": "<= 1.5x", "dcal2": "~1.0x"},
        "arms": {k: {"opt": v, **kw} for k, (v, kw) in arms.items()},
    }, args.out)


if __name__ == "__main__":
    main()
