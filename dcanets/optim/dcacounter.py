"""``dcacounter`` (paper 000, eqs. 12, 17, 19), and :class:`CounterDCA`, the machinery every
decomposition on the counter loss L'_α of the last same-shape block shares (``dcanets.optim.dcaquasi``
too): the vectors a = ∇L and eq. 17's c, from the hooks of the loop's own backward or from a
closure, the coefficients (s_a, s_c) of the direction d = s_a·a + s_c·c, and κ, which puts ρ in
Hessian units (``dcanets.optim.rho``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from dcanets.optim._base import Grads, axpy, check_option, normalise, restore_grads, scaled, total_sqnorm
from dcanets.optim.closure import ClosureDCA, ClosureOptions
from dcanets.optim.counter import CounterLoss, ShortcutTap
from dcanets.optim.rho import gauss_newton_curvature

SOLVERS = ("newton", "inner")
C_MODES = ("shortcut", "skip")          # "shortcut": eq. 17's c (the default); see CounterDCA
BETA_POLICIES = ("raise", "clamp")
WHERE_ALL_REFUSED = (
    "where='all' is refused: skipping every same-shape block at once is a different network, not "
    "paper 000's one-block counter loss (on cifar_plainnet56 |c|/|a| = 0.0013, beta = 3e5, a first "
    "step 92x SGD's); use where='last'")


@dataclass(frozen=True)
class CounterOptions(ClosureOptions):
    """The closure options, and how the counter loss is used: ``solver`` ("newton": closed-form
    steps from a and c; "inner": :func:`dcanets.optim.closure.inner_solve`), ``where`` (the last
    same-shape block), ``c`` (see :class:`CounterDCA`), ``beta_every`` (coefficients reused for that
    many steps) and ``kappa`` (the rank-one curvature factor; None: measured when ρ > 0)."""

    solver: str = "newton"
    where: str = "last"
    c: str = "shortcut"
    beta_every: int = 1
    kappa: Optional[float] = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}")
        kappa = self.kappa
        if kappa is not None:
            check_option("kappa", kappa, "> 0 (the rank-one curvature factor of paper 000, eqs. 15, 22) or None",
                         isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and kappa > 0)
            if self.solver != "newton":
                raise ValueError("kappa is the curvature scale of the closed-form (solver='newton') steps only")
            normalise(self, "kappa", float(kappa))
        if self.where == "all":
            raise ValueError(WHERE_ALL_REFUSED)
        if self.where != "last":
            raise ValueError(f"where must be 'last' (the one block of paper 000, eq. 10); got {self.where!r}")
        if self.c not in C_MODES:
            raise ValueError(f"c must be one of {', '.join(C_MODES)}; got {self.c!r}")
        check_option("beta_every", self.beta_every, "an integer >= 1",
                     isinstance(self.beta_every, int) and self.beta_every >= 1)
        if self.beta_every > 1 and (self.c != "shortcut" or self.solver != "newton"):
            raise ValueError("beta_every > 1 reuses the coefficients of c='shortcut' with solver='newton' only")
        super().__post_init__()


class CounterDCA(ClosureDCA):
    """Decompositions built on the counter loss L'_α of the last same-shape block (paper 000,
    eqs. 10, 12, 23, 26). A family gives :meth:`coefficients` (and, for ``c="skip"``,
    :meth:`skip_direction`).

    ``c`` (solver="newton" only; the inner solver evaluates L'_α itself and never forms c):

    - ``"shortcut"`` (default): c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L, paper 000, eq. 17 (C = (0, ∂_w F^{L−2}))
      with a = ∇L: the identity shortcut's part of the one-block ResNet gradient. It is zero on
      the block's own parameters and on everything above the block (the head), so a + c is the
      gradient of the plain net with a gradient-only identity shortcut around that one block.
      Needs no closure: ``step()`` takes c from the hooks of ``ShortcutTap``, which run one extra
      vector–Jacobian product of the trunk inside the loop's ``loss.backward()`` (none when the
      coefficients are constant or reused for ``beta_every`` steps). ``step(closure)`` computes
      the same step independently: one forward with the graph cut at h^{L−1}, then two products.
    - ``"skip"``: the vectors come from re-running the closure with the block's output mixed
      (``CounterLoss.evaluate``): for ``dcacounter`` c = ∇L'_0, the gradient of the network with
      the block removed, i.e. ∂L/∂h at h^{L−1} (not at h^L) times ∂h^{L−1}/∂w, plus the head's
      gradient at the features h^{L−1}; that is not eq. 17's c. About 2× an SGD step.

    ρ (Hessian units, the ρ/2·L2 of eqs. 12, 23, 26) enters the closed-form coefficients built
    from the gradient vectors a, c, g as ρ/(2κ) (``_ridge``), κ the rank-one curvature factor of
    eqs. 15, 22 (∂²_hL = κ·∂_hL ∂_hLᵀ): ``kappa=κ``, or (None) measured along the model's direction
    as its Gauss–Newton curvature over ‖u‖² every ``rho_every`` steps, on the batch handed over by
    ``remember_batch`` (no closure needed).
    """

    RHO_HESSIAN = 0.5     # the "ρ/2·L2" of eqs. 12, 23, 26
    Options = CounterOptions
    options: CounterOptions
    # set by attach(), which DCAOptimizer.__init__ may call (a model dcanets built): class defaults
    _counter: Optional[CounterLoss] = None
    _tap: Optional[ShortcutTap] = None
    _coef: Optional[Tuple[float, float]] = None    # (s_a, s_c) of the last step that computed them

    # -- what a family defines -------------------------------------------------------------------
    def coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        """(s_a, s_c) of the direction d = s_a·a + s_c·c (and set ``self.diagnostics``)."""
        raise NotImplementedError

    def constant_coefficients(self) -> Optional[Tuple[float, float]]:
        """(s_a, s_c) when they do not depend on a and c (then one fused backward is the step)."""
        return None

    def constant_diagnostics(self) -> Dict[str, float]:
        """The diagnostics of a step with :meth:`constant_coefficients`."""
        return {}

    def skip_direction(self, closure: Callable, a: Grads) -> Grads:
        """The Newton direction with c="skip" (the counter loss re-evaluated by the closure)."""
        raise NotImplementedError

    def uses_kappa(self) -> bool:
        """Whether this configuration's coefficient turns ρ into gradient units with κ."""
        return self.options.solver == "newton"

    # -- the protocol ----------------------------------------------------------------------------
    def closure_reason(self) -> Optional[str]:
        if self.options.solver == "inner":
            return "solver='inner' evaluates the counter loss at every inner step"
        if self.options.c == "skip":
            return "c='skip' evaluates the loss again with the last block's output mixed"
        return None

    @property
    def takes_batch(self) -> bool:
        return super().takes_batch or self._measures_kappa()

    @property
    def hooks_model(self) -> bool:
        return self._counter is not None

    @property
    def counter(self) -> Optional[CounterLoss]:
        """The counter loss's hooks on the model (None until ``attach``)."""
        return self._counter

    @property
    def tap(self) -> Optional[ShortcutTap]:
        """The hooks that record c during the loop's ``loss.backward()`` (None until ``attach``, and
        for configurations stepped with a closure)."""
        return self._tap

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the model's same-shape blocks (idempotent for the same model); without a closure
        the step needs the ``ShortcutTap`` too."""
        if self._counter is not None and self._counter.model is model:
            return
        for hooks in (self._tap, self._counter):
            if hooks is not None:
                hooks.detach()
        self._counter = CounterLoss(model, self.options.where)
        self._tap = None if self.needs_closure else ShortcutTap(self._counter, self._params(), self._fused_ratio)
        super().attach(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the c recorded with them."""
        super().zero_grad(set_to_none)
        if self._tap is not None:
            self._tap.clear()

    def gradients_ready(self) -> None:
        """Data parallel: eq. 17's c recorded by the backward averaged over the ranks, as DDP did
        with a (dcanets.optim.distributed); fused backwards need nothing, their p.grad is a + r·c."""
        if self.collective is not None and self._tap is not None:
            self._tap.make_global(self.collective.mean_grads)

    def _batch_due(self) -> Optional[str]:
        what = super()._batch_due()
        if what is None and self._measures_kappa() and self.curvature.due("kappa", self._nsteps) \
                and self._reused_coefficients() is None:
            what = "kappa (rho > 0 without kappa=...)"
        return what

    def _measures_kappa(self) -> bool:
        return self.uses_kappa() and self.options.kappa is None and self.options.rho != 0

    def closure_free_hint(self) -> str:
        return ("the defaults c='shortcut' and solver='newton' (and kappa=... with direction='newton'), "
                "which step from the loop's own backward")

    def _counter_or_fail(self) -> CounterLoss:
        if self._counter is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model: its parameters are not those of "
                               "a model dcanets built (timm.create_model of a dcanets name attaches by itself), so "
                               "call dcanets.optim.prepare(optimizer, model) first")
        return self._counter

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Without a closure: the step from the last ``loss.backward()`` (``ShortcutTap``). With one:
        the closure is run as many times as the step needs (hooks of the plain path paused)."""
        if closure is None:
            if self.needs_closure:
                self._require_closure(None)
            counter = self._counter_or_fail()
            self._use_recorded_batch()
            self._check_batch()
            return self._plain_step(counter)
        counter = self._counter_or_fail()
        self._check_batch()
        with self._tap_paused():
            self._learn_blocks(closure, counter)
            self._update_rho()
            if self.options.solver == "newton" and self.options.c == "shortcut":
                return self._shortcut_step(closure, counter)
            loss, a = self._first(closure)
            counter.observe()
            inner = self.options.solver == "inner"
            d = self._inner_solve(closure, a) if inner else self.skip_direction(closure, a)
        restore_grads(self._params(), a)
        self._apply(d)
        return loss

    @contextmanager
    def _mixing(self, alpha: float) -> Iterator[None]:
        """L'_α for a measurement's forward passes, which the plain path's hooks must not record."""
        tap = self._tap
        was = tap.suspended if tap is not None else False
        if tap is not None:
            tap.suspended = True
        try:
            if alpha == 1.0:
                yield
            else:
                with self._counter_or_fail().mixing(alpha):
                    yield
        finally:
            if tap is not None:
                tap.suspended = was

    @contextmanager
    def _tap_paused(self) -> Iterator[None]:
        """The closure's own backward passes must not feed the plain path's hooks."""
        tap = self._tap
        if tap is None:
            yield
            return
        tap.suspended = True
        try:
            yield
        finally:
            tap.suspended = False
            tap.clear()

    # -- c = "shortcut": the coefficients and the two ways to get a and c -------------------------
    def _reused_coefficients(self) -> Optional[Tuple[float, float]]:
        """(s_a, s_c) known before this step's backward (constant, or kept for ``beta_every``
        steps); None when this step computes them from its a and c."""
        coef = self.constant_coefficients()
        if coef is None and self._coef is not None and self._nsteps % self.options.beta_every != 0:
            coef = self._coef
        return coef

    def _fused_ratio(self) -> Optional[float]:
        """r of the fused backward (the trunk gets ∂L/∂h^{L−1} + r·∂L/∂h^L, p.grad = a + r·c), or
        None when this step needs a and c apart."""
        coef = self._reused_coefficients()
        if coef is None:
            return None
        s_a, s_c = coef
        return s_c / s_a if s_a != 0 else 0.0      # s_a = 0 only with t = 0, where s_c = 0 too

    def _new_direction(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Grads:
        """d = s_a·a + s_c·c with coefficients computed from this step's a and c."""
        self.diagnostics = {}
        self._coef = self.coefficients(a, c, closure)
        return axpy(scaled(a, self._coef[0]), self._coef[1], c)

    def _finish(self, d: Grads, grads: Grads, coef: Tuple[float, float], refreshed: bool) -> None:
        """Diagnostics, step count, ``p.grad`` (a, or d on fused steps) and the update."""
        if not refreshed and self.constant_coefficients() is not None:
            self.diagnostics = self.constant_diagnostics()
        # on reused steps the diagnostics of the step that set the coefficients stay
        self.diagnostics.update({"s_a": coef[0], "s_c": coef[1], "refreshed": refreshed})
        restore_grads(self._params(), grads)
        self._apply(d)

    def _plain_step(self, counter: CounterLoss) -> None:
        """The step from what ``ShortcutTap`` recorded during the loop's ``loss.backward()``:
        p.grad = a and c apart, or p.grad = a + r·c after a fused backward."""
        tap = self._tap
        assert tap is not None  # made by attach whenever no closure is needed
        if tap.c is not None and not tap.averaged:  # a separate c: the rank's own, unless gradients_ready() ran
            self._require_global("eq. 17's c")
            if self.collective is not None:
                raise ValueError(f"{type(self).__name__}: data parallel, but eq. 17's c of this step was not averaged "
                                 "over the ranks: call optimizer.gradients_ready() after the backward, before "
                                 "clipping and step() (dcanets.optim.take_step does)")
        ratio, c = tap.take()
        if tap.seen_forward:
            counter.observe()   # a model whose stage blocks all change shape raises here
        self._update_rho()
        coef = self._reused_coefficients()
        params = self._params()
        if coef is not None and ratio is not None:
            d = [None if p.grad is None else p.grad * coef[0] if coef[0] != 1 else p.grad for p in params]
            self._finish(d, d, coef, refreshed=False)
        elif coef is None and c is not None:
            a = [p.grad for p in params]
            d = self._new_direction(a, c, None)
            assert self._coef is not None  # set by _new_direction
            self._finish(d, a, self._coef, refreshed=True)
        else:
            raise RuntimeError(
                f"{type(self).__name__}.step() takes c from the hooks of the last loss.backward(), but none "
                "went through the model's last same-shape block since the last step: call loss.backward() "
                "first (torch.autograd.grad, backward(inputs=...) and a torch.compile'd model bypass the "
                "hooks), or pass a closure to step")

    def _learn_blocks(self, closure: Callable, counter: CounterLoss) -> None:
        """First step only: one pass (buffers frozen) that finds the same-shape blocks, before
        anything evaluates a counter loss or cuts the graph at the last one."""
        if counter.probing:
            with torch.enable_grad(), self._frozen_buffers():
                closure()
            counter.observe()

    def _kappa(self, direction: Grads, alpha: float) -> float:
        """κ of the rank-one model ∂²L'_α ≈ κ·u uᵀ along the model's direction u (eqs. 15, 22,
        25): ``kappa``, or the Gauss–Newton curvature of L'_α along u over ‖u‖², measured every
        ``rho_every`` steps on the remembered batch (``dcanets.optim.rho.gauss_newton_curvature``)."""
        kappa = self.options.kappa
        if kappa is not None:
            return kappa
        if self.curvature.due("kappa", self._nsteps):
            batch = self._batch_or_fail("kappa")
            assert self._model is not None  # attach() ran: the step checked
            with self._measuring():
                with self._mixing(alpha):
                    outputs = self._model(batch.inputs)
                curv = gauss_newton_curvature(outputs, batch.targets, batch.loss_fn, self._params(), direction)
            curv = self._global(curv)  # linear in the loss: the global batch's is the ranks' mean
            if not curv > 0:
                raise ValueError(
                    f"{type(self).__name__}: the Gauss-Newton curvature of L'_{alpha:g} along the step's direction is "
                    f"{curv:.3g}, not > 0, so it gives no kappa to put rho in Hessian units: pass kappa=..., or rho=0")
            self.curvature.record(self._nsteps, kappa=curv / total_sqnorm(direction))
        kappa = self.curvature.latest("kappa")
        assert kappa is not None  # recorded above on the first call
        return kappa

    def _ridge(self, direction: Grads, alpha: float) -> float:
        """ρ/(2κ): ρ (Hessian units) in the squared-gradient units of a closed-form coefficient
        (docs/decompositions.md, "ρ in the paper's units"); 0 when ρ = 0 or u = 0."""
        if self.rho == 0 or total_sqnorm(direction) == 0:
            return 0.0
        kappa = self._kappa(direction, alpha)
        self.diagnostics.update({"rho": self.rho, "kappa": kappa})
        return self.rho / (2 * kappa)

    def _shortcut_step(self, closure: Callable, counter: CounterLoss):
        """One forward, the graph cut at h^{L−1}; a and c are two vector–Jacobian products of
        the trunk (or one, with the cotangent s_a·∂L/∂h^{L−1} + s_c·∂L/∂h^L, when the
        coefficients are constant or reused for ``beta_every`` steps)."""
        with torch.enable_grad(), counter.cutting():
            loss = closure()
        cut, counter.cut = counter.cut, {}
        params, post = self._params(), self._grads()
        h, g_in, g_out = cut["h"], cut["leaf"].grad, cut["grad_out"]
        coef = self._reused_coefficients()
        if coef is None:
            with torch.enable_grad():
                trunk_a = torch.autograd.grad(h, params, g_in, retain_graph=True, allow_unused=True)
                # allow_unused: an entry is None for a parameter h^{L−1} does not depend on
                # (the block's own weights and the head): c is zero there (eq. 17)
                c: Grads = list(torch.autograd.grad(h, params, g_out, allow_unused=True))
            a = axpy(post, 1.0, list(trunk_a))
            d = self._new_direction(a, c, closure)
            assert self._coef is not None  # set by _new_direction
            self._finish(d, a, self._coef, refreshed=True)
        else:
            s_a, s_c = coef
            with torch.enable_grad():
                trunk = torch.autograd.grad(h, params, s_a * g_in + s_c * g_out, allow_unused=True)
            d = axpy(scaled(post, s_a), 1.0, list(trunk))
            self._finish(d, d, coef, refreshed=False)
        return loss


@dataclass(frozen=True)
class DcaCounterOptions(CounterOptions):
    """The counter options, and β's guard: ``beta_max`` and ``beta_policy`` ("raise" or "clamp")."""

    beta_max: float = 100.0
    beta_policy: str = "raise"

    def __post_init__(self) -> None:
        check_option("beta_max", self.beta_max, "> 0 (float('inf') turns the check off)", self.beta_max > 0)
        if self.beta_policy not in BETA_POLICIES:
            raise ValueError(f"beta_policy must be one of {', '.join(BETA_POLICIES)}; got {self.beta_policy!r}")
        normalise(self, "beta_max", float(self.beta_max))
        super().__post_init__()


class DcaCounter(CounterDCA):
    """G2 = L + ½L'_{−1} + ρ/2·L2, H2 = ½L'_{−1} + ρ/2·L2 (paper 000, eq. 12).

    solver="newton": one Newton step on the subproblem (eq. 14) with a ⊥ c gives eq. 19,
    d = a + β·c, with a = ∇L and c from ``c`` (default "shortcut", eq. 17's c; see
    :class:`CounterDCA`). In these gradient units eq. 19 reads β = ‖a‖²/(2‖c‖² + ρ/(2κ)): the paper's
    a, c (eq. 17, MSE) are ours times √(κ/2), so its ρ/4 is our ρ/(2κ) and ρ stays a Hessian
    eigenvalue (docs/decompositions.md). solver="inner": K gradient steps on the subproblem (no c).
    ``rho="auto"`` makes both G2 and H2 convex at w_k.

    β explodes when ‖c‖ ≪ ‖a‖ (β ≈ ½‖a‖²/‖c‖² at ρ = 0, and βc is then ≈ ‖a‖²/(2‖c‖) long):
    β > ``beta_max`` (default 100, i.e. ‖c‖/‖a‖ ≲ 0.07 at ρ = 0) raises a ValueError, or with
    ``beta_policy="clamp"`` sets β = beta_max (the step is then no longer eq. 19's). With
    c="shortcut", ``beta_every=K`` recomputes β every K steps and reuses it in between, where d
    is one fused product (SGD's cost) and ``p.grad`` holds d. ``diagnostics``: ``beta``, and
    on the steps that compute it ``beta_eq19`` (before clamping) and ``c_over_a`` = ‖c‖/‖a‖."""

    Options = DcaCounterOptions
    options: DcaCounterOptions

    def gamma(self) -> Dict[float, float]:
        return {1.0: 1.0, -1.0: 0.5}

    def convex_parts(self) -> Dict[str, Dict[float, float]]:
        return {"G": self.gamma(), "H": {-1.0: 0.5}}     # a DC decomposition: both convex (eq. 12)

    def beta(self, a: Grads, c: Grads) -> float:
        """β of paper 000, eq. 19 with ρ in Hessian units, checked against ``beta_max``."""
        self.diagnostics = {}
        a2, c2 = total_sqnorm(a), total_sqnorm(c)
        denom = 2 * c2 + self._ridge(a, 1.0)                      # κ along a, in L's Hessian
        beta = a2 / denom if denom > 0 else 0.0                   # paper 000, eq. 19
        ratio = (c2 / a2) ** 0.5 if a2 > 0 else 0.0
        self.diagnostics.update({"beta_eq19": beta, "c_over_a": ratio})
        bmax = self.options.beta_max
        if beta > bmax:
            if self.options.beta_policy == "raise":
                raise ValueError(
                    f"dcacounter: beta = |a|^2/(2|c|^2 + rho/(2 kappa)) = {beta:.3g} exceeds beta_max = {bmax:g} "
                    f"(|c|/|a| = {ratio:.3g}, so beta*c would be {beta * ratio:.3g}x the gradient a): "
                    "raise rho, or pass beta_policy='clamp' or a larger beta_max")
            beta = bmax
        self.diagnostics["beta"] = beta
        return beta

    def skip_direction(self, closure: Callable, a: Grads) -> Grads:
        c = self.loss_gradients(closure, 0.0)                      # c = ∇L'_0 (not eq. 17's c)
        return axpy(a, self.beta(a, c), c)

    def coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        return 1.0, self.beta(a, c)
