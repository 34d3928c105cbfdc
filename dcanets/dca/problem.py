"""A DC program min F(x) = G(x) − H(x), stated by what DCA needs and nothing more.

DCA (paper 000, Algorithm 1) touches G and H in three ways only: values (to monitor F and for
the boosted line search), a subgradient y ∈ ∂H(x) (the linearisation, paper 000, eq. 1) and a
minimiser of the convex model G(x) − ⟨x, y⟩ (paper 000, eq. 2). A problem supplies exactly those,
plus optional pieces: ``grad_G`` (enables the generic inner solver when no closed form exists),
``bounds`` (box constraints for that inner solver) and ``sample`` (random starting points for
restarts). Constraints belong to G as an indicator: ``G`` returns ``inf`` outside its domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from scipy import optimize

Array = np.ndarray
Subproblem = Callable[[Array, Array], Array]   # (y, x_k) -> argmin_x G(x) − <x, y>


class SubproblemError(RuntimeError):
    """The convex subproblem solver failed (non-finite output or no decrease of its model)."""


@dataclass
class DCProblem:
    """F = G − H with G, H convex. All callables take and return float64 numpy arrays.

    ``solve_subproblem(y, x_k)`` returns argmin_x G(x) − ⟨x, y⟩; ``x_k`` is the current iterate,
    useful as a warm start or to break ties. When it is ``None``, ``grad_G`` must be given and
    the subproblem is solved iteratively by L-BFGS-B from ``x_k`` (inexact DCA).
    """

    G: Callable[[Array], float]
    H: Callable[[Array], float]
    grad_H: Callable[[Array], Array]
    solve_subproblem: Optional[Subproblem] = None
    grad_G: Optional[Callable[[Array], Array]] = None
    bounds: Optional[Sequence[Tuple[Optional[float], Optional[float]]]] = None
    sample: Optional[Callable[[np.random.Generator], Array]] = None
    name: str = "dc-problem"
    inner_options: dict = field(default_factory=lambda: {"maxiter": 500, "gtol": 1e-12, "ftol": 1e-15})

    def __post_init__(self) -> None:
        if self.solve_subproblem is None and self.grad_G is None:
            raise ValueError(f"DCProblem {self.name!r}: give solve_subproblem (closed form) or grad_G "
                             "(for the iterative inner solver); got neither")

    def F(self, x: Array) -> float:
        """The objective G(x) − H(x); ``inf`` outside dom G."""
        g = float(self.G(x))
        return g if not np.isfinite(g) else g - float(self.H(x))

    def model(self, x: Array, y: Array) -> float:
        """The convex model G(x) − ⟨x, y⟩ minimised at each DCA step (paper 000, eq. 2)."""
        return float(self.G(x)) - float(np.dot(x, y))

    def subproblem(self, y: Array, x_k: Array) -> Array:
        """argmin_x G(x) − ⟨x, y⟩: the closed form if given, otherwise L-BFGS-B from x_k."""
        x = self.solve_subproblem(y, x_k) if self.solve_subproblem is not None else self._inner(y, x_k)
        x = np.asarray(x, dtype=np.float64)
        if x.shape != x_k.shape or not np.all(np.isfinite(x)):
            raise SubproblemError(f"subproblem of {self.name!r} returned a non-finite point or shape {x.shape}")
        return x

    def _inner(self, y: Array, x_k: Array) -> Array:
        """Inexact DCA: a descent method warm-started at x_k never increases the model."""
        grad_G = self.grad_G
        assert grad_G is not None  # __post_init__: without solve_subproblem, grad_G is given
        res = optimize.minimize(lambda x: self.model(x, y), x_k, jac=lambda x: grad_G(x) - y,
                                method="L-BFGS-B", bounds=self.bounds, options=self.inner_options)
        if not np.all(np.isfinite(res.x)):
            raise SubproblemError(f"inner solver of {self.name!r} failed: {res.message}")
        return res.x
