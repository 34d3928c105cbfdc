"""Deep linear networks (paper 002, §2.1): the closed-form global optimum and GD measured against it.

For ``min 1/2 ||Y - W_H ... W_1 X||_F^2`` (eq. 1, i.e. eq. 2 with ``gamma = 0``) the best product
is the rank-``d_min`` truncated SVD of the targets projected onto the row space of ``X``:
``Y~ = Y X^+ X``, ``U S V^T = svd_{d_min}(Y~)``, ``W* = U S V^T X^+`` (Eckart–Young inside the row
space, since ``W X`` can only span it and has rank at most ``d_min = min(d_0, …, d_H, n)``).
Paper 002 also gives layer factors reaching it (:func:`optimal_layers`).

:func:`train` runs full-batch GD on square nets whose layers are ``alpha I + W_i``:
``alpha = 0`` no shortcut, ``1`` identity shortcut (ResNet), ``-1`` NegNet's ``-I`` shortcut
(paper 000, eq. 27, linear case). It is batched over seeds: weights have shape (S, H, d, d).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

SHORTCUTS = {"none": 0.0, "identity": 1.0, "negative": -1.0}


@dataclass
class Optimum:
    """The global optimum: product ``w`` (d_H, d_0), ``loss`` = 1/2 ||Y - wX||^2 / n, and the SVD."""

    w: torch.Tensor
    loss: float
    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor
    x_pinv: torch.Tensor


def optimum(x: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = ()) -> Optimum:
    """Closed-form global optimum of a deep linear net with hidden ``widths`` on data (X, Y).

    ``x`` is (d_0, n), ``y`` is (d_H, n); ``widths`` are the hidden layer widths (may be empty).
    """
    d0, n = x.shape
    dh = y.shape[0]
    rank = min([d0, dh, n, *widths])
    x_pinv = torch.linalg.pinv(x)
    y_proj = y @ x_pinv @ x  # Y~ = Y X^+ X, projection onto rowspace(X)
    u, s, vt = torch.linalg.svd(y_proj, full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]  # svd_{d_min}
    w = u @ torch.diag(s) @ vt @ x_pinv
    loss = 0.5 * ((y - w @ x) ** 2).sum().item() / n
    return Optimum(w, loss, u, s, vt, x_pinv)


def optimal_layers(opt: Optimum, widths: Sequence[int], d0: int) -> List[torch.Tensor]:
    """Layer factors of paper 002, §2.1: ``W1 = [S^{1/H} V^T; 0] X^+``, middle ``[S^{1/H} 0; 0 0]``,
    ``W_H = [U S^{1/H}, 0]``; their product is ``opt.w``."""
    depth = len(widths) + 1
    r = opt.s.shape[0]
    root = opt.s ** (1.0 / depth)
    dims = [d0, *widths, opt.u.shape[0]]
    layers = []
    for i in range(depth):
        w = torch.zeros(dims[i + 1], dims[i], dtype=opt.w.dtype)
        if i == 0 and depth == 1:
            w = opt.w.clone()
        elif i == 0:
            w[:r] = torch.diag(root) @ opt.vt @ opt.x_pinv  # (r, n) @ (n, d0)
        elif i == depth - 1:
            w[:, :r] = opt.u @ torch.diag(root)
        else:
            w[:r, :r] = torch.diag(root)
        layers.append(w)
    return layers


def planted_problem(d: int, n: int, generator: torch.Generator, noise: float = 0.1) -> tuple:
    """``X`` (d, n) Gaussian; ``Y = A X + noise`` with ``A`` diagonalizable, eigenvalues U[-1.5, 1.5]
    (the targets of paper 003, Fig. 3: negative eigenvalues are what a single identity-initialised
    product struggles with)."""
    eig = torch.rand(d, generator=generator, dtype=torch.float64) * 3 - 1.5
    basis = torch.randn(d, d, generator=generator, dtype=torch.float64)
    a = basis @ torch.diag(eig) @ torch.linalg.inv(basis)
    a = a / torch.linalg.matrix_norm(a, 2) * 1.5
    x = torch.randn(d, n, generator=generator, dtype=torch.float64)
    y = a @ x + noise * torch.randn(d, n, generator=generator, dtype=torch.float64)
    return x, y


def product(weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(alpha I + W_H) ... (alpha I + W_1)`` for weights (S, H, d, d)."""
    eye = torch.eye(weights.shape[-1], dtype=weights.dtype)
    out = alpha * eye + weights[:, 0]
    for i in range(1, weights.shape[1]):
        out = (alpha * eye + weights[:, i]) @ out
    return out


@dataclass
class TrainResult:
    """Excess loss ``L - L*`` (mean and per-seed final) every ``record_every`` steps."""

    excess: List[float]
    final_excess: torch.Tensor
    optimum_loss: float


def train(x: torch.Tensor, y: torch.Tensor, depth: int, shortcut: str, steps: int, lr: float,
          seeds: int, seed: int = 0, init_std: float = -1.0, record_every: int = 10) -> TrainResult:
    """Full-batch GD on a depth-``depth`` square linear net, ``seeds`` inits at once.

    ``init_std`` (entries of ``W_i`` are ``N(0, init_std^2 / d)``) defaults to 1 without a shortcut
    (a zero init would be a saddle) and 0.1 with one (the near-identity init shortcuts allow).
    """
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; known: {', '.join(SHORTCUTS)}")
    alpha = SHORTCUTS[shortcut]
    d, n = x.shape
    std = init_std if init_std >= 0 else (1.0 if alpha == 0 else 0.1)
    g = torch.Generator().manual_seed(seed)
    weights = (torch.randn(seeds, depth, d, d, generator=g, dtype=x.dtype) * std / d ** 0.5)
    weights.requires_grad_(True)
    best = optimum(x, y).loss
    excess = []
    for t in range(steps + 1):
        loss = 0.5 * ((y - product(weights, alpha) @ x) ** 2).sum((-1, -2)) / n  # eq. 1, per seed
        if t % record_every == 0 or t == steps:
            excess.append((loss.detach() - best).mean().item())
        if t == steps:
            break
        (grad,) = torch.autograd.grad(loss.sum(), weights)
        with torch.no_grad():
            weights -= lr * grad.nan_to_num(0.0).clamp(-1e3, 1e3)
    return TrainResult(excess, (loss.detach() - best), best)


__all__ = ["SHORTCUTS", "Optimum", "optimum", "optimal_layers", "planted_problem", "product",
           "train", "TrainResult"]
