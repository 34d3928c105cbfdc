"""``dcanets fidelity``: cosine of an optimizer's steps with the shortcut network's gradient, over training.

``dcanets fidelity --model cifar_plainnet56 --opt dcacounter --opt-kwargs rho=0.01 --data digits
--steps 20 --every 5 --output DIR`` trains the model for ``--steps`` steps (one real optimizer step
per batch) and at steps 0, every, 2·every, ... prints cos(Δw, −g_ref) for the whole net and per
stage, with plain SGD's cosine at the same weights as the baseline column; ``--output`` receives
``<name>.json`` (every measurement, the settings) and ``<name>.png`` (cosine over steps). See
:mod:`dcanets.analysis.fidelity` and docs/fidelity.md.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from dcanets.analysis.fidelity import fidelity_over_training
from dcanets.engine.fidelity import REFERENCES, FidelityReport
from dcanets.names import check_model
from dcanets.validation import kv_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model of the shortcut family, e.g. cifar_plainnet56")
    parser.add_argument("--model-kwargs", type=kv_argument, default={}, help="extra create_model arguments, 'k=v,k=v'")
    parser.add_argument("--opt", default="sgd", help="any timm optimizer name (DCA decompositions included)")
    parser.add_argument("--opt-kwargs", type=kv_argument, default={}, help="extra optimizer arguments, e.g. 'rho=0.01'")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="momentum, passed when the optimizer has one (default 0: the step is the direction)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    parser.add_argument("--data", default="digits",
                        help="'digits', 'synthetic[:N]' or a data path (see dcanets.engine.data)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--every", type=int, default=5, help="measure every N steps, from step 0 (default 5)")
    parser.add_argument("--reference", default="gradnet", choices=REFERENCES,
                        help="gradnet: shortcut gradient at every block (default); last: at the last same-shape "
                             "block only (the one-block TestNet); self: the model's own gradient")
    parser.add_argument("--seed", type=int, default=0, help="model init, batch order and both passes' RNG")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--output", default=None, help="folder for <name>.json and <name>.png")
    parser.add_argument("--name", default=None, help="file name stem in --output (default <model>-<opt>)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")


def _data(spec: str) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """All images of a data source, normalised per channel, with labels, classes and channels."""
    from dcanets.engine import data as dcadata

    images = dcadata.load(spec, progress=False)
    return dcadata.normalized(images.images), images.labels, images.num_classes, images.in_chans


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, seed: int,
             device: torch.device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of a seeded reshuffle per epoch (the last partial batch of an epoch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, len(y))
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(y), generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        yield x[idx].to(device), y[idx].to(device)


def _fmt(v: Optional[float]) -> str:
    return "   n/a" if v is None or v != v else f"{v:6.3f}"


def table(reports: List[FidelityReport], lr: float) -> str:
    """step, loss, whole-net cosine, SGD's cosine, the step's length next to SGD's (‖Δw‖/(lr·‖∇L‖),
    1 for SGD without momentum or decay), one column per stage, and the optimizer's β (eq. 19) when
    it reports one."""
    stages = list(reports[0].stages) if reports else []
    betas = [r.extra.get("diagnostics", {}).get("beta") for r in reports]
    show_beta = any(b is not None for b in betas)
    head = f"{'step':>5} {'loss':>7} {'cos':>6} {'sgd':>6} {'len':>6} " + " ".join(f"{s:>7}" for s in stages)
    lines = [head + ("    beta" if show_beta else "")]
    for r, beta in zip(reports, betas):
        length = r.step_norm / (lr * r.baseline_norm) if r.baseline_norm else None
        lines.append(f"{r.step:5d} {r.loss:7.4f} {_fmt(r.cosine)} {_fmt(r.baseline_cosine)} {_fmt(length)} "
                     + " ".join(f" {_fmt(r.stages[s].cosine)}" for s in stages)
                     + (f"  {_fmt(beta)}" if show_beta else ""))
    return "\n".join(lines)


def plot(reports: List[FidelityReport], path: Path, title: str) -> None:
    """Cosine over steps: whole net (thick), stages (thin), SGD's cosine (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [-1 if r.step is None else r.step for r in reports]
    nan = float("nan")
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    ax.plot(steps, [r.cosine for r in reports], "o-", lw=2.5, color="k", label="whole net")
    baseline = [nan if r.baseline_cosine is None else r.baseline_cosine for r in reports]
    ax.plot(steps, baseline, "o--", lw=1.5, color="gray", label="SGD gradient (whole)")
    for s in (reports[0].stages if reports else {}):
        ax.plot(steps, [r.stages[s].cosine for r in reports], ".-", lw=1, label=s)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(Δw, −∇ shortcut net)")
    ax.set_ylim(-0.2, 1.05)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import timm

    import dcanets  # noqa: F401  (registers the dcanets models and decompositions)

    if args.batch < 1 or args.steps < 1 or args.every < 1:
        raise ValueError(f"--batch, --steps and --every must be >= 1; got {args.batch}, {args.steps}, {args.every}")
    check_model(args.model)
    device = torch.device(args.device)
    x, y, num_classes, in_chans = _data(args.data)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=in_chans, **args.model_kwargs).to(device)
    from dcanets.engine.loop import create_optimizer, second_order

    optimizer = create_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay, args.opt_kwargs)
    t0 = time.perf_counter()
    reports = fidelity_over_training(model, optimizer, _batches(x, y, args.batch, args.steps, args.seed, device),
                                     every=args.every, reference=args.reference, seed=args.seed,
                                     create_graph=second_order(args.opt))
    seconds = time.perf_counter() - t0
    budget = (f"{args.model} on {args.data}, {args.opt} lr={args.lr} momentum={args.momentum} "
              f"wd={args.weight_decay} {args.opt_kwargs or ''}, batch {min(args.batch, len(y))}, "
              f"{args.steps} steps, seed {args.seed}, reference {args.reference}")
    result = dict(model=args.model, model_kwargs=args.model_kwargs, opt=args.opt, opt_kwargs=args.opt_kwargs,
                  lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, data=args.data,
                  batch=min(args.batch, len(y)), steps=args.steps, every=args.every, reference=args.reference,
                  seed=args.seed, device=str(device), seconds=round(seconds, 3),
                  params=sum(p.numel() for p in model.parameters()), records=[r.to_dict() for r in reports])
    if args.output is not None:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"{args.model}-{args.opt}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        plot(reports, out / f"{stem}.png", budget)
        result["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.png")]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"cos(Δw, −g_ref): {budget} ({seconds:.1f} s)")
        print(table(reports, args.lr))
        for f in result.get("files", []):
            print(f"wrote {f}")
    return 0
