"""Lyapunov step-size bounds for gradient descent on deep products (paper 003, §2).

The model: fit λ (or a matrix R) by a product w_L⋯w_1 (W_L⋯W_1) under the loss
(1/2N)Σ(w_L⋯w_1 x_i − λx_i)², input variance σ (Σ = I for matrices). Gradient descent with step
δ is the dynamical system of paper 003, eq. (2) / eq. (5):

- Prop. 1: an equilibrium w* (Πw* = λ) is asymptotically stable only if
  δ ≤ 2/(σ Σ_i Π_{j≠i} w_j*²); the largest bound, at |w_i*| = |λ|^{1/L}, is δ_max = 2/(σLλ^{2(L−1)/L}).
- Prop. 2: from w_i[0] = 1 (λ > 0), δ ≤ δ_c gives monotone exponential convergence at rate ρ(δ).
- Thm. 1: δ > 2/(L λ(R)^{2(L−1)/L}) (λ(R) the spectral radius) makes every equilibrium unstable.
- Thm. 2: W_i[0] = I and δ ≤ (1/L)·min{1, λ(R)^{−2(L−1)/L}} converge exponentially (R with real
  positive eigenvalues). For λ(R) < 1 this is conservative: Prop. 2's δ_c is larger there.

Every bad input raises ValueError naming the parameter and its allowed range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

ArrayLike = Union[float, np.ndarray, list]


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    return value


def _depth(L: int) -> int:
    if isinstance(L, bool) or int(L) != L or L < 1:
        raise ValueError(f"L (depth) must be an integer >= 1; got {L!r}")
    return int(L)


def _nonzero(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value == 0:
        raise ValueError(f"{name} must be finite and nonzero; got {value}")
    return value


def scalar_product_step_bound(w: ArrayLike, sigma: float = 1.0) -> float:
    """Prop. 1, eq. (1): 2/(σ Σ_i Π_{j≠i} w_j²) at the equilibrium w (inf if the sum is 0)."""
    sigma = _positive("sigma", sigma)
    w = np.atleast_1d(np.asarray(w, dtype=np.float64))
    if w.ndim != 1 or w.size < 1 or not np.all(np.isfinite(w)):
        raise ValueError(f"w must be a non-empty finite 1-D array of the L factors; got shape {w.shape}")
    w2 = w * w
    s = sum(float(np.prod(np.delete(w2, i))) for i in range(w.size))
    return float("inf") if s == 0 else 2.0 / (sigma * s)


def scalar_product_max_step(lam: float, L: int, sigma: float = 1.0) -> float:
    """Prop. 1: δ_max = 2/(σ L |λ|^{2(L−1)/L}); above it no equilibrium is stable (λ ≠ 0)."""
    lam, L, sigma = abs(_nonzero("lam", lam)), _depth(L), _positive("sigma", sigma)
    return 2.0 / (sigma * L * lam ** (2.0 * (L - 1) / L))


def scalar_product_safe_step(lam: float, L: int, sigma: float = 1.0) -> float:
    """Prop. 2: δ_c, the largest step with monotone exponential convergence from w_i[0] = 1 (λ > 0)."""
    lam, L, sigma = _positive("lam", lam), _depth(L), _positive("sigma", sigma)
    if lam >= 1.0:
        return 1.0 / (L * sigma * lam ** (2.0 * (L - 1) / L))
    return (1.0 - lam ** (1.0 / L)) / (sigma * (1.0 - lam))


def scalar_product_rate(lam: float, L: int, step: float, sigma: float = 1.0) -> float:
    """Prop. 2: ρ(δ) with |w_i[k] − λ^{1/L}| ≤ ρ(δ)^k |1 − λ^{1/L}| for δ ≤ δ_c."""
    lam, L, sigma, step = _positive("lam", lam), _depth(L), _positive("sigma", sigma), _positive("step", step)
    if lam == 1.0:
        return 0.0                                   # w[0] = 1 is already the equilibrium
    if lam > 1.0:
        return 1.0 - step * sigma * (lam - 1.0) / (lam ** (1.0 / L) - 1.0)
    return 1.0 - step * sigma * L * lam ** (2.0 * (L - 1) / L)


def _spectral_radius(lam_R: ArrayLike, positive: bool) -> float:
    """λ(R) from a number (taken as the spectral radius), a vector of eigenvalues or R itself."""
    arr: np.ndarray = np.asarray(lam_R, dtype=np.float64)
    if arr.ndim == 0:
        return _positive("lam_R", float(arr))
    if arr.ndim == 2:
        if arr.shape[0] != arr.shape[1]:
            raise ValueError(f"lam_R as a matrix R must be square; got shape {arr.shape}")
        ev = np.linalg.eigvals(arr)
        if np.abs(ev.imag).max() > 1e-9 * max(1.0, np.abs(ev).max()):
            raise ValueError("lam_R: R must have real eigenvalues (paper 003, Thm. 1/2)")
        arr = ev.real
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError("lam_R must be a positive number, a 1-D array of eigenvalues, or a square matrix")
    if positive and np.any(arr <= 0):
        raise ValueError(f"lam_R: Thm. 2 needs every eigenvalue of R > 0; got min {arr.min():.6g}")
    return _positive("lam_R (spectral radius)", np.abs(arr).max())


def matrix_product_unstable_step(lam_R: ArrayLike, L: int) -> float:
    """Thm. 1: steps above 2/(L λ(R)^{2(L−1)/L}) leave no stable equilibrium (Σ = I)."""
    rad, L = _spectral_radius(lam_R, positive=False), _depth(L)
    return 2.0 / (L * rad ** (2.0 * (L - 1) / L))


def matrix_product_safe_step(lam_R: ArrayLike, L: int) -> float:
    """Thm. 2: from W_i[0] = I, steps ≤ (1/L)·min{1, λ(R)^{−2(L−1)/L}} converge exponentially."""
    rad, L = _spectral_radius(lam_R, positive=True), _depth(L)
    return min(1.0, rad ** (-2.0 * (L - 1) / L)) / L


@dataclass
class ProductRun:
    """A gradient-descent run on a deep product: losses per step, factor trajectory, verdict."""

    losses: np.ndarray            # loss at k = 0..iters (shorter if it diverged)
    trajectory: np.ndarray        # factors at every step: (k, L) scalars or (k, L, n, n) matrices
    converged: bool               # final product error ≤ tol·max(1, |target|)
    diverged: bool                # non-finite or exploding factors

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1])


def _check_sim(step: float, iters: int, tol: float) -> None:
    _positive("step", step)
    _positive("tol", tol)
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be an integer >= 1; got {iters!r}")


def simulate_scalar_product(lam: float, L: int, step: float, sigma: float = 1.0,
                            w0: Optional[ArrayLike] = None, iters: int = 3000, seed: int = 0,
                            perturb: float = 1e-3, tol: float = 1e-8, blowup: float = 1e6) -> ProductRun:
    """Gradient descent of paper 003, eq. (2): w_i ← w_i − δσ(Πw − λ)Π_{j≠i}w_j.

    ``w0=None`` starts at the balanced equilibrium |w_i| = |λ|^{1/L} (one factor negative if
    λ < 0) times (1 + perturb·N(0, 1)), seeded: the setting of Lyapunov's indirect method.
    Pass ``w0=np.ones(L)`` for the initialisation of Prop. 2.
    """
    lam, L, sigma = _nonzero("lam", lam), _depth(L), _positive("sigma", sigma)
    _check_sim(step, iters, tol)
    if w0 is None:
        w = np.full(L, abs(lam) ** (1.0 / L))
        w[0] *= np.sign(lam)
        w *= 1.0 + perturb * np.random.default_rng(seed).standard_normal(L)
    else:
        w = np.asarray(w0, dtype=np.float64).copy()
        if w.shape != (L,):
            raise ValueError(f"w0 must have shape ({L},); got {w.shape}")
    traj, losses = [w.copy()], [0.5 * sigma * (np.prod(w) - lam) ** 2]
    diverged = False
    for _ in range(int(iters)):
        e = np.prod(w) - lam
        others = np.array([np.prod(np.delete(w, i)) for i in range(L)])
        w = w - step * sigma * e * others                       # paper 003, eq. (2)
        if not np.all(np.isfinite(w)) or np.abs(w).max() > blowup:
            diverged = True
            break
        traj.append(w.copy())
        losses.append(0.5 * sigma * (np.prod(w) - lam) ** 2)
    err = abs(np.prod(traj[-1]) - lam)
    return ProductRun(np.array(losses), np.array(traj), not diverged and err <= tol * max(1.0, abs(lam)), diverged)


def simulate_matrix_product(R: np.ndarray, L: int, step: float, W0: Optional[np.ndarray] = None,
                            iters: int = 3000, seed: int = 0, perturb: float = 0.0, tol: float = 1e-8,
                            blowup: float = 1e6) -> ProductRun:
    """Gradient descent of paper 003, eq. (5) with Σ = I: W_i ← W_i − δ G_i(F̂ − R)H_i.

    ``W0=None`` starts every factor at the identity (Thm. 2); ``perturb`` adds seeded
    N(0, perturb²) noise to every entry of every factor.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square matrix; got shape {R.shape}")
    L, n = _depth(L), R.shape[0]
    _check_sim(step, iters, tol)
    Ws = np.stack([np.eye(n)] * L) if W0 is None else np.array(W0, dtype=np.float64)
    if Ws.shape != (L, n, n):
        raise ValueError(f"W0 must have shape ({L}, {n}, {n}); got {Ws.shape}")
    Ws = Ws + perturb * np.random.default_rng(seed).standard_normal(Ws.shape)

    def product(ws: np.ndarray) -> np.ndarray:
        out = np.eye(n)
        for W in ws:                                  # F̂ = W_L ⋯ W_1
            out = W @ out
        return out

    traj, losses, diverged = [Ws.copy()], [0.5 * np.sum((product(Ws) - R) ** 2)], False
    for _ in range(int(iters)):
        E = product(Ws) - R
        grads = [product(Ws[i + 1:]).T @ E @ product(Ws[:i]).T for i in range(L)]   # G_i E H_i, eq. (5)
        Ws = Ws - step * np.stack(grads)
        if not np.all(np.isfinite(Ws)) or np.abs(Ws).max() > blowup:
            diverged = True
            break
        traj.append(Ws.copy())
        losses.append(0.5 * np.sum((product(Ws) - R) ** 2))
    err = np.abs(product(traj[-1]) - R).max()
    return ProductRun(np.array(losses), np.array(traj), not diverged and err <= tol * max(1.0, np.abs(R).max()),
                      diverged)


__all__ = ["ProductRun", "scalar_product_step_bound", "scalar_product_max_step", "scalar_product_safe_step",
           "scalar_product_rate", "matrix_product_unstable_step", "matrix_product_safe_step",
           "simulate_scalar_product", "simulate_matrix_product"]
