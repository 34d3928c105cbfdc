"""Non-convexity of multi-branch nets as the number of branches grows (paper 002, §3.2).

Paper 002 bounds the normalized duality gap of ``f = (1/I) sum_i f_i`` by ``2 / I``. The duality
gap is the distance between a function and its convex envelope, which cannot be computed for a
network; two measurable proxies at the trained point (our choice; docs/papers.md):

* the negative-curvature share of the Hessian spectrum: the spectral-density mass on negative
  eigenvalues and ``|lambda_min| / lambda_max``, from stochastic Lanczos quadrature
  (``dcanets.hessian.lanczos``);
* the loss along random lines through the trained point, and its gap to its own 1-D convex
  envelope (the 1-D analogue of the duality gap), normalized by the loss range on the line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dcanets.hessian import lanczos, loss_hessian_operator


def digits_data(n: int = 512, seed: int = 0) -> tuple:
    """``n`` standardized 8x8 digits from sklearn (shipped with it, nothing downloaded)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(data.images, dtype=torch.float32)[idx] / 16.0
    x = ((x - x.mean()) / x.std()).unsqueeze(1)
    return x, torch.tensor(data.target)[idx]


def train_to_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: float,
                  max_steps: int, lr: float = 1e-2) -> Tuple[float, int]:
    """Full-batch Adam on cross-entropy until the training loss is at most ``target`` or
    ``max_steps`` steps are spent; returns (final training loss, steps taken).

    Why a target: nets with more branches train more slowly at the same step count (the 1/I
    output scale), so comparing them after equal steps compares points of unequal loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(max_steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if loss.item() <= target:
            return loss.item(), step
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item(), max_steps


def train_full_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                     lr: float = 1e-2) -> float:
    """Full-batch Adam on cross-entropy for exactly ``steps`` steps; returns the final training loss."""
    return train_to_loss(model, x, y, -math.inf, steps, lr)[0]


def convex_envelope_gap(values: torch.Tensor, ts: torch.Tensor) -> float:
    """``max_t (f(t) - env(t)) / (max f - min f)`` with ``env`` the lower convex envelope of the
    sampled curve (lower hull of the points ``(t, f(t))``); 0 for a convex curve."""
    pts = list(zip(ts.tolist(), values.tolist()))
    hull: List[tuple] = []
    for p in pts:  # monotone-chain lower hull
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    hx = torch.tensor([h[0] for h in hull], dtype=values.dtype)
    hy = torch.tensor([h[1] for h in hull], dtype=values.dtype)
    j = torch.searchsorted(hx, ts.to(values.dtype).contiguous()).clamp(1, len(hull) - 1)
    w = (ts - hx[j - 1]) / (hx[j] - hx[j - 1])
    env = hy[j - 1] + w * (hy[j] - hy[j - 1])
    span = (values.max() - values.min()).item()
    return float((values - env).max().item() / span) if span > 0 else 0.0


def random_line_gaps(model: torch.nn.Module, loss_fn: Callable, lines: int, radius: float = 1.0,
                     points: int = 41, seed: int = 0) -> Dict[str, float]:
    """Loss along ``lines`` random directions ``theta + t d``, ``t in [-radius, radius]``; each
    direction is Gaussian, rescaled per parameter tensor to that tensor's norm (the filter
    normalization of Li et al., so lines are comparable across architectures). ``model()`` takes
    no input (bind the data first) and ``loss_fn(model())`` is the loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(-radius, radius, points)
    gaps, curvs = [], []
    with torch.no_grad():
        for _ in range(lines):
            d = {}
            for k, v in params.items():
                r = torch.randn(v.shape, generator=g)
                d[k] = r * v.norm() / r.norm().clamp_min(1e-12)
            vals = torch.stack([loss_fn(functional_call(model, {k: params[k] + t * d[k] for k in params}))
                                for t in ts])
            gaps.append(convex_envelope_gap(vals, ts))
            second = vals[2:] - 2 * vals[1:-1] + vals[:-2]
            curvs.append((second < 0).float().mean().item())
    return {"envelope_gap_mean": sum(gaps) / lines, "envelope_gap_max": max(gaps),
            "negative_second_difference_share": sum(curvs) / lines}


def hessian_negative_share(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                           steps: int = 40, seed: int = 0) -> Dict[str, float]:
    """Negative-eigenvalue mass of the spectral density and ``|lambda_min| / lambda_max``."""
    matvec, dim = loss_hessian_operator(model, F.cross_entropy, x, y)
    values, weights = lanczos(matvec, dim, steps=steps, seed=seed)
    lam_min, lam_max = float(values[0]), float(values[-1])
    # eigenvalues within 1e-3 lambda_max of 0 are the flat directions of an interpolating fit, not
    # negative curvature: count only the clearly negative ones
    clearly_negative = values < -1e-3 * abs(lam_max)
    return {"negative_mass": float(weights[clearly_negative].sum()), "lambda_min": lam_min,
            "lambda_max": lam_max, "neg_ratio": abs(min(lam_min, 0.0)) / lam_max if lam_max > 0 else 0.0}


@dataclass
class BranchReport:
    """Measurements of one trained model: ``steps`` taken and whether the target loss was
    ``reached`` (always True without a target)."""

    num_branches: int
    train_loss: float
    hessian: Dict[str, float]
    lines: Dict[str, float]
    steps: int = 0
    reached: bool = True
    total_width: int = 0


def measure(branches: Sequence[int], total_width: int = 64, depth: int = 1, n: int = 512,
            steps: int = 300, lines: int = 8, lanczos_steps: int = 40, seed: int = 0,
            radius: float = 3.0, target_loss: Optional[float] = None,
            branch_width: Optional[int] = None) -> List[BranchReport]:
    """Train ``multibranch_mlp_{depth}h`` for each ``I`` and measure it at the trained point.

    ``target_loss``: train each net until its training loss is at most this (``steps`` is then the
    cap), so every ``I`` is measured at the same loss, not after the same steps. ``branch_width``:
    every branch gets this width and the total grows as ``I * branch_width`` (paper 002's setting:
    identical sub-networks, more of them); without it ``total_width`` is split over the branches.
    With one hidden layer a fixed total width makes every ``I`` the same function class (the
    hidden layer is dense either way; only the 1/I head scale and the init differ).
    """
    x, y = digits_data(n, seed)
    reports = []
    for i in branches:
        torch.manual_seed(seed)
        width = i * branch_width if branch_width else total_width
        model = timm.create_model(f"multibranch_mlp_{depth}h", num_branches=i, total_width=width)
        target = -math.inf if target_loss is None else target_loss
        loss, taken = train_to_loss(model, x, y, target, steps)
        hessian = hessian_negative_share(model, x, y, lanczos_steps, seed)
        line = random_line_gaps(_Bound(model, x), lambda out: F.cross_entropy(out, y), lines, radius=radius, seed=seed)
        reports.append(BranchReport(i, loss, hessian, line, taken, loss <= target or target_loss is None, width))
    return reports


class _Bound(torch.nn.Module):
    """The model with its input fixed, so functional_call(params) -> logits."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x = model, x

    def forward(self) -> torch.Tensor:
        return self.model(self.x)


__all__ = ["digits_data", "train_full_batch", "train_to_loss", "convex_envelope_gap", "random_line_gaps",
           "hessian_negative_share", "measure", "BranchReport"]
