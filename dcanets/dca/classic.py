"""Small DC programs with known answers, the checks other DC libraries (e.g. Niu's DCAM) ship.

- ``abs_quadratic``: F(x) = (a/2)(x − b)² − |x| on ℝ, G = (a/2)(x − b)², H = |x|. DC-critical
  points solve x = b + y/a with y ∈ ∂|x|; for a = b = 0.5 they are {−1.5, 0, 2.5} and DCA from
  x0 = −0.5 stops at −1.5 (the global minimum is 2.5, F = −1.5).
- ``max_distance_box``: maximise ‖x − y‖ over x, y ∈ [0, 1]^d, i.e. min −‖x − y‖ with
  G = indicator of the box and H = ‖x − y‖ (convex–concave). Optimum √d at opposite corners.
"""
from __future__ import annotations

import numpy as np

from .problem import Array, DCProblem


def abs_quadratic(a: float = 0.5, b: float = 0.5) -> DCProblem:
    """(a/2)(x − b)² − |x| with the closed-form step x⁺ = b + sign(x_k)/a (x as a length-1 array)."""
    if not a > 0:
        raise ValueError(f"a must be > 0 so G = (a/2)(x - b)^2 is strictly convex; got {a}")
    return DCProblem(
        G=lambda x: 0.5 * a * float((x[0] - b) ** 2),
        H=lambda x: abs(float(x[0])),
        # a subgradient of |x|; at 0 we take 0 ∈ [−1, 1]
        grad_H=lambda x: np.sign(x),
        solve_subproblem=lambda y, xk: b + y / a,           # argmin (a/2)(x − b)² − xy
        sample=lambda rng: rng.uniform(-5.0, 5.0, size=1),
        name=f"abs-quadratic(a={a}, b={b})")


def abs_quadratic_critical_points(a: float = 0.5, b: float = 0.5) -> Array:
    """DC-critical points of ``abs_quadratic``: x = b ± 1/a when consistent with the sign, and 0 if |ab| ≤ 1."""
    pts = [x for x, sign in ((b + 1 / a, 1), (b - 1 / a, -1)) if np.sign(x) == sign]
    if abs(a * b) <= 1:                                       # y = −ab ∈ ∂|0| = [−1, 1]
        pts.append(0.0)
    return np.array(sorted(pts))


def max_distance_box(dim: int = 2) -> DCProblem:
    """max ‖x − y‖ over the unit box [0, 1]^dim for both points; variable z = (x, y) ∈ ℝ^{2·dim}."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1; got {dim}")

    def in_box(z: Array) -> float:
        return 0.0 if np.all((z >= 0.0) & (z <= 1.0)) else np.inf

    def grad_h(z: Array) -> Array:
        d = z[:dim] - z[dim:]
        n = np.linalg.norm(d)
        u = d / n if n > 0 else np.eye(dim)[0]               # any unit vector is a subgradient at 0
        return np.concatenate([u, -u])

    def step(g: Array, zk: Array) -> Array:
        # argmin over the box of −<z, g>: a vertex; keep the current coordinate where g_i = 0
        return np.where(g > 0, 1.0, np.where(g < 0, 0.0, zk))

    return DCProblem(G=in_box, H=lambda z: float(np.linalg.norm(z[:dim] - z[dim:])), grad_H=grad_h,
                     solve_subproblem=step, sample=lambda rng: rng.uniform(0.0, 1.0, 2 * dim),
                     name=f"max-distance-box(dim={dim})")
