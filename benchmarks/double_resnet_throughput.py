"""Training throughput of double_resnet_mnist on CPU: the batched heads against a loop over nets.

Forward + backward + Adam step on 1x28x28 inputs. The same model (same weights) is timed with
its 20 convex residual nets as one einsum per layer (``batched=True``) and as a Python loop over
the nets (``batched=False``), alternately in one run; the ratio is batched / loop images/s.
"""
from __future__ import annotations

import timm
import torch

import dcanets  # noqa: F401
from common import alternate, median, parse_args, progress, write_result


def step_fn(model: torch.nn.Module, batched: bool, batch: int, steps: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def run() -> None:
        model.batched = batched
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rounds, steps, batch = (2, 1, 32) if args.quick else (5, 3, 128)
    model = timm.create_model("double_resnet_mnist")
    fns = {"batched": step_fn(model, True, batch, steps), "loop": step_fn(model, False, batch, steps)}
    for fn in fns.values():
        fn()  # warm-up
    progress(f"timing double_resnet_mnist batched vs loop: {rounds} rounds x {steps} steps, batch {batch}")
    times = alternate(fns, rounds)
    ips = {k: batch * steps / median(v) for k, v in times.items()}
    row = {"model": "double_resnet_mnist", "params": sum(p.numel() for p in model.parameters()),
           "batched_images_per_s": round(ips["batched"], 1), "loop_images_per_s": round(ips["loop"], 1),
           "speedup": round(ips["batched"] / ips["loop"], 3)}
    print(f"batched {row['batched_images_per_s']:.1f} img/s   loop {row['loop_images_per_s']:.1f} img/s   "
          f"speed-up {row['speedup']:.2f}x")
    budget = {"batch": batch, "input": "1x28x28", "rounds": rounds, "steps_per_round": steps,
              "optimizer": "adam", "torch_threads": 1, "statistic": "median over rounds"}
    write_result("double_resnet_throughput", args.quick, {"budget": budget, "rows": [row]}, args.out)


if __name__ == "__main__":
    main()
