"""``dcanets curvature``: Hessian extremes of a model's loss at initialisation, and the lr/rho/lambda they allow."""
from __future__ import annotations

import argparse
import json
from typing import Tuple

import torch

from dcanets.analysis.curvature import advise
from dcanets.hessian import extreme_eigenvalues
from dcanets.names import check_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="any timm model name, e.g. cifar_plainnet20")
    parser.add_argument("--data", default="digits",
                        help="'digits', 'synthetic[:N]' or a data path (see dcanets.engine.data)")
    parser.add_argument("--batch", type=int, default=128, help="images in the probed batch")
    parser.add_argument("--steps", type=int, default=30, help="Lanczos iterations (Hessian-vector products)")
    parser.add_argument("--seed", type=int, default=0, help="model init and Lanczos start")
    parser.add_argument("--eval-mode", action="store_true",
                        help="BatchNorm with running statistics instead of batch statistics")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _batch(spec: str, n: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """The first ``n`` images of a data source, normalised per channel, with classes and channels."""
    from dcanets.engine import data as dcadata

    images = dcadata.load(spec, progress=False)
    sub = images.subset(torch.arange(min(n, len(images))))
    x = dcadata.normalized(sub.images, dcadata.channel_stats(images.images))  # the whole set's statistics
    return x, sub.labels, images.num_classes, images.in_chans


def run(args: argparse.Namespace) -> int:
    import timm

    import dcanets  # noqa: F401  (registers the dcanets models)

    if args.batch < 1 or args.steps < 1:
        raise ValueError(f"--batch and --steps must be >= 1; got {args.batch} and {args.steps}")
    check_model(args.model)
    x, y, num_classes, in_chans = _batch(args.data, args.batch)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=in_chans)
    model.train(not args.eval_mode)
    loss_fn = torch.nn.functional.cross_entropy
    lam_min, lam_max = extreme_eigenvalues(model, loss_fn, x, y, steps=args.steps, seed=args.seed)
    result = advise(lam_min, lam_max)
    result.update(model=args.model, data=args.data, batch=len(y), steps=args.steps,
                  params=sum(p.numel() for p in model.parameters()))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on {args.data} (batch {len(y)}, {args.steps} Lanczos steps, "
              f"{result['params']} parameters, at initialisation)")
        print(f"  lambda_min = {lam_min:.6g}   lambda_max = {lam_max:.6g}")
        print(f"  lr <= {result['lr_projective']:.4g}  (1/lambda_max: projective DC valid; "
              f"dcal2 lam >= {result['lam_dcal2_min']:.4g})")
        print(f"  lr <  {result['lr_lyapunov']:.4g}  (2/lambda_max: Lyapunov-stable gradient descent)")
        print(f"  rho >= {result['rho_min']:.4g}  (-lambda_min: convex proximal G; counter-loss G: rho=auto)")
    return 0
