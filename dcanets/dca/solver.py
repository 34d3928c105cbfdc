"""The DCA loop (paper 000, Algorithm 1) with restarts and the boosted line search.

``minimize(problem, x0)`` iterates y_k ∈ ∂H(x_k), z_k = argmin G(x) − ⟨x, y_k⟩ (paper 000, eq. 2).
With ``boosted=True`` it then tries x_{k+1} = z_k + t·(z_k − x_k) with an Armijo test
F(z_k + t d) ≤ F(z_k) − α t²‖d‖² (boosted DCA of Aragón Artacho et al., the line search of Niu's
DCAM toolbox); a rejected step falls back to z_k, so F(x_k) stays non-increasing either way.
Points outside dom G have F = inf and are never accepted by the line search.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from .problem import Array, DCProblem, SubproblemError

# stop reasons
XTOL, FTOL, MAX_ITER, SUBPROBLEM, CALLBACK = "xtol", "ftol", "max_iter", "subproblem_failed", "callback"
_MESSAGES = {
    XTOL: "converged: ||x_{k+1} - x_k|| <= xtol (1 + ||x_k||)",
    FTOL: "converged: |F(x_{k+1}) - F(x_k)| <= ftol (1 + |F(x_k)|)",
    MAX_ITER: "iteration cap reached",
    SUBPROBLEM: "convex subproblem failed (error, non-finite point, or F increased); last good point kept",
    CALLBACK: "stopped by the callback",
}


@dataclass
class DCAResult:
    """Outcome of ``minimize``, scipy-style: ``x``, ``fun``, ``nit``, ``success``, ``message``.

    ``status`` is the stop reason (``xtol``, ``ftol``, ``max_iter``, ``subproblem_failed``,
    ``callback``); ``history`` holds F(x_k) for k = 0..nit of the best run and ``steps`` the
    norms ‖x_{k+1} − x_k‖; ``criticality`` is ‖T(x) − x‖/(1 + ‖x‖) with T the DCA map, zero
    exactly at DC-critical points (∇H(x) ∈ ∂G(x)); ``runs`` summarises every restart.
    """

    x: Array
    fun: float
    nit: int
    status: str
    history: List[float]
    steps: List[float]
    criticality: float
    boost_steps: List[float] = field(default_factory=list)
    runs: List[dict] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def success(self) -> bool:
        return self.status in (XTOL, FTOL, CALLBACK)

    @property
    def message(self) -> str:
        return _MESSAGES[self.status]

    @property
    def nit_total(self) -> int:
        return sum(r["nit"] for r in self.runs)

    def __repr__(self) -> str:
        return (f"DCAResult(fun={self.fun:.10g}, nit={self.nit}, status={self.status!r}, "
                f"criticality={self.criticality:.2e}, runs={len(self.runs)})")


def _check_options(xtol: float, ftol: float, max_iter: int, n_restarts: int, boost_beta: float,
                   boost_alpha: float, boost_t0: float, boost_tries: int) -> None:
    checks = [("xtol", xtol, xtol >= 0, ">= 0"), ("ftol", ftol, ftol >= 0, ">= 0"),
              ("max_iter", max_iter, int(max_iter) == max_iter and max_iter >= 1, "an integer >= 1"),
              ("n_restarts", n_restarts, int(n_restarts) == n_restarts and n_restarts >= 0, "an integer >= 0"),
              ("boost_beta", boost_beta, 0 < boost_beta < 1, "in (0, 1)"),
              ("boost_alpha", boost_alpha, boost_alpha > 0, "> 0"),
              ("boost_t0", boost_t0, boost_t0 > 0, "> 0"),
              ("boost_tries", boost_tries, boost_tries >= 1, "an integer >= 1")]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _boost(problem: DCProblem, x: Array, z: Array, fz: float, t0: float, beta: float, alpha: float,
           tries: int) -> tuple[Array, float, float]:
    """Armijo backtracking along d = z − x from z; returns (point, F, accepted step or 0)."""
    d = z - x
    dd = float(d @ d)
    if dd == 0.0 or not np.isfinite(fz):
        return z, fz, 0.0
    t = t0
    for _ in range(tries):
        cand = z + t * d
        fc = problem.F(cand)
        if np.isfinite(fc) and fc <= fz - alpha * t * t * dd:
            return cand, fc, t
        t *= beta
    return z, fz, 0.0


def _criticality(problem: DCProblem, x: Array) -> float:
    """Fixed-point residual of the DCA map: x is DC-critical iff x ∈ argmin G − ⟨·, ∇H(x)⟩."""
    try:
        t = problem.subproblem(np.asarray(problem.grad_H(x), dtype=np.float64), x)
    except (SubproblemError, ValueError, np.linalg.LinAlgError):
        return float("nan")
    return float(np.linalg.norm(t - x) / (1.0 + np.linalg.norm(x)))


def _run(problem: DCProblem, x0: Array, xtol: float, ftol: float, max_iter: int, boosted: bool,
         boost: dict, callback: Optional[Callable[[Array, float], bool]]) -> DCAResult:
    x, fx = x0.copy(), problem.F(x0)
    history, steps, boosts = [fx], [], []
    status = MAX_ITER
    for _ in range(max_iter):
        y = np.asarray(problem.grad_H(x), dtype=np.float64)        # y_k ∈ ∂H(x_k)   (paper 000, eq. 2)
        try:
            z = problem.subproblem(y, x)                          # argmin G − <., y_k>
        except (SubproblemError, ValueError, np.linalg.LinAlgError):
            status = SUBPROBLEM
            break
        fz = problem.F(z)
        if boosted:
            z, fz, t = _boost(problem, x, z, fz, **boost)
            boosts.append(t)
        # DCA never increases F (paper 000, Thm. 2.1); an increase beyond round-off means the
        # subproblem was not solved: keep x_k and report it.
        if np.isfinite(fx) and not fz <= fx + 1e-12 * (1.0 + abs(fx)):
            status = SUBPROBLEM
            break
        dx = float(np.linalg.norm(z - x))
        scale_x = 1.0 + float(np.linalg.norm(x))
        df, scale_f = (abs(fz - fx), 1.0 + abs(fx)) if np.isfinite(fx) else (np.inf, 1.0)
        x, fx = z, fz
        history.append(fx)
        steps.append(dx)
        if callback is not None and callback(x, fx):
            status = CALLBACK
            break
        if dx <= xtol * scale_x:
            status = XTOL
            break
        if df <= ftol * scale_f:
            status = FTOL
            break
    return DCAResult(x=x, fun=problem.F(x), nit=len(steps), status=status, history=history,
                     steps=steps, criticality=float("nan"), boost_steps=boosts)


def minimize(problem: DCProblem, x0: Array, *, xtol: float = 1e-10, ftol: float = 1e-15,
             max_iter: int = 10_000, n_restarts: int = 0,
             sampler: Optional[Callable[[np.random.Generator], Array]] = None, seed: int = 0,
             boosted: bool = False, boost_t0: float = 1.0, boost_beta: float = 0.5,
             boost_alpha: float = 1e-4, boost_tries: int = 12,
             callback: Optional[Callable[[Array, float], bool]] = None) -> DCAResult:
    """Run DCA on ``problem`` from ``x0`` and, with ``n_restarts`` > 0, from that many more points
    drawn by ``sampler`` (default ``problem.sample``); the run with the lowest F is returned.

    Stops when ‖Δx‖ ≤ xtol(1 + ‖x‖), |ΔF| ≤ ftol(1 + |F|), after ``max_iter`` iterations, when
    the subproblem fails, or when ``callback(x, F)`` returns True.
    """
    _check_options(xtol, ftol, max_iter, n_restarts, boost_beta, boost_alpha, boost_t0, boost_tries)
    x0 = np.asarray(x0, dtype=np.float64)
    if x0.ndim != 1 or not np.all(np.isfinite(x0)):
        raise ValueError(f"x0 must be a finite 1-D array; got shape {x0.shape}")
    sampler = sampler or problem.sample
    if n_restarts and sampler is None:
        raise ValueError(f"n_restarts={n_restarts} needs a sampler: pass sampler= or set problem.sample")
    rng = np.random.default_rng(seed)
    boost = {"t0": boost_t0, "beta": boost_beta, "alpha": boost_alpha, "tries": boost_tries}
    t0 = time.perf_counter()
    best: Optional[DCAResult] = None
    runs = []
    for k in range(n_restarts + 1):
        if k == 0:
            start = x0
        else:
            assert sampler is not None  # checked above: restarts need a sampler
            start = np.asarray(sampler(rng), dtype=np.float64)
        res = _run(problem, start, xtol, ftol, max_iter, boosted, boost, callback)
        runs.append({"fun": res.fun, "nit": res.nit, "status": res.status})
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None  # the loop ran at least once
    best.runs = runs
    best.criticality = _criticality(problem, best.x)
    best.time_s = time.perf_counter() - t0
    return best
