"""The trust-region subproblem (TRS) min ½xᵀAx + bᵀx s.t. ‖x‖ ≤ r: DC decompositions and exact solution.

Paper 000, §2 uses it as the worked example of DCA with A symmetric indefinite:

- proximal decomposition G = ½xᵀ(A+ρI)x + bᵀx + χ_B, H = ½ρ‖x‖² (ρ > −λ_min(A)):
  x⁺ = (A+ρI)^{-1/2} P_E((A+ρI)^{-1/2}(ρx − b)), E = {z : zᵀ(A+ρI)^{-1}z ≤ r²};
- projective decomposition G = ½ρ‖x‖² + bᵀx + χ_B, H = ½xᵀ(ρI − A)x (ρ ≥ λ_max(A)):
  x⁺ = P_B(x − (Ax + b)/ρ), projected gradient with step 1/ρ.

The global solution is exact by the eigen-decomposition of A and the secular equation
‖(A + μI)^{-1}b‖ = r (Moré & Sorensen 1983), including the hard case where b ⟂ the eigenspace
of λ_min(A). It satisfies (A + μI)x* = −b, μ ≥ 0, μ(r − ‖x*‖) = 0, A + μI ⪰ 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import optimize

from .problem import Array, DCProblem

DECOMPOSITIONS = ("proximal", "projective")


@dataclass
class TRSSolution:
    """Global TRS solution: point, multiplier μ, objective, and whether it was the hard case."""

    x: Array
    mu: float
    fun: float
    hard_case: bool


def _check_trs(A: Array, b: Array, r: float) -> Tuple[Array, Array, float]:
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix; got shape {A.shape}")
    if b.shape != (A.shape[0],):
        raise ValueError(f"b must have shape ({A.shape[0]},) to match A; got {b.shape}")
    if not np.allclose(A, A.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(A).max())):
        raise ValueError("A must be symmetric")
    if not (np.isfinite(r) and r > 0):
        raise ValueError(f"r (trust-region radius) must be finite and > 0; got {r}")
    return 0.5 * (A + A.T), b, float(r)


def trs_objective(A: Array, b: Array, x: Array) -> float:
    """q(x) = ½xᵀAx + bᵀx (no constraint)."""
    return float(0.5 * x @ A @ x + b @ x)


def secular_root(c: Array, m: Array, r: float, lo: float) -> float:
    """ν ≥ lo with Σ c_i²/(m_i + ν)² = r², assuming the left side is ≥ r² at ν = lo.

    Solved on φ(ν) = 1/‖x(ν)‖ − 1/r, which is nearly linear (Moré & Sorensen), by Brent's method.
    """
    nz = c != 0.0

    def phi(nu: float) -> float:
        den = m[nz] + nu
        if np.any(den <= 0.0):
            return -1.0 / r                       # at the pole ‖x‖ = ∞
        return float(1.0 / np.linalg.norm(c[nz] / den) - 1.0 / r)

    hi = float(lo + np.linalg.norm(c) / r)        # there every |c_i|/(m_i+ν) ≤ ‖c‖/(ν − lo): ‖x‖ ≤ r
    if phi(lo) >= 0.0:
        return lo
    if phi(hi) <= 0.0:
        return hi
    return optimize.brentq(phi, lo, hi, xtol=1e-15 * max(1.0, abs(hi)), rtol=4 * np.finfo(float).eps,
                           maxiter=500)


def exact_trs(A: Array, b: Array, r: float, deg_tol: float = 1e-10) -> TRSSolution:
    """Global minimiser of ½xᵀAx + bᵀx over ‖x‖ ≤ r, by eigen-decomposition.

    ``deg_tol`` (relative to ‖A‖, ‖b‖) decides which eigenvalues equal λ_min and when the
    components of b on that eigenspace count as zero (the hard case).
    """
    A, b, r = _check_trs(A, b, r)
    lam, Q = np.linalg.eigh(A)
    beta = Q.T @ b
    scale_a = max(float(np.abs(lam).max()), 1e-300)
    lam1 = lam[0]
    if lam1 > deg_tol * scale_a:                                    # A ≻ 0: maybe interior
        xh = -beta / lam
        if np.linalg.norm(xh) <= r:
            return _solution(A, b, Q, xh, 0.0, False)
    lo = max(0.0, -lam1)
    if lam1 <= deg_tol * scale_a:
        deg = lam - lam1 <= deg_tol * scale_a
        if np.linalg.norm(beta[deg]) <= deg_tol * max(float(np.linalg.norm(b)), 1e-300) or not b.any():
            xh = np.zeros_like(beta)
            xh[~deg] = -beta[~deg] / (lam[~deg] + lo)
            gap = r * r - xh @ xh
            if gap >= 0.0:                                          # hard case: μ = −λ_min
                e = np.zeros_like(beta)
                e[np.argmax(deg)] = 1.0
                xh = xh + np.sqrt(gap) * e
                return _solution(A, b, Q, xh, lo, True)
    mu = secular_root(beta, lam, r, lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        xh = np.where(beta != 0.0, -beta / (lam + mu), 0.0)
    return _solution(A, b, Q, xh, mu, False)


def _solution(A: Array, b: Array, Q: Array, xh: Array, mu: float, hard: bool) -> TRSSolution:
    x = Q @ xh
    return TRSSolution(x=x, mu=float(mu), fun=trs_objective(A, b, x), hard_case=hard)


def trs_multiplier(A: Array, b: Array, r: float, x: Array, boundary_tol: float = 1e-6) -> float:
    """μ for a point x: 0 inside the ball, else the least-squares fit of (A + μI)x = −b."""
    nx = np.linalg.norm(x)
    if nx < r * (1.0 - boundary_tol):
        return 0.0
    return max(0.0, float(-(x @ (A @ x + b)) / (nx * nx)))


def trs_optimality(A: Array, b: Array, r: float, x: Array, mu: Optional[float] = None) -> Dict[str, float]:
    """Residuals of the global optimality conditions, all scaled to be dimensionless.

    stationarity ‖(A+μI)x + b‖/(‖A‖r + ‖b‖); complementarity μ|r − ‖x‖|/(‖A‖r + ‖b‖);
    psd = −λ_min(A + μI)/‖A‖ (≤ 0 when A + μI ⪰ 0); infeasibility (‖x‖ − r)/r; mu itself.
    """
    A, b, r = _check_trs(A, b, r)
    mu = trs_multiplier(A, b, r, x) if mu is None else float(mu)
    lam = np.linalg.eigvalsh(A)
    na = max(np.abs(lam).max(), 1e-300)
    scale = na * r + np.linalg.norm(b)
    return {"mu": mu,
            "stationarity": float(np.linalg.norm(A @ x + mu * x + b) / scale),
            "complementarity": float(mu * abs(r - np.linalg.norm(x)) / scale),
            "psd": float(-(lam[0] + mu) / na),
            "infeasibility": float((np.linalg.norm(x) - r) / r)}


def project_ball(x: Array, r: float) -> Array:
    """P_B: Euclidean projection onto {‖x‖ ≤ r}."""
    n = np.linalg.norm(x)
    return x if n <= r else x * (r / n)


def project_ellipsoid(w: Array, m: Array, Q: Array, r: float) -> Array:
    """P_E(w) for E = {z : zᵀM^{-1}z ≤ r²}, M = Q diag(m) Qᵀ ≻ 0 (paper 000, §2).

    KKT: z = (I + νM^{-1})^{-1}w, i.e. ẑ_i = ŵ_i m_i/(m_i + ν) in M's eigenbasis, with ν ≥ 0 the
    root of Σ ŵ_i² m_i/(m_i + ν)² = r² when w lies outside E.
    """
    wh = Q.T @ w
    if wh @ (wh / m) <= r * r:
        return w
    nu = secular_root(wh * np.sqrt(m), m, r, 0.0)
    return Q @ (wh * m / (m + nu))


def trs_problem(A: Array, b: Array, r: float, decomposition: str = "projective",
                rho: Optional[float] = None, rho_margin: float = 0.1) -> DCProblem:
    """The TRS as a ``DCProblem`` with one of the two decompositions of paper 000, §2.

    ``rho`` defaults to λ_max(A) (projective; needs ρ ≥ λ_max so H is convex) or to
    −λ_min(A) + rho_margin·‖A‖ (proximal; needs A + ρI ≻ 0 so E and (A+ρI)^{-1/2} exist).
    ``sample`` draws starting points uniformly in the ball.
    """
    A, b, r = _check_trs(A, b, r)
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; known: {', '.join(DECOMPOSITIONS)}")
    lam, Q = np.linalg.eigh(A)
    na = max(np.abs(lam).max(), 1e-12)
    if decomposition == "projective":
        rho = float(max(lam[-1], 1e-12 * na)) if rho is None else float(rho)
        if not rho > 0 or rho < lam[-1] * (1 - 1e-12):
            raise ValueError(f"rho must be >= lambda_max(A) = {lam[-1]:.6g} and > 0 for the projective "
                             f"decomposition; got {rho}")
    else:
        rho = float(max(-lam[0], 0.0) + rho_margin * na) if rho is None else float(rho)
        if not rho + lam[0] > 0 or rho < 0:
            raise ValueError(f"rho must be >= 0 and > -lambda_min(A) = {-lam[0]:.6g} for the proximal "
                             f"decomposition; got {rho}")
    n = len(b)

    def indicator(x: Array) -> float:
        return 0.0 if np.linalg.norm(x) <= r * (1 + 1e-12) else np.inf

    def sample(rng: np.random.Generator) -> Array:
        d = rng.standard_normal(n)
        return d / np.linalg.norm(d) * r * rng.uniform() ** (1.0 / n)

    if decomposition == "projective":
        # paper 000, §2: G = ½ρ‖x‖² + bᵀx + χ_B, H = ½xᵀ(ρI − A)x, x⁺ = P_B(x − (Ax + b)/ρ)
        return DCProblem(
            G=lambda x: indicator(x) + 0.5 * rho * (x @ x) + b @ x,
            H=lambda x: 0.5 * (rho * (x @ x) - x @ A @ x),
            grad_H=lambda x: rho * x - A @ x,
            solve_subproblem=lambda y, xk: project_ball((y - b) / rho, r),
            sample=sample, name=f"trs-projective(rho={rho:.4g})")
    m = lam + rho
    inv_sqrt = (Q / np.sqrt(m)) @ Q.T                                   # (A + ρI)^{-1/2}

    def prox_step(y: Array, xk: Array) -> Array:
        # paper 000, §2: x⁺ = (A+ρI)^{-1/2} P_E((A+ρI)^{-1/2}(y − b)), y = ρx_k
        return inv_sqrt @ project_ellipsoid(inv_sqrt @ (y - b), m, Q, r)

    return DCProblem(
        G=lambda x: indicator(x) + 0.5 * (x @ A @ x + rho * (x @ x)) + b @ x,
        H=lambda x: 0.5 * rho * (x @ x),
        grad_H=lambda x: rho * x,
        solve_subproblem=prox_step, sample=sample, name=f"trs-proximal(rho={rho:.4g})")


def random_trs(n: int, seed: int = 0, hard: bool = False, r: float = 1.0) -> Tuple[Array, Array, float]:
    """A random indefinite instance: A = Q diag(λ) Qᵀ with λ ~ U[−1, 1] (λ_min forced < 0), b ~ N(0, I).

    ``hard=True`` builds a hard case: b ⟂ the λ_min eigenvector and ‖(A − λ_min I)^† b‖ = r/2.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.sort(rng.uniform(-1.0, 1.0, n))
    lam[0] = min(lam[0], -0.1)
    beta = rng.standard_normal(n)
    if hard:
        beta[0] = 0.0
        if n > 1:
            beta[1:] *= 0.5 * r / np.linalg.norm(beta[1:] / (lam[1:] - lam[0]))
    return (Q * lam) @ Q.T, Q @ beta, float(r)
