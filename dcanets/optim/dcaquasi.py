"""``dcaquasihalf`` and ``dcaquasineghalf``: the quasi-DC decompositions G = L'_α + ρ/2·L2,
H = G − L of paper 000, eqs. 23–26 (only G convex), stepped along the line of eq. 25."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple

from dcanets.hessian import directional_curvature, fd_step
from dcanets.optim._base import Grads, axpy, check_option, normalise, scaled, total_dot, total_sqnorm
from dcanets.optim.dcacounter import CounterDCA, CounterOptions
from dcanets.optim.rho import AUTO

DIRECTIONS = ("paper", "projection", "newton")
ALIASES = {"line": "projection"}    # the old name of "projection"


@dataclass(frozen=True)
class QuasiOptions(CounterOptions):
    """The counter options, the ``direction`` of the step on the line of g (None: the family's
    ``DEFAULT_DIRECTION``) and ``fd_eps``, the relative step of the measured Newton curvature."""

    DEFAULT_DIRECTION: ClassVar[str] = "paper"

    direction: Optional[str] = None
    fd_eps: float = 1e-3

    def __post_init__(self) -> None:
        direction = self.DEFAULT_DIRECTION if self.direction is None else ALIASES.get(self.direction,
                                                                                      self.direction)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        normalise(self, "direction", direction)
        if self.kappa is not None and direction == "paper":
            raise ValueError("kappa is the curvature scale of direction='newton' and 'projection' only")
        if self.rho == AUTO and direction == "paper" and self.solver == "newton":
            raise ValueError("rho='auto' would measure the curvature for nothing: direction='paper' (t = 1/alpha) "
                             "has no rho; use direction='projection' or 'newton', or leave rho out")
        check_option("fd_eps", self.fd_eps, "> 0", self.fd_eps > 0)
        normalise(self, "fd_eps", float(self.fd_eps))
        super().__post_init__()


@dataclass(frozen=True)
class NegHalfOptions(QuasiOptions):
    """As :class:`QuasiOptions`; the default direction is "projection" (the paper direction a − 3c
    diverged with c="skip" on the test MLP, tests/optim)."""

    DEFAULT_DIRECTION: ClassVar[str] = "projection"


class QuasiDCA(CounterDCA):
    """Quasi-DC G = L'_α + ρ/2·L2, H = G − L (only G convex; paper 000, eqs. 23–26). The paper
    models ∂²G as rank one along g = αa + (1 − α)c (eq. 25) and steps along that line.

    g: with c="shortcut" (default) g = αa + (1 − α)c with eq. 17's c (the vector of eq. 25);
    with c="skip" g = ∇L'_α, the exact gradient of the counter loss, from a second closure run.
    The step is d = t·g (w ← w − lr·d); ``direction`` picks t:

    - ``"paper"``: t = 1/α, so a keeps coefficient 1 (α = ½: d = a + c, the one-block ResNet
      gradient; α = −½: d = a − 3c).
    - ``"projection"`` (old name ``"line"``): t = ⟨a, g⟩/(‖g‖² + ρ/(2κ)), the ridge-regularised
      projection of a onto the line of g (ρ = 0: the orthogonal projection); it is the
      ``"newton"`` t under eq. 25's model times κ‖g‖², so ρ keeps its Hessian units (κ: ``kappa``
      or the Gauss–Newton curvature of L'_α along g over ‖g‖², measured). Never an ascent direction for L
      (⟨a, d⟩ = ⟨a, g⟩²/(‖g‖² + ρ/(2κ)) ≥ 0).
    - ``"newton"``: t = ⟨a, g⟩/(gᵀ∂²L'_α g + ρ/2·‖g‖²), the minimiser of eq. 24's model
      ⟨a, Δw⟩ + ½Δwᵀ∂²G Δw over the line Δw = −t·g. The curvature gᵀ∂²L'_α g is measured by a
      central difference of ∇L'_α along g (two extra closure runs, step ``fd_eps``·max(1, ‖w‖))
      or, with ``kappa=κ``, taken from eq. 25's rank-one model ∂²L'_α = κ·g gᵀ (∂²_hL ≈ κ·∂_hL ∂_hLᵀ,
      eqs. 15, 22; MSE: κ = 1/(2L)): gᵀ∂²L'_α g = κ‖g‖⁴. lr = 1 takes the full line-Newton step.
      If gᵀ∂²G g ≤ 0 (G not convex along g) the step raises a ValueError.

    solver="inner" ignores ``direction``. Defaults: "paper" for α = ½; "projection" for α = −½,
    whose paper direction a − 3c diverged on the test MLP (tests/optim)."""

    ALPHA = 0.5
    Options = QuasiOptions
    options: QuasiOptions

    def gamma(self) -> Dict[float, float]:
        return {self.ALPHA: 1.0}

    def uses_kappa(self) -> bool:
        return super().uses_kappa() and self.options.direction == "projection"

    def closure_reason(self) -> Optional[str]:
        reason = super().closure_reason()
        if reason is None and self.options.direction == "newton" and self.options.kappa is None:
            reason = "direction='newton' without kappa measures the curvature at w +- eps*g"
        return reason

    def line_curvature(self, closure: Optional[Callable], g: Grads, g2: float) -> float:
        """gᵀ∂²L'_α g: eq. 25's κ‖g‖⁴, or a central difference of ∇L'_α along g."""
        kappa = self.options.kappa
        if kappa is not None:
            return kappa * g2 * g2
        assert closure is not None  # closure_reason() demands one for this configuration
        params = self._params()
        eps = fd_step(params, self.options.fd_eps)
        return directional_curvature(lambda: self.loss_gradients(closure, self.ALPHA), params, g, eps) * g2

    def _line(self, closure: Optional[Callable], a: Grads, g: Grads) -> float:
        """t of d = t·g for ``direction`` (see the class docstring)."""
        kind, rho = self.options.direction, self.rho
        if kind == "paper":
            t = 1.0 / self.ALPHA
            self.diagnostics = {"coef": t}
            return t
        g2, ag = total_sqnorm(g), total_dot(a, g)
        if kind == "projection":
            self.diagnostics = {}
            denom = g2 + self._ridge(g, self.ALPHA)
            t = ag / denom if denom > 0 else 0.0
            self.diagnostics["coef"] = t
            return t
        q = self.line_curvature(closure, g, g2) if g2 > 0 else 0.0
        denom = q + rho / 2 * g2                      # gᵀ∂²G g, G = L'_α + ρ/2·L2 (eq. 24)
        if g2 > 0 and denom <= 0:
            raise ValueError(
                f"{type(self).__name__}: G = L'_a + rho/2*L2 is not convex along g "
                f"(g^T d2L' g = {q:.3g}, |g|^2 = {g2:.3g}): the line-Newton step needs "
                f"rho > {-2 * q / g2:.3g}")
        t = ag / denom if g2 > 0 else 0.0
        self.diagnostics = {"coef": t, "curvature": q}
        return t

    def skip_direction(self, closure: Callable, a: Grads) -> Grads:
        g = self.loss_gradients(closure, self.ALPHA)               # g = ∇L'_α
        t = self._line(closure, a, g)
        return [None if gi is None else t * gi for gi in g]

    def constant_coefficients(self) -> Optional[Tuple[float, float]]:
        if self.options.direction == "paper":      # g/α = a + (1 − α)/α · c
            return 1.0, (1.0 - self.ALPHA) / self.ALPHA
        return None

    def constant_diagnostics(self) -> Dict[str, float]:
        return {"coef": 1.0 / self.ALPHA}

    def coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        al = self.ALPHA                                  # g = αa + (1 − α)c (eq. 25)
        g = axpy(scaled(a, al), 1.0 - al, c)
        t = self._line(closure, a, g)
        return t * al, t * (1.0 - al)


class DcaQuasiHalf(QuasiDCA):
    """G3 = L'_{1/2} + ρ/2·L2 (paper 000, eq. 23): by default steps along a + c (eq. 25), the
    gradient of the plain net with a gradient-only identity shortcut around the last block."""

    ALPHA = 0.5


class DcaQuasiNegHalf(QuasiDCA):
    """G4 = L'_{−1/2} + ρ/2·L2 (paper 000, eq. 26): the decomposition behind NegNet (eq. 27).
    g = −½a + 3/2·c; default direction "projection" (the paper direction a − 3c diverges)."""

    ALPHA = -0.5
    Options = NegHalfOptions
