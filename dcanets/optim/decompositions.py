"""Network-loss DC decompositions as torch optimizers (paper 000, §3–4), and ``prepare``.

dcal2 (eq. 9), dcaprox (proximal point), dcacounter (eq. 12/19), dcaquasihalf (eq. 23) and
dcaquasineghalf (eq. 26); registered into timm by the built-in ``decompositions`` plugin.

``prepare(optimizer, model)`` is the one call a training loop makes after
``timm.optim.create_optimizer_v2``: it attaches the counter-loss hooks the optimizer needs and
says whether ``optimizer.step`` must be given a closure.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from dcanets.analysis.curvature import FrozenBuffers
from dcanets.optim.counter import CounterLoss


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """timm's Lookahead keeps the real optimizer in ``_base_optimizer`` (``base_optimizer`` in
    older releases)."""
    while True:
        inner = getattr(optimizer, "_base_optimizer", None) or getattr(optimizer, "base_optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner


def prepare(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    """Attach ``optimizer`` to ``model`` if it needs to (idempotent); True if it needs a closure.

    When True, step with ``optimizer.step(closure)`` where ``closure`` zeroes the gradients,
    runs forward, loss and backward, and returns the loss: the counter-loss decompositions
    re-run it with a block's output replaced (paper 000, eq. 10).
    """
    inner = _unwrap(optimizer)
    attach = getattr(inner, "attach", None)
    if callable(attach):
        attach(model)
    return bool(getattr(type(inner), "needs_closure", False))


# ---------------------------------------------------------------------------------------------
# Conventions (kept everywhere): L2(w) = ½‖w‖², so a term "μ·L2" has Hessian μ·I.
# Every decomposition moves the weights to the DCA point w_{k+1} = w_k − lr·d. ``lr`` is the
# step size 1/λ of the strongly convex part of G (G1 = λ·L2 gives exactly SGD with lr = 1/λ);
# ``lam`` is another way to say the same thing (lr = 1/lam). ``weight_decay`` adds wd·w to d,
# momentum/dampening/nesterov act on d, both exactly as torch.optim.SGD does on the gradient.
# ---------------------------------------------------------------------------------------------

Grads = List[Optional[torch.Tensor]]
SOLVERS = ("newton", "inner")
C_MODES = ("shortcut", "skip")          # "shortcut": eq. 17's c (the default); see _CounterDCA
BETA_POLICIES = ("raise", "clamp")
WHERE_ALL_REFUSED = (
    "where='all' is refused: skipping every same-shape block at once is a different network, not "
    "paper 000's one-block counter loss (on cifar_plainnet56 |c|/|a| = 0.0013, beta = 3e5, a first "
    "step 92x SGD's); use where='last'")


def _check(name: str, value: float, allowed: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def resolve_lr(lr: Optional[float], lam: Optional[float]) -> float:
    """The step size: ``lr`` or ``1/lam`` (paper 000, eq. 9: G1 = λ·L2 gives lr = 1/λ)."""
    if lam is not None:
        _check("lam", lam, "> 0 (the L2 weight λ of G1 = λ·L2; lr = 1/λ)", lam > 0)
        if lr is not None and abs(lr * lam - 1.0) > 1e-9:
            raise ValueError(f"lr and lam set the same step (lr = 1/lam); got lr={lr} and lam={lam}: "
                             "give one of them, or consistent values")
        return 1.0 / lam
    if lr is None:
        raise ValueError("give lr (> 0) or lam (> 0, lr = 1/lam)")
    _check("lr", lr, "> 0", lr > 0)
    return float(lr)


class DCAOptimizer(torch.optim.Optimizer):
    """Shared machinery: parameter groups, SGD-identical weight decay and momentum on d."""

    needs_closure = False

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, options: Optional[Dict] = None) -> None:
        lr = resolve_lr(lr, lam)
        _check("weight_decay", weight_decay, ">= 0", weight_decay >= 0)
        _check("momentum", momentum, "in [0, 1)", 0 <= momentum < 1)
        _check("dampening", dampening, "in [0, 1]", 0 <= dampening <= 1)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        dampening=dampening, nesterov=nesterov, **(options or {}))
        super().__init__(params, defaults)
        self._model: Optional[torch.nn.Module] = None
        self.diagnostics: Dict[str, float] = {}   # last step's β (eq. 19) or line coefficient

    def attach(self, model: torch.nn.Module) -> None:
        """Remember the model (its buffers are frozen during extra loss evaluations)."""
        self._model = model

    # -- helpers --------------------------------------------------------------------------
    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _grads(self) -> Grads:
        return [None if p.grad is None else p.grad.detach().clone() for p in self._params()]

    def _require_closure(self, closure: Optional[Callable]) -> Callable:
        if closure is None:
            raise ValueError(
                f"{type(self).__name__} evaluates the loss more than once per step: call "
                "optimizer.step(closure) with a closure that zeroes the gradients, runs forward, "
                "loss and backward and returns the loss (see dcanets.optim.decompositions.prepare)")
        return closure

    @torch.no_grad()
    def _apply(self, directions: Grads) -> None:
        """w ← w − lr·d, with d + wd·w and momentum on d exactly as torch.optim.SGD."""
        i = 0
        for group in self.param_groups:
            m, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
            for p in group["params"]:
                d, i = directions[i], i + 1
                if d is None:
                    continue
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if m != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(m).add_(d, alpha=1 - damp)
                    d = d.add(buf, alpha=m) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])

    def _lrs(self) -> List[float]:
        return [g["lr"] for g in self.param_groups for _ in g["params"]]


def _sqnorm(vs: Sequence[Optional[torch.Tensor]]) -> float:
    return float(sum((v.double() ** 2).sum() for v in vs if v is not None))


def _dot(us: Grads, vs: Grads) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(us, vs)
                     if u is not None and v is not None))


def _axpy(xs: Grads, beta: float, ys: Grads) -> Grads:
    """x + β·y, a missing gradient counting as zero."""
    out: Grads = []
    for x, y in zip(xs, ys):
        if y is None or beta == 0:
            out.append(x)
        elif x is None:
            out.append(beta * y)
        else:
            out.append(x.add(y, alpha=beta))
    return out


class DcaL2(DCAOptimizer):
    """G1 = λ·L2, H1 = λ·L2 − L (paper 000, eq. 9): stochastic DCA is SGD with lr = 1/λ.

    y_k = ∇H1(w_k) = λw_k − ∇L(w_k); w_{k+1} = argmin λ/2‖w‖² − ⟨w, y_k⟩ = w_k − ∇L(w_k)/λ.
    Uses the gradients already in ``p.grad``; a closure, if given, is evaluated first.
    ``rho`` is accepted (and checked) so every decomposition takes the same arguments; G1 has
    no ρ term, so it has no effect.
    """

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: float = 0.0, **kwargs) -> None:
        _check("rho", rho, ">= 0", rho >= 0)
        super().__init__(params, lr=lr, lam=lam, options={"rho": float(rho)}, **kwargs)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply([None if p.grad is None else p.grad for p in self._params()])
        return loss


class _ClosureDCA(DCAOptimizer):
    """Decompositions G = Σ_α γ_α L'_α + μ·L2 that need the loss at more than one point."""

    needs_closure = True

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: float = 0.0, inner_steps: int = 3, **kwargs) -> None:
        _check("rho", rho, ">= 0 (choose rho >= -lambda_min of the loss Hessian)", rho >= 0)
        _check("inner_steps", inner_steps, "an integer >= 1",
               isinstance(inner_steps, int) and inner_steps >= 1)
        options = dict(kwargs.pop("options", None) or {}, rho=float(rho), inner_steps=inner_steps)
        super().__init__(params, lr=lr, lam=lam, options=options, **kwargs)

    # the decomposition: {α: γ_α} and μ (overridden)
    def _gamma(self) -> Dict[float, float]:
        raise NotImplementedError

    def _mu(self) -> float:
        raise NotImplementedError

    def _eval(self, closure: Callable, alpha: float) -> Grads:
        """Gradients of L'_α at the current weights (α = 1: the loss itself)."""
        with torch.enable_grad(), self._frozen_buffers():
            if alpha == 1.0:
                closure()
            else:
                self._counter_or_fail().evaluate(closure, alpha)
        return self._grads()

    def _counter_or_fail(self) -> CounterLoss:
        raise RuntimeError(f"{type(self).__name__} has no counter loss")

    def _frozen_buffers(self):
        """Extra evaluations must not move BatchNorm running statistics."""
        return FrozenBuffers(self._model)

    @torch.no_grad()
    def _inner_solve(self, closure: Callable, a0: Grads) -> Grads:
        """Inexact DCA: K gradient steps (size lr) on the convex subproblem
        S(w) = G(w) − ⟨∇H(w_k), w⟩, whose gradient is
        ∇S(w) = ∇L(w_k) + Σ_α γ_α (∇L'_α(w) − ∇L'_α(w_k)) + μ (w − w_k)   (H = G − L).
        Returns d with w_K = w_k − lr·d."""
        params, lrs = self._params(), self._lrs()
        gamma, mu, steps = self._gamma(), self._mu(), self.defaults["inner_steps"]
        w0 = [p.detach().clone() for p in params]
        ref = {al: (a0 if al == 1.0 else self._eval(closure, al)) for al in gamma}
        grad = a0                                           # ∇S(w_k) = ∇L(w_k)
        for j in range(steps):
            for p, g, lr in zip(params, grad, lrs):
                if g is not None:
                    p.add_(g, alpha=-lr)
            if j == steps - 1:
                break
            grad = list(a0)
            for al, ga in gamma.items():
                cur = self._eval(closure, al)
                grad = _axpy(_axpy(grad, ga, cur), -ga, ref[al])
            grad = [None if g is None else g.add(p - w, alpha=mu) for g, p, w in zip(grad, params, w0)]
        d = [(w - p) / lr for w, p, lr in zip(w0, params, lrs)]
        for p, w in zip(params, w0):
            p.copy_(w)
        return [None if a is None and (di == 0).all() else di for a, di in zip(a0, d)]

    def _first(self, closure: Callable):
        """Evaluate the ordinary loss L at w_k; its gradient is a (eq. 17)."""
        with torch.enable_grad():
            loss = closure()
        return loss, self._grads()


class DcaProx(_ClosureDCA):
    """Proximal decomposition G = L + ρ·L2, H = ρ·L2 (paper 000, §2: the proximal point method):
    w_{k+1} = argmin L(w) + ρ/2‖w − w_k‖², solved inexactly by ``inner_steps`` gradient steps
    of size lr (one step is SGD). ρ ≥ −λ_min(∇²L) makes G convex."""

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: float = 1.0, inner_steps: int = 3, **kwargs) -> None:
        super().__init__(params, lr=lr, lam=lam, rho=rho, inner_steps=inner_steps, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {1.0: 1.0}

    def _mu(self) -> float:
        return self.defaults["rho"]

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        closure = self._require_closure(closure)
        loss, a = self._first(closure)
        d = self._inner_solve(closure, a)
        self._restore_grads(a)
        self._apply(d)
        return loss

    def _restore_grads(self, a: Grads) -> None:
        """Leave ∇L(w_k) in p.grad, as after an ordinary backward pass."""
        for p, g in zip(self._params(), a):
            p.grad = g


class _CounterDCA(DcaProx):
    """Decompositions built on the counter loss L'_α of the last same-shape block (paper 000,
    eqs. 10, 12, 23, 26).

    ``c`` (solver="newton" only; the inner solver evaluates L'_α itself and never forms c):

    - ``"shortcut"`` (default): c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L, paper 000, eq. 17 (C = (0, ∂_w F^{L−2}))
      with a = ∇L: the identity shortcut's part of the one-block ResNet gradient. It is zero on
      the block's own parameters and on everything above the block (the head), so a + c is the
      gradient of the plain net with a gradient-only identity shortcut around that one block.
      Cost: one forward with the graph cut at h^{L−1}, then two vector–Jacobian products of the
      trunk (one when the coefficients are constant or reused for ``beta_every`` steps).
    - ``"skip"``: the vectors come from re-running the closure with the block's output mixed
      (``CounterLoss.evaluate``): for ``dcacounter`` c = ∇L'_0, the gradient of the network with
      the block removed, i.e. ∂L/∂h at h^{L−1} (not at h^L) times ∂h^{L−1}/∂w, plus the head's
      gradient at the features h^{L−1}; that is not eq. 17's c. About 2× an SGD step.
    """

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: float = 0.0, solver: str = "newton", inner_steps: int = 3,
                 where: str = "last", c: str = "shortcut", beta_every: int = 1, **kwargs) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
        if where == "all":
            raise ValueError(WHERE_ALL_REFUSED)
        if where != "last":
            raise ValueError(f"where must be 'last' (the one block of paper 000, eq. 10); got {where!r}")
        if c not in C_MODES:
            raise ValueError(f"c must be one of {', '.join(C_MODES)}; got {c!r}")
        _check("beta_every", beta_every, "an integer >= 1", isinstance(beta_every, int) and beta_every >= 1)
        if beta_every > 1 and (c != "shortcut" or solver != "newton"):
            raise ValueError("beta_every > 1 reuses the coefficients of c='shortcut' with solver='newton' only")
        options = dict(kwargs.pop("options", None) or {}, solver=solver, where=where, c=c,
                       beta_every=beta_every)
        super().__init__(params, lr=lr, lam=lam, rho=rho, inner_steps=inner_steps,
                         options=options, **kwargs)
        self._counter: Optional[CounterLoss] = None
        self._coef: Optional[tuple] = None
        self._nsteps = 0

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the model's same-shape blocks (idempotent for the same model)."""
        if self._counter is not None and self._counter.model is model:
            return
        if self._counter is not None:
            self._counter.detach()
        self._counter = CounterLoss(model, self.defaults["where"])
        super().attach(model)

    def _counter_or_fail(self) -> CounterLoss:
        if self._counter is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model: call "
                               "dcanets.optim.decompositions.prepare(optimizer, model) first")
        return self._counter

    def _mu(self) -> float:
        return self.defaults["rho"] / 2       # the "ρ/2·L2" of eqs. 12, 23, 26

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        closure = self._require_closure(closure)
        counter = self._counter_or_fail()
        if self.defaults["solver"] == "newton" and self.defaults["c"] == "shortcut":
            return self._shortcut_step(closure, counter)
        loss, a = self._first(closure)
        counter.observe()
        if self.defaults["solver"] == "inner":
            d = self._inner_solve(closure, a)
        else:
            d = self._skip_direction(closure, a)
        self._restore_grads(a)
        self._apply(d)
        return loss

    def _skip_direction(self, closure: Callable, a: Grads) -> Grads:
        """The Newton direction with c="skip" (the counter loss re-evaluated by the closure)."""
        raise NotImplementedError

    # -- c = "shortcut": a and c from one forward pass -------------------------------------------
    def _coefficients(self, a: Grads, c: Grads, closure: Callable) -> tuple:
        """(s_a, s_c) of the direction d = s_a·a + s_c·c (and set ``self.diagnostics``)."""
        raise NotImplementedError

    def _constant_coefficients(self) -> Optional[tuple]:
        return None

    def _shortcut_step(self, closure: Callable, counter: CounterLoss):
        """One forward, the graph cut at h^{L−1}; a and c are two vector–Jacobian products of
        the trunk (or one, with the cotangent s_a·∂L/∂h^{L−1} + s_c·∂L/∂h^L, when the
        coefficients are constant or reused for ``beta_every`` steps)."""
        if counter._probing:                       # first step only: learn the block order
            with torch.enable_grad(), self._frozen_buffers():
                closure()
            counter.observe()
        with torch.enable_grad(), counter.cutting():
            loss = closure()
        cut = counter.cut
        params, post = self._params(), self._grads()
        h, g_in, g_out = cut["h"], cut["leaf"].grad, cut["grad_out"]
        coef = self._constant_coefficients()
        refresh = coef is None and (self._coef is None or self._nsteps % self.defaults["beta_every"] == 0)
        counter.cut = {}
        if refresh:           # otherwise the diagnostics of the step that set the coefficients stay
            self.diagnostics = {}
            with torch.enable_grad():
                trunk_a = torch.autograd.grad(h, params, g_in, retain_graph=True, allow_unused=True)
                # allow_unused: an entry is None for a parameter h^{L−1} does not depend on
                # (the block's own weights and the head): c is zero there (eq. 17)
                c: Grads = list(torch.autograd.grad(h, params, g_out, allow_unused=True))
            a = _axpy(post, 1.0, list(trunk_a))
            self._coef = self._coefficients(a, c, closure)
            d = _axpy([None if x is None else self._coef[0] * x for x in a], self._coef[1], c)
            grads = a
        else:
            used = coef or self._coef
            assert used is not None  # no refresh: constant coefficients, or the last ones reused
            s_a, s_c = used
            with torch.enable_grad():
                trunk = torch.autograd.grad(h, params, s_a * g_in + s_c * g_out, allow_unused=True)
            d = _axpy([None if x is None else s_a * x for x in post], 1.0, list(trunk))
            grads = d
        used = coef or self._coef
        assert used is not None  # set above when refreshing
        self.diagnostics.update({"s_a": used[0], "s_c": used[1], "refreshed": refresh})
        self._nsteps += 1
        self._restore_grads(grads)
        self._apply(d)
        return loss


class DcaCounter(_CounterDCA):
    """G2 = L + ½L'_{−1} + ρ/2·L2, H2 = ½L'_{−1} + ρ/2·L2 (paper 000, eq. 12).

    solver="newton": one Newton step on the subproblem (eq. 14) with a ⊥ c gives eq. 19,
    d = a + β·c, β = ‖a‖²/(2‖c‖² + ρ/4), with a = ∇L and c from ``c`` (default "shortcut",
    eq. 17's c; see ``_CounterDCA``). ρ here sits next to 2‖c‖², i.e. it is in units of a squared
    gradient norm. solver="inner": K gradient steps on the subproblem (no c).

    β explodes when ‖c‖ ≪ ‖a‖ (β ≈ ½‖a‖²/‖c‖² at ρ = 0, and βc is then ≈ ‖a‖²/(2‖c‖) long):
    β > ``beta_max`` (default 100, i.e. ‖c‖/‖a‖ ≲ 0.07 at ρ = 0) raises a ValueError, or with
    ``beta_policy="clamp"`` sets β = beta_max (the step is then no longer eq. 19's). With
    c="shortcut", ``beta_every=K`` recomputes β every K steps and reuses it in between, where d
    is one fused product (SGD's cost) and ``p.grad`` holds d. ``diagnostics``: ``beta``, and
    on the steps that compute it ``beta_eq19`` (before clamping) and ``c_over_a`` = ‖c‖/‖a‖."""

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 beta_max: float = 100.0, beta_policy: str = "raise", **kwargs) -> None:
        _check("beta_max", beta_max, "> 0 (float('inf') turns the check off)", beta_max > 0)
        if beta_policy not in BETA_POLICIES:
            raise ValueError(f"beta_policy must be one of {', '.join(BETA_POLICIES)}; got {beta_policy!r}")
        options = dict(kwargs.pop("options", None) or {}, beta_max=float(beta_max), beta_policy=beta_policy)
        super().__init__(params, lr=lr, lam=lam, options=options, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {1.0: 1.0, -1.0: 0.5}

    def _beta(self, a: Grads, c: Grads) -> float:
        """β of paper 000, eq. 19, checked against ``beta_max``."""
        a2, c2 = _sqnorm(a), _sqnorm(c)
        denom = 2 * c2 + self.defaults["rho"] / 4
        beta = a2 / denom if denom > 0 else 0.0                   # paper 000, eq. 19
        ratio = (c2 / a2) ** 0.5 if a2 > 0 else 0.0
        self.diagnostics = {"beta_eq19": beta, "c_over_a": ratio}
        bmax = self.defaults["beta_max"]
        if beta > bmax:
            if self.defaults["beta_policy"] == "raise":
                raise ValueError(
                    f"dcacounter: beta = |a|^2/(2|c|^2 + rho/4) = {beta:.3g} exceeds beta_max = {bmax:g} "
                    f"(|c|/|a| = {ratio:.3g}, so beta*c would be {beta * ratio:.3g}x the gradient a): "
                    "raise rho, or pass beta_policy='clamp' or a larger beta_max")
            beta = bmax
        self.diagnostics["beta"] = beta
        return beta

    def _skip_direction(self, closure: Callable, a: Grads) -> Grads:
        c = self._eval(closure, 0.0)                                # c = ∇L'_0 (not eq. 17's c)
        return _axpy(a, self._beta(a, c), c)

    def _coefficients(self, a: Grads, c: Grads, closure: Callable) -> tuple:
        return 1.0, self._beta(a, c)


class _QuasiDCA(_CounterDCA):
    """Quasi-DC G = L'_α + ρ/2·L2, H = G − L (only G convex; paper 000, eqs. 23–26). The paper
    models ∂²G as rank one along g = αa + (1 − α)c (eq. 25) and steps along that line.

    g: with c="shortcut" (default) g = αa + (1 − α)c with eq. 17's c (the vector of eq. 25);
    with c="skip" g = ∇L'_α, the exact gradient of the counter loss, from a second closure run.
    The step is d = t·g (w ← w − lr·d); ``direction`` picks t:

    - ``"paper"``: t = 1/α, so a keeps coefficient 1 (α = ½: d = a + c, the one-block ResNet
      gradient; α = −½: d = a − 3c).
    - ``"projection"`` (old name ``"line"``): t = ⟨a, g⟩/(‖g‖² + ρ/4), the ridge-regularised
      projection of a onto the line of g (ρ = 0: the orthogonal projection). Not a Newton step;
      never an ascent direction for L (⟨a, d⟩ = ⟨a, g⟩²/(‖g‖² + ρ/4) ≥ 0).
    - ``"newton"``: t = ⟨a, g⟩/(gᵀ∂²L'_α g + ρ/2·‖g‖²), the minimiser of eq. 24's model
      ⟨a, Δw⟩ + ½Δwᵀ∂²G Δw over the line Δw = −t·g. The curvature gᵀ∂²L'_α g is measured by a
      central difference of ∇L'_α along g (two extra closure runs, step ``fd_eps``·max(1, ‖w‖))
      or, with ``kappa=κ``, taken from eq. 25's rank-one model ∂²L'_α = κ·g gᵀ (∂²_hL ≈ κ·∂_hL ∂_hLᵀ,
      eqs. 15, 22; MSE: κ = 1/(2L)): gᵀ∂²L'_α g = κ‖g‖⁴. lr = 1 takes the full line-Newton step.
      If gᵀ∂²G g ≤ 0 (G not convex along g) the step raises a ValueError.

    solver="inner" ignores ``direction``. Defaults: "paper" for α = ½; "projection" for α = −½,
    whose paper direction a − 3c diverged on the test MLP (tests/optim)."""

    ALPHA = 0.5
    DIRECTION = "paper"
    DIRECTIONS = ("paper", "projection", "newton")
    ALIASES = {"line": "projection"}    # the old name of "projection"

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 direction: Optional[str] = None, kappa: Optional[float] = None,
                 fd_eps: float = 1e-3, **kwargs) -> None:
        direction = self.DIRECTION if direction is None else self.ALIASES.get(direction, direction)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(self.DIRECTIONS)}; got {direction!r}")
        if kappa is not None:
            _check("kappa", kappa, "> 0 (the rank-one curvature factor of eq. 25) or None", kappa > 0)
            if direction != "newton":
                raise ValueError("kappa is the curvature model of direction='newton' only")
        _check("fd_eps", fd_eps, "> 0", fd_eps > 0)
        options = dict(kwargs.pop("options", None) or {}, direction=direction, kappa=kappa,
                       fd_eps=float(fd_eps))
        super().__init__(params, lr=lr, lam=lam, options=options, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {self.ALPHA: 1.0}

    def _curvature(self, closure: Callable, g: Grads, g2: float) -> float:
        """gᵀ∂²L'_α g: eq. 25's κ‖g‖⁴, or a central difference of ∇L'_α along g."""
        kappa = self.defaults["kappa"]
        if kappa is not None:
            return kappa * g2 * g2
        gn = g2 ** 0.5
        params = self._params()
        w0 = [p.detach().clone() for p in params]
        eps = self.defaults["fd_eps"] * max(1.0, _sqnorm(w0) ** 0.5)
        grads = []
        for s in (eps, -eps):
            with torch.no_grad():
                for p, w, gi in zip(params, w0, g):
                    if gi is not None:
                        p.copy_(w.add(gi, alpha=s / gn))
            grads.append(self._eval(closure, self.ALPHA))
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        diff = _axpy(grads[0], -1.0, grads[1])
        return _dot(diff, g) * gn / (2 * eps)      # ⟨Δ∇L'_α, u⟩/(2ε)·‖g‖², u = g/‖g‖

    def _line(self, closure: Callable, a: Grads, g: Grads) -> float:
        """t of d = t·g for ``direction`` (see the class docstring)."""
        kind, rho = self.defaults["direction"], self.defaults["rho"]
        if kind == "paper":
            t = 1.0 / self.ALPHA
            self.diagnostics = {"coef": t}
            return t
        g2, ag = _sqnorm(g), _dot(a, g)
        if kind == "projection":
            denom = g2 + rho / 4
            t = ag / denom if denom > 0 else 0.0
            self.diagnostics = {"coef": t}
            return t
        q = self._curvature(closure, g, g2) if g2 > 0 else 0.0
        denom = q + rho / 2 * g2                      # gᵀ∂²G g, G = L'_α + ρ/2·L2 (eq. 24)
        if g2 > 0 and denom <= 0:
            raise ValueError(
                f"{type(self).__name__}: G = L'_a + rho/2*L2 is not convex along g "
                f"(g^T d2L' g = {q:.3g}, |g|^2 = {g2:.3g}): the line-Newton step needs "
                f"rho > {-2 * q / g2:.3g}")
        t = ag / denom if g2 > 0 else 0.0
        self.diagnostics = {"coef": t, "curvature": q}
        return t

    def _skip_direction(self, closure: Callable, a: Grads) -> Grads:
        g = self._eval(closure, self.ALPHA)                       # g = ∇L'_α
        t = self._line(closure, a, g)
        return [None if gi is None else t * gi for gi in g]

    def _constant_coefficients(self) -> Optional[tuple]:
        if self.defaults["direction"] == "paper":      # g/α = a + (1 − α)/α · c
            self.diagnostics = {"coef": 1.0 / self.ALPHA}
            return 1.0, (1.0 - self.ALPHA) / self.ALPHA
        return None

    def _coefficients(self, a: Grads, c: Grads, closure: Callable) -> tuple:
        al = self.ALPHA                                  # g = αa + (1 − α)c (eq. 25)
        g = _axpy([None if x is None else al * x for x in a], 1.0 - al, c)
        t = self._line(closure, a, g)
        return t * al, t * (1.0 - al)


class DcaQuasiHalf(_QuasiDCA):
    """G3 = L'_{1/2} + ρ/2·L2 (paper 000, eq. 23): by default steps along a + c (eq. 25), the
    gradient of the plain net with a gradient-only identity shortcut around the last block."""

    ALPHA = 0.5


class DcaQuasiNegHalf(_QuasiDCA):
    """G4 = L'_{−1/2} + ρ/2·L2 (paper 000, eq. 26): the decomposition behind NegNet (eq. 27).
    g = −½a + 3/2·c; default direction "projection" (the paper direction a − 3c diverges)."""

    ALPHA = -0.5
    DIRECTION = "projection"


DECOMPOSITIONS: Dict[str, type] = {
    "dcal2": DcaL2,
    "dcaprox": DcaProx,
    "dcacounter": DcaCounter,
    "dcaquasihalf": DcaQuasiHalf,
    "dcaquasineghalf": DcaQuasiNegHalf,
}


def decomposition(name: str) -> type:
    """The optimizer class of a decomposition, or a ValueError listing the known names."""
    try:
        return DECOMPOSITIONS[name]
    except KeyError:
        raise ValueError(f"unknown decomposition {name!r}; known: "
                         f"{', '.join(sorted(DECOMPOSITIONS))}") from None
