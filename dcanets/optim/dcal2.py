"""``dcal2``: G1 = λ·L2, H1 = λ·L2 − L (paper 000, eq. 9), the decomposition that is SGD."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dcanets.optim._base import DCAOptimizer, normalise
from dcanets.optim.rho import AUTO, Rho, check_rho


@dataclass(frozen=True)
class L2Options:
    """``rho`` is accepted (and checked) so every decomposition takes the same arguments; G1 has
    no ρ term, so it has no effect, and ``rho="auto"`` (a measurement for nothing) is refused."""

    rho: Rho = 0.0

    def __post_init__(self) -> None:
        if check_rho(self.rho) == AUTO:
            raise ValueError("dcal2 has no rho term (G1 = lam*L2, paper 000 eq. 9): rho='auto' would measure the "
                             "curvature for nothing; leave rho out")
        normalise(self, "rho", float(self.rho))


class DcaL2(DCAOptimizer):
    """G1 = λ·L2, H1 = λ·L2 − L (paper 000, eq. 9): stochastic DCA is SGD with lr = 1/λ.

    y_k = ∇H1(w_k) = λw_k − ∇L(w_k); w_{k+1} = argmin λ/2‖w‖² − ⟨w, y_k⟩ = w_k − ∇L(w_k)/λ.
    Uses the gradients already in ``p.grad``; a closure, if given, is evaluated first.
    """

    Options = L2Options
    options: L2Options

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply([None if p.grad is None else p.grad for p in self._params()])
        return loss
