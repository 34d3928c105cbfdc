"""``dcaprox``: the proximal decomposition G = L + ρ·L2, H = ρ·L2 (paper 000, §2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from dcanets.optim._base import restore_grads
from dcanets.optim.closure import ClosureDCA, ClosureOptions
from dcanets.optim.rho import Rho


@dataclass(frozen=True)
class ProxOptions(ClosureOptions):
    """As :class:`ClosureOptions`, with ρ = 1 by default (ρ = 0 would be plain SGD steps)."""

    rho: Rho = 1.0


class DcaProx(ClosureDCA):
    """Proximal decomposition G = L + ρ·L2, H = ρ·L2 (paper 000, §2: the proximal point method):
    w_{k+1} = argmin L(w) + ρ/2‖w − w_k‖², solved inexactly by ``inner_steps`` gradient steps
    of size lr (one step is SGD). ρ ≥ −λ_min(∇²L) makes G convex (what ``rho="auto"`` sets)."""

    Options = ProxOptions
    options: ProxOptions

    def closure_reason(self) -> Optional[str]:
        return "its inner solver evaluates the loss at inner_steps points"

    def closure_free_hint(self) -> str:
        return "another decomposition: dcaprox always steps with one (dcal2, dcacounter and the quasi ones need none)"

    def gamma(self) -> Dict[float, float]:
        return {1.0: 1.0}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        closure = self._require_closure(closure)
        self._check_batch()
        self._update_rho()
        loss, a = self._first(closure)
        d = self._inner_solve(closure, a)
        restore_grads(self._params(), a)
        self._apply(d)
        return loss
