"""Network-loss DC decompositions as torch optimizers (paper 000, §3–4), and ``prepare``.

dcal2 (eq. 9), dcaprox (proximal point), dcacounter (eq. 12/19), dcaquasihalf (eq. 23) and
dcaquasineghalf (eq. 26); registered into timm by the built-in ``decompositions`` plugin.

``prepare(optimizer, model)`` is the one call a training loop makes after
``timm.optim.create_optimizer_v2``: it attaches the counter-loss hooks the optimizer needs and
says whether ``optimizer.step`` must be given a closure.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch

from dcanets.analysis.curvature import FrozenBuffers
from dcanets.optim.counter import WHERE, CounterLoss


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
C_MODES = ("skip", "shortcut")


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


def _sqnorm(vs: Grads) -> float:
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
        loss, a = self._first(self._require_closure(closure))
        d = self._inner_solve(closure, a)
        self._restore_grads(a)
        self._apply(d)
        return loss

    def _restore_grads(self, a: Grads) -> None:
        """Leave ∇L(w_k) in p.grad, as after an ordinary backward pass."""
        for p, g in zip(self._params(), a):
            p.grad = g


class _CounterDCA(DcaProx):
    """Decompositions built on the counter loss L'_α (paper 000, eqs. 10, 12, 23, 26)."""

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: float = 0.0, solver: str = "newton", inner_steps: int = 3,
                 where: str = "last", c: str = "skip", beta_every: int = 1, **kwargs) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
        if where not in WHERE:
            raise ValueError(f"where must be one of {', '.join(WHERE)}; got {where!r}")
        if c not in C_MODES:
            raise ValueError(f"c must be one of {', '.join(C_MODES)}; got {c!r}")
        _check("beta_every", beta_every, "an integer >= 1", isinstance(beta_every, int) and beta_every >= 1)
        if c == "shortcut" and (where != "last" or solver != "newton"):
            raise ValueError("c='shortcut' works with where='last' and solver='newton' only")
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
        if self.defaults["c"] == "shortcut":
            return self._shortcut_step(closure, counter)
        loss, a = self._first(closure)
        counter.observe()
        if self.defaults["solver"] == "inner":
            d = self._inner_solve(closure, a)
        else:
            d = self._newton(closure, a)
        self._restore_grads(a)
        self._apply(d)
        return loss

    def _newton(self, closure: Callable, a: Grads) -> Grads:
        raise NotImplementedError

    # -- c = "shortcut": c = ∂L/∂h^L · ∂h^{L−1}/∂w from one forward pass -----------------------
    def _coefficients(self, a: Grads, c: Grads) -> tuple:
        """(s_a, s_c) of the direction d = s_a·a + s_c·c."""
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
        with torch.enable_grad():
            if refresh:
                trunk_a = torch.autograd.grad(h, params, g_in, retain_graph=True, allow_unused=True)
                c = list(torch.autograd.grad(h, params, g_out, allow_unused=True))
                a = _axpy(post, 1.0, list(trunk_a))
                self._coef = self._coefficients(a, c)
                d = _axpy([None if x is None else self._coef[0] * x for x in a], self._coef[1], c)
                grads = a
            else:
                s_a, s_c = coef or self._coef
                trunk = torch.autograd.grad(h, params, s_a * g_in + s_c * g_out, allow_unused=True)
                d = _axpy([None if x is None else s_a * x for x in post], 1.0, list(trunk))
                grads = d
        self.diagnostics = {"s_a": (coef or self._coef)[0], "s_c": (coef or self._coef)[1], "refreshed": refresh}
        self._nsteps += 1
        counter.cut = {}
        self._restore_grads(grads)
        self._apply(d)
        return loss


class DcaCounter(_CounterDCA):
    """G2 = L + ½L'_{−1} + ρ/2·L2, H2 = ½L'_{−1} + ρ/2·L2 (paper 000, eq. 12).

    solver="newton": one Newton step on the subproblem (eq. 14) with a ⊥ c gives eq. 19,
    d = a + ‖a‖²/(2‖c‖² + ρ/4)·c, with a = ∇L; ρ is in the units of ‖c‖² (ρ = 0 lets β grow
    without bound when ‖c‖ is small). solver="inner": K gradient steps on the subproblem.

    c="skip" (default): c = ∇L'_0, the gradient with the block skipped (eq. 17), from a second
    run of the closure (≈ 2× an SGD step). c="shortcut": c = ∂L/∂h^L·∂h^{L−1}/∂w, the identity
    shortcut's part of the ResNet gradient (paper 000, eqs. 6 and 17), from one forward pass and two
    vector–Jacobian products of the trunk; with ``beta_every=K`` β is recomputed every K steps
    and reused in between, where d is one fused product (SGD cost) and ``p.grad`` holds d."""

    def _gamma(self) -> Dict[float, float]:
        return {1.0: 1.0, -1.0: 0.5}

    def _newton(self, closure: Callable, a: Grads) -> Grads:
        c = self._eval(closure, 0.0)
        denom = 2 * _sqnorm(c) + self.defaults["rho"] / 4
        beta = _sqnorm(a) / denom if denom > 0 else 0.0          # paper 000, eq. 19
        self.diagnostics = {"beta": beta}
        return _axpy(a, beta, c)

    def _coefficients(self, a: Grads, c: Grads) -> tuple:
        denom = 2 * _sqnorm(c) + self.defaults["rho"] / 4
        return 1.0, (_sqnorm(a) / denom if denom > 0 else 0.0)     # paper 000, eq. 19


class _QuasiDCA(_CounterDCA):
    """Quasi-DC G = L'_α + ρ/2·L2, H = G − L (only G convex). ∂²G is nearly rank one along
    g = ∇L'_α ≈ αa + (1 − α)c (eq. 25), and the paper's step goes along that line.

    direction="paper": d = g/α, the line scaled so that a keeps coefficient 1
    (α = ½: a + c, the ResNet gradient; α = −½: a − 3c; α = 1 would be SGD).
    direction="line": d = ⟨a, g⟩/(‖g‖² + ρ/4)·g, the Newton step of eq. 24 restricted to the
    line, never an ascent direction for L. solver="inner" ignores ``direction``.
    Defaults: "paper" for α = ½; "line" for α = −½, whose paper direction a − 3c diverges
    (measured in tests/test_decompositions.py)."""

    ALPHA = 0.5
    DIRECTION = "paper"
    DIRECTIONS = ("paper", "line")

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 direction: Optional[str] = None, **kwargs) -> None:
        direction = self.DIRECTION if direction is None else direction
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(self.DIRECTIONS)}; got {direction!r}")
        super().__init__(params, lr=lr, lam=lam, options={"direction": direction}, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {self.ALPHA: 1.0}

    def _newton(self, closure: Callable, a: Grads) -> Grads:
        g = self._eval(closure, self.ALPHA)
        if self.defaults["direction"] == "paper":
            coef = 1.0 / self.ALPHA
        else:
            denom = _sqnorm(g) + self.defaults["rho"] / 4
            coef = _dot(a, g) / denom if denom > 0 else 0.0
        self.diagnostics = {"coef": coef}
        return [None if gi is None else coef * gi for gi in g]

    def _constant_coefficients(self) -> Optional[tuple]:
        if self.defaults["direction"] == "paper":      # g/α = a + (1 − α)/α · c
            return 1.0, (1.0 - self.ALPHA) / self.ALPHA
        return None

    def _coefficients(self, a: Grads, c: Grads) -> tuple:
        al = self.ALPHA                                  # g = αa + (1 − α)c (eq. 11)
        g = _axpy([None if x is None else al * x for x in a], 1.0 - al, c)
        denom = _sqnorm(g) + self.defaults["rho"] / 4
        coef = _dot(a, g) / denom if denom > 0 else 0.0
        return coef * al, coef * (1.0 - al)


class DcaQuasiHalf(_QuasiDCA):
    """G3 = L'_{1/2} + ρ/2·L2 (paper 000, eq. 23): steps along a + c, the ResNet gradient."""

    ALPHA = 0.5


class DcaQuasiNegHalf(_QuasiDCA):
    """G4 = L'_{−1/2} + ρ/2·L2 (paper 000, eq. 26): the decomposition behind NegNet (eq. 27)."""

    ALPHA = -0.5
    DIRECTION = "line"


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
