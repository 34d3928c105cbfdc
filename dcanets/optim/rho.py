"""ρ in paper 000's units, and ``rho="auto"`` (eqs. 12, 14–19, 23–26 and footnote 2).

Paper 000 adds ρ/2·L2 (Hessian ρ/2·I, L2 = ½‖w‖²) to the G of its counter-loss decompositions
(eqs. 12, 23, 26), and ρ·L2 to the proximal one (§2): ρ is a Hessian eigenvalue, in the units of
λ = 1/lr (eq. 9; footnote 2 compares the two). Two consequences, both implemented here:

* the closed-form coefficients built from gradient vectors (eq. 19's β, the quasi-DC projection)
  need the scale κ that turns a squared gradient into a curvature: in the rank-one model
  ∂²_zL = κ·∂_zL ∂_zLᵀ (eqs. 15, 22) the curvature of L along a = ∇L is κ‖a‖², and ρ enters the
  coefficients as ρ/(2κ) (docs/decompositions.md derives it). κ is given (``kappa=``) or measured
  as the Gauss–Newton curvature along the model's direction u over ‖u‖²
  (:func:`gauss_newton_curvature`): the part of ∂²L that the paper's Newton model keeps
  (footnote 3 drops the rest), ≥ 0 for a convex loss, and exactly κ when the model holds;
* ``rho="auto"`` sets ρ to the smallest value that makes every part of the decomposition that
  must be convex (G, and H for eq. 12) convex at w_k on the current batch:
  ρ = safety · max_parts max(0, −λ_min(∇²part)) / m, with m the Hessian of the ρ-term per unit ρ
  (½ for ρ/2·L2, 1 for ρ·L2) and λ_min from Lanczos (:func:`min_eigenvalue`).

Both are exact second derivatives (double backward, ReLU'' = 0 as in the paper's eq. 7) on a
batch the training loop hands over (:class:`Batch`, ``remember_batch``): a closure cannot give
them, because it runs its own ``backward()`` and returns a detached loss, and finite differences
of a ReLU network's gradient cross activation kinks (on ``cifar_plainnet20`` they gave −0.2 to
+659 for a curvature of −98, depending on the step). Measurements are re-taken every
``rho_every`` steps and logged in :class:`CurvatureLog`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from dcanets.hessian import Grads, flatten, graph_hessian_operator, lanczos

AUTO = "auto"
Rho = Union[float, str]   # a Hessian eigenvalue >= 0, or AUTO
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_rho(rho: Any) -> Rho:
    """``rho`` as a float >= 0 or ``"auto"``, else a one-line ValueError."""
    if rho == AUTO:
        return AUTO
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be >= 0 (a Hessian eigenvalue, in the units of lam = 1/lr) or 'auto'; "
                         f"got {rho!r}")
    return float(rho)


def check_measurement(every: Any, safety: Any, lanczos_steps: Any) -> None:
    """One-line ValueErrors for the options of the curvature measurements."""
    for name, value, ok, allowed in (
            ("rho_every", every, _is_int(every) and every >= 1, "an integer >= 1 (steps between measurements)"),
            ("rho_safety", safety, _is_real(safety) and safety > 0, "> 0 (rho = rho_safety x the measured bound)"),
            ("rho_lanczos", lanczos_steps, _is_int(lanczos_steps) and lanczos_steps >= 1, "an integer >= 1")):
        if not ok:
            raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Batch:
    """The batch of the coming step: the loss is ``loss_fn(model(inputs), targets)``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: LossFn


def min_eigenvalue(loss: torch.Tensor, params: Sequence[torch.Tensor], steps: int, seed: int,
                   reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """λ_min of ∇²loss (``loss`` computed with its graph): ``steps`` Lanczos iterations on exact
    Hessian–vector products. Ritz values lie inside the spectrum, so with few steps this
    over-estimates λ_min (under-estimates a negative one's size). ``reduce`` maps each product to
    the global batch's (data parallel: the mean over the ranks, dcanets.optim.distributed)."""
    params = list(params)
    matvec, dim = graph_hessian_operator(loss, params)
    if reduce is not None:
        local, matvec = matvec, lambda v: reduce(local(v))
    values, _ = lanczos(matvec, dim, steps=steps, seed=seed, dtype=params[0].dtype)
    return float(values[0])


def gauss_newton_curvature(outputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                           params: Sequence[torch.Tensor], direction: Grads) -> float:
    """ûᵀJᵀ∂²_zL J û (û = u/‖u‖, z = ``outputs`` computed with their graph, J = ∂z/∂w): the
    curvature of the loss along u with the network linearised, the part of ∇²L that paper 000's
    Newton model keeps (eqs. 14–16, footnote 3). Jû by the double-backward trick (a vector–
    Jacobian product with a dummy cotangent, differentiated again), ∂²_zL·Jû by double backward
    of ``loss_fn`` at z. 0 when u = 0."""
    live = [(p, d) for p, d in zip(params, direction) if p.requires_grad]   # frozen weights do not move
    params = [p for p, _ in live]
    u = flatten(params, [d for _, d in live])
    norm = float(u.double().norm())
    if norm == 0:
        return 0.0
    unit = torch.split(u / norm, [p.numel() for p in params])
    dummy = torch.zeros_like(outputs, requires_grad=True)
    vjp = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
    pairs = [(g, d.view_as(g)) for g, d in zip(vjp, unit) if g is not None]
    (jv,) = torch.autograd.grad([g for g, _ in pairs], dummy, [d for _, d in pairs])
    z = outputs.detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)
    (hjv,) = torch.autograd.grad(gz, z, jv)
    return float((hjv.double() * jv.double()).sum())


class CurvatureLog:
    """What an optimizer measured for ρ, and when: ``history`` is a list of
    ``{"step": k, name: value, ...}`` (``rho``, ``lam_min_G``, ``lam_min_H``, ``kappa``), and a
    quantity is due again ``every`` steps after its last measurement."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.history: List[Dict[str, float]] = []
        self._last: Dict[str, int] = {}
        self._latest: Dict[str, float] = {}

    def due(self, name: str, step: int) -> bool:
        last = self._last.get(name)
        return last is None or step - last >= self.every

    def record(self, step: int, **values: float) -> None:
        self.history.append({"step": step, **values})
        for name, value in values.items():
            self._last[name], self._latest[name] = step, value

    def latest(self, name: str) -> Optional[float]:
        return self._latest.get(name)

    def latest_values(self) -> Dict[str, float]:
        """The last value of every measured quantity (the engine's epoch metrics)."""
        return dict(self._latest)
