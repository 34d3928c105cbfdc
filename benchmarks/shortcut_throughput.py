"""Training-step throughput of NegNet against ResNet: a sign flip must cost nothing.

Forward + backward + SGD step, batch 64, 32x32 inputs, CPU. negnet18 vs timm's resnet18 and
cifar_negnet56 vs cifar_resnet56, timed alternately in one run; the ratio is
NegNet images/s over ResNet images/s (goal >= 0.97). A third pair, cifar_negnet56 vs
cifar_actresnet56 (same activation placement, act(F) +/- s), isolates the sign flip itself
from the placement of the activation. A fourth, ``cifar_negnet56:unfused`` vs cifar_resnet56,
times NegNet's reference block tail (``dcanets.layers.unfused``: autograd's
``act(F) - s``) instead of the fused one, the cost the fused tail removes.
"""
from __future__ import annotations

from contextlib import nullcontext

import timm
import torch

import dcanets  # noqa: F401
from common import alternate, median, parse_args, progress, write_result
from dcanets.layers import unfused

PAIRS = [("negnet18", "resnet18"), ("cifar_negnet56", "cifar_resnet56"),
         ("cifar_negnet56", "cifar_actresnet56"), ("cifar_negnet56:unfused", "cifar_resnet56")]


def step_fn(spec: str, batch: int, steps: int):
    """``spec``: a timm name, or ``name:unfused`` for the shortcut family's reference block tail."""
    name, _, how = spec.partition(":")
    model = timm.create_model(name, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def run() -> None:
        with unfused() if how == "unfused" else nullcontext():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    run()  # warm-up
    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    rounds, steps, batch = (2, 1, 16) if args.quick else (11, 3, 64)
    rows = []
    for neg, base in PAIRS:
        progress(f"timing {neg} vs {base}: {rounds} rounds x {steps} steps, batch {batch}")
        times = alternate({neg: step_fn(neg, batch, steps), base: step_fn(base, batch, steps)}, rounds)
        ips = {k: batch * steps / median(v) for k, v in times.items()}
        row = {"model": neg, "baseline": base, "images_per_s": round(ips[neg], 1),
               "baseline_images_per_s": round(ips[base], 1), "ratio": round(ips[neg] / ips[base], 3)}
        print(f"{neg:16s} {row['images_per_s']:8.1f} img/s   {base:16s} "
              f"{row['baseline_images_per_s']:8.1f} img/s   ratio {row['ratio']:.3f}")
        rows.append(row)
    budget = {"batch": batch, "input": "3x32x32", "rounds": rounds, "steps_per_round": steps,
              "statistic": "median over rounds"}
    write_result("shortcut_throughput", args.quick, {"budget": budget, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
