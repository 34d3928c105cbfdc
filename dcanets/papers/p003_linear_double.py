"""Deep linear networks of paper 003: the single product W_L...W_1 and the double W_L...W_1 - Z_L...Z_1.

Both start at the identity (section 2: the residual parametrization). A single identity-started
product cannot reach a negative eigenvalue by gradient descent (Prop. 3: the matching diagonal
entries go to 0); the double network (section 3.2) fits the positive part with the W's and the
negative part with the Z's, so it converges where the single one stalls (Fig. 3).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


def chain(mats: torch.Tensor) -> torch.Tensor:
    """M_L ... M_1 for a stack (L, n, n) ordered M_1 first."""
    out = mats[0]
    for m in mats[1:]:
        out = m @ out
    return out


class LinearProduct(nn.Module):
    """F = W_L ... W_1 with W_i = I at start (paper 003, eq. 4).

    ``batch`` adds leading axes: that many independent networks trained in one tensor op.
    """

    def __init__(self, n: int, layers: int, batch: tuple = ()) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(n).expand(layers, *batch, n, n).clone())

    def matrix(self) -> torch.Tensor:
        return chain(self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix().T


class LinearDouble(nn.Module):
    """F = W_L ... W_1 - Z_L ... Z_1, every factor the identity at start (paper 003, section 3.2)."""

    def __init__(self, n: int, layers: int, batch: tuple = ()) -> None:
        super().__init__()
        self.pos, self.neg = LinearProduct(n, layers, batch), LinearProduct(n, layers, batch)

    def matrix(self) -> torch.Tensor:
        return self.pos.matrix() - self.neg.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix().T


def random_diagonalizable(n: int, lo: float = -1.5, hi: float = 1.5,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """R = M diag(lambda) M^-1, M ~ N(0, I) entries, lambda ~ U[lo, hi] (Fig. 3's matrices)."""
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    lam = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return m @ torch.diag(lam) @ torch.linalg.inv(m)


def fit_gd(model: LinearProduct | LinearDouble, target: torch.Tensor, step: float, iters: int,
           blowup: float = 1e8) -> Dict[str, torch.Tensor]:
    """Full-batch gradient descent on 1/2 ||F - R||_F^2 (eq. 4 with Sigma = I).

    ``target`` may hold a batch of matrices (..., n, n) matching the model's batch axes; each is
    an independent problem (the summed loss separates). Returns ``errors`` (iters, *batch): the
    relative error ||F - R||_F^2 / ||R||_F^2, NaN from the iteration where GD diverged (error
    non-finite or above ``blowup``), and ``diverged`` (*batch) booleans.
    """
    model = model.double()
    scale = (target ** 2).sum((-2, -1))
    errors = []
    diverged = torch.zeros(scale.shape, dtype=torch.bool)
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        sq = ((model.matrix() - target) ** 2).sum((-2, -1))
        err = (sq / scale).detach()
        diverged |= ~(err < blowup)
        errors.append(torch.where(diverged, torch.nan, err))
        if bool(diverged.all()):
            break
        (0.5 * torch.where(diverged, 0.0, sq).sum()).backward()
        with torch.no_grad():
            for p in model.parameters():
                assert p.grad is not None  # every parameter enters matrix(), so backward() set it
                p.sub_(step * torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0))
    return {"errors": torch.stack(errors), "diverged": diverged}
