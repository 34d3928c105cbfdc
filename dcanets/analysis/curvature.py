"""Step-size and ρ advice from a measured curvature range (the measurement: ``dcanets.hessian``).

Why: the DC decompositions are valid only in a curvature range (paper 000, §2 and eqs. 9, 12;
paper 003, §2): the projective decomposition G1 = λ·L2 needs λ ≥ λ_max(∇²L), i.e. lr ≤ 1/λ_max;
gradient descent is Lyapunov-stable at a minimum only if lr < 2/λ_max; the proximal
decomposition needs ρ ≥ −λ_min (the counter-loss ones a bound of the same kind on their own G).
Measuring λ_min and λ_max on a batch (``dcanets.hessian.extreme_eigenvalues``) replaces guessing
lr, λ and ρ.

CLI: ``dcanets curvature --model cifar_plainnet20 --data digits --batch 128 --steps 30``.
"""
from __future__ import annotations

import math
from typing import Dict

__all__ = ["advise"]


def advise(lam_min: float, lam_max: float) -> Dict[str, float]:
    """Step sizes and ρ from measured curvature (paper 000, §2; paper 003, §2; docs/papers.md).

    - ``lr_projective`` = 1/λ_max: G1 = λ·L2 is a valid DC decomposition (H1 convex) when
      λ ≥ λ_max, and DCA with G1 is SGD with lr = 1/λ (paper 000, eq. 9);
    - ``lr_lyapunov`` = 2/λ_max: gradient descent is stable at a minimum only if lr < 2/λ_max
      (paper 003, Prop. 1 in its general form);
    - ``rho_min`` = max(0, −λ_min): the proximal G = L + ρ·L2 is convex when ρ ≥ −λ_min. The
      counter-loss decompositions (paper 000, eqs. 12, 23, 26) add ρ/2·L2 to a different function
      (L + ½L'_{−1}, L'_α), so their bound is −2·λ_min of that function's Hessian: their
      ``rho="auto"`` measures it (docs/decompositions.md).
    With λ_max ≤ 0 the quadratic model has no upper curvature and the lr bounds are infinite.
    """
    if not (math.isfinite(lam_min) and math.isfinite(lam_max)) or lam_min > lam_max:
        raise ValueError(f"need finite lam_min <= lam_max; got lam_min={lam_min}, lam_max={lam_max}")
    inf = float("inf")
    return {
        "lam_min": float(lam_min),
        "lam_max": float(lam_max),
        "lr_projective": 1.0 / lam_max if lam_max > 0 else inf,
        "lr_lyapunov": 2.0 / lam_max if lam_max > 0 else inf,
        "rho_min": max(0.0, -float(lam_min)),
        "lam_dcal2_min": max(0.0, float(lam_max)),
    }
