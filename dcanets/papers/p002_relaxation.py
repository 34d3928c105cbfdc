"""Convex relaxation of a single ReLU neuron (paper 002, §2.2, eqs. 5–8; Ergen & Pilanci).

Original loss (eq. 7): ``L(W) = ||relu(W^T X) - Y||^2``, non-convex. Relaxed loss (eq. 8):
``L_r(W) = ||relu(W^T X)||^2 - 2 W^T X Y^T + ||Y||^2``, convex (``relu(t)^2`` is convex and the
rest is linear). Since ``relu(t) >= t`` and ``Y >= 0``, ``L_r - L = 2 (relu(W^T X) - W^T X) Y^T >= 0``:
the relaxation is an upper bound of ``L`` that touches it wherever the neuron is active on every
sample with a positive label; on planted data ``Y = relu(W0^T X)`` both are 0 at ``W0``, so the
relaxed minimizer solves the original (paper 002's theorem).

The gradients differ only in the activation mask on the target term:
``dL/dW = 2 X D (relu(W^T X) - Y)`` (eq. 6, D the active set) against
``dL_r/dW = 2 X (relu(W^T X) - Y)``: the relaxed step keeps pulling a dead neuron towards the
samples it should fit. Everything is batched over runs: ``W`` has shape (S, d), one row per seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

LOSSES = ("vanilla", "relaxed")


def planted_data(n: int, d: int, generator: torch.Generator, noise: float = 0.0) -> tuple:
    """``X`` (d, n) Gaussian, a unit planted neuron ``W0`` (d,), ``Y = max(relu(W0^T X) + noise, 0)``."""
    x = torch.randn(d, n, generator=generator, dtype=torch.float64)
    w0 = torch.randn(d, generator=generator, dtype=torch.float64)
    w0 = w0 / w0.norm()
    y = torch.relu(w0 @ x)
    if noise:
        y = torch.relu(y + noise * torch.randn(n, generator=generator, dtype=torch.float64))
    return x, y, w0


def original_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paper 002, eq. 7 (times 1): ``||relu(W^T X) - Y||^2``, per row of ``w`` (S, d)."""
    return ((torch.relu(w @ x) - y) ** 2).sum(-1)


def relaxed_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paper 002, eq. 8: ``||relu(W^T X)||^2 - 2 W^T X Y^T + ||Y||^2``, per row of ``w``."""
    return (torch.relu(w @ x) ** 2).sum(-1) - 2 * (w @ x) @ y + (y * y).sum()


def gradient(kind: str, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Analytic gradient of the ``vanilla`` (eq. 6) or ``relaxed`` (eq. 8) loss, shape (S, d)."""
    pre = w @ x
    out = torch.relu(pre)
    if kind == "vanilla":
        resid = (out - y) * (pre > 0)  # D(k) of eq. 6
    elif kind == "relaxed":
        resid = out - y
    else:
        raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
    return 2 * resid @ x.T


@dataclass
class RelaxationRun:
    """Final weights and per-step curves (mean over runs) of one GD variant."""

    w: torch.Tensor
    original: List[float]
    recovery: List[float]


INITS = ("random", "opposite")


def run_gd(kind: str, x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, runs: int, steps: int,
           generator: torch.Generator, lr: float = 0.0, record_every: int = 1,
           init: str = "random") -> RelaxationRun:
    """GD from ``runs`` inits; ``lr`` defaults to ``1 / lambda_max(2 X X^T)``.

    ``init="random"``: ``N(0, I/d)``. ``init="opposite"``: ``-W0 + N(0, 0.01 I/d)``, a neuron
    active exactly where the target is 0: vanilla GD can only shrink it onto the dead region,
    where its gradient vanishes; the relaxed gradient still has the ``-2 X Y^T`` pull.

    Curves: the original loss per sample and the recovery error ``||W - W0|| / ||W0||``, both
    averaged over runs.
    """
    d, n = x.shape
    lr = lr or 1.0 / (2 * torch.linalg.eigvalsh(x @ x.T)[-1].item())
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    w = torch.randn(runs, d, generator=generator, dtype=torch.float64) / d ** 0.5
    if init == "opposite":
        w = -w0 + 0.1 * w
    original, recovery = [], []
    for t in range(steps + 1):
        if t % record_every == 0 or t == steps:
            original.append((original_loss(w, x, y) / n).mean().item())
            recovery.append(((w - w0).norm(dim=-1) / w0.norm()).mean().item())
        if t < steps:
            w = w - lr * gradient(kind, w, x, y)
    return RelaxationRun(w, original, recovery)


def compare(n: int = 200, d: int = 20, runs: int = 20, steps: int = 500, noise: float = 0.0,
            seed: int = 0, record_every: int = 1, init: str = "random") -> Dict[str, RelaxationRun]:
    """Vanilla against relaxed GD from the same inits on one planted data set."""
    x, y, w0 = planted_data(n, d, torch.Generator().manual_seed(seed), noise)
    return {kind: run_gd(kind, x, y, w0, runs, steps, torch.Generator().manual_seed(seed + 1),
                         record_every=record_every, init=init) for kind in LOSSES}


__all__ = ["LOSSES", "INITS", "planted_data", "original_loss", "relaxed_loss", "gradient", "run_gd",
           "compare", "RelaxationRun"]
