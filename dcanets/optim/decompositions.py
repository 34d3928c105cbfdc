"""Network-loss DC decompositions as torch optimizers (paper 000, §3–4), and ``prepare``.

dcal2 (eq. 9), dcaprox (proximal point), dcacounter (eq. 12/19), dcaquasihalf (eq. 23) and
dcaquasineghalf (eq. 26); registered into timm by the built-in ``decompositions`` plugin.

``prepare(optimizer, model)`` is the one call a training loop makes after
``timm.optim.create_optimizer_v2``: it attaches the counter-loss hooks the optimizer needs and
says whether ``optimizer.step`` must be given a closure. Most configurations need none: their
extra vector–Jacobian product runs inside the loop's own ``loss.backward()``
(``dcanets.optim.counter.ShortcutTap``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from dcanets.analysis.curvature import FrozenBuffers, directional_curvature, fd_step
from dcanets.optim.counter import CounterLoss, ShortcutTap
from dcanets.optim.rho import (
    AUTO,
    Batch,
    CurvatureLog,
    LossFn,
    Rho,
    check_measurement,
    check_rho,
    gauss_newton_curvature,
    min_eigenvalue,
)


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

    False: the ordinary loop works (``zero_grad``; forward; loss; ``loss.backward()``; ``step()``),
    the hooks attached here doing the extra work during the backward. True (``dcaprox``, and
    ``c="skip"``, ``solver="inner"`` or ``direction="newton"`` without ``kappa``): step with
    ``optimizer.step(closure)`` where ``closure`` zeroes the gradients, runs forward, loss and
    backward, and returns the loss, because the step evaluates the loss at other weights or with
    a block's output replaced (paper 000, eq. 10). Either way, ``rho="auto"`` and ρ > 0 without
    ``kappa`` measure curvature on the batch given by ``remember_batch`` before the step.
    """
    inner = _unwrap(optimizer)
    attach = getattr(inner, "attach", None)
    if callable(attach):
        attach(model)
    return bool(getattr(inner, "needs_closure", False))


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

    @property
    def needs_closure(self) -> bool:
        """Whether ``step`` must be given a closure (``closure_reason`` says why)."""
        return self.closure_reason() is not None

    def closure_reason(self) -> Optional[str]:
        """Why one backward's gradients are not enough for a step; None when they are."""
        return None

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
        self._nsteps = 0                          # steps taken (the schedules of beta_every, rho_every)
        self._batch: Optional[Batch] = None

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
                f"{type(self).__name__} needs a closure ({self.closure_reason()}): "
                "call optimizer.step(closure) with a closure that zeroes the gradients, runs forward, "
                "loss and backward and returns the loss (dcanets.optim.prepare returns True for it)")
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
        self._nsteps += 1
        self._batch = None                        # remember_batch hands over one step's batch

    def _lrs(self) -> List[float]:
        return [g["lr"] for g in self.param_groups for _ in g["params"]]


def _sqnorm(vs: Sequence[Optional[torch.Tensor]]) -> float:
    return float(sum((v.double() ** 2).sum() for v in vs if v is not None))


def _dot(us: Grads, vs: Grads) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(us, vs)
                     if u is not None and v is not None))


def _scale(xs: Grads, s: float) -> Grads:
    """s·x, a missing gradient staying missing."""
    return [None if x is None else (x if s == 1 else s * x) for x in xs]


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
    no ρ term, so it has no effect, and ``rho="auto"`` (a measurement for nothing) is refused.
    """

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: Rho = 0.0, **kwargs) -> None:
        if check_rho(rho) == AUTO:
            raise ValueError("dcal2 has no rho term (G1 = lam*L2, paper 000 eq. 9): rho='auto' would measure the "
                             "curvature for nothing; leave rho out")
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
    """Decompositions G = Σ_α γ_α L'_α + μ·L2, solved by evaluating the loss at more than one
    point (an inner solver) unless a subclass forms its step from one backward.

    ρ is a Hessian eigenvalue, as in paper 000 (μ = ``RHO_HESSIAN``·ρ; footnote 2 compares ρ with
    λ = 1/lr). ``rho="auto"`` measures it (``dcanets.optim.rho``): every ``rho_every`` steps
    (the first included), ρ = ``rho_safety``·max over the parts that must be convex of
    max(0, −λ_min)/``RHO_HESSIAN``, λ_min from ``rho_lanczos`` Lanczos steps on exact
    Hessian–vector products of the batch handed over by ``remember_batch``. ``rho`` (the value
    in use) and ``rho_history`` report it."""

    RHO_HESSIAN = 1.0     # the Hessian of the ρ-term per unit ρ: G = L + ρ·L2 (the proximal point)

    def closure_reason(self) -> Optional[str]:
        return "its inner solver evaluates the loss at inner_steps points"

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: Rho = 0.0, inner_steps: int = 3, rho_every: int = 100, rho_safety: float = 1.0,
                 rho_lanczos: int = 10, **kwargs) -> None:
        rho = check_rho(rho)
        _check("inner_steps", inner_steps, "an integer >= 1",
               isinstance(inner_steps, int) and inner_steps >= 1)
        check_measurement(rho_every, rho_safety, rho_lanczos)
        options = dict(kwargs.pop("options", None) or {}, rho=rho, inner_steps=inner_steps, rho_every=rho_every,
                       rho_safety=float(rho_safety), rho_lanczos=rho_lanczos)
        super().__init__(params, lr=lr, lam=lam, options=options, **kwargs)
        self.curvature = CurvatureLog(rho_every)
        self._rho = 0.0 if rho == AUTO else float(rho)

    @property
    def rho(self) -> float:
        """ρ in use: the fixed value, or the last measured one (``rho="auto"``)."""
        return self._rho

    @property
    def rho_history(self) -> List[Dict[str, float]]:
        """Every curvature measurement so far: ``{"step", "rho", "lam_min_G", ...}`` or ``{"step", "kappa"}``."""
        return self.curvature.history

    @property
    def takes_batch(self) -> bool:
        """Whether steps measure curvature on the batch given by ``remember_batch``."""
        return self.defaults["rho"] == AUTO

    def remember(self, batch: Batch) -> None:
        """The coming step's batch (used, and forgotten, by that step)."""
        self._batch = batch

    # the decomposition: {α: γ_α} and μ (overridden)
    def _gamma(self) -> Dict[float, float]:
        raise NotImplementedError

    def _mu(self) -> float:
        return self.RHO_HESSIAN * self.rho

    def _convex_parts(self) -> Dict[str, Dict[float, float]]:
        """The parts whose convexity ρ must ensure, each as {α: γ_α} (the ρ-term left out)."""
        return {"G": self._gamma()}

    def _batch_due(self) -> Optional[str]:
        """What this step will measure on the remembered batch, if anything."""
        if self.defaults["rho"] == AUTO and self.curvature.due("rho", self._nsteps):
            return "rho='auto'"
        return None

    def _check_batch(self) -> None:
        """Fail before the step consumes anything (the recorded c, a closure run) if it needs a
        batch that ``remember_batch`` did not give: the loop can then give it and step again."""
        what = self._batch_due()
        if what is not None:
            self._batch_or_fail(what)

    def _batch_or_fail(self, what: str) -> Batch:
        if self._batch is None:
            raise RuntimeError(
                f"{type(self).__name__}: {what} is measured on the current batch at this step: call "
                "dcanets.optim.decompositions.remember_batch(optimizer, inputs, targets[, loss_fn]) before step() "
                "(dcanets.engine does)")
        return self._batch

    @contextmanager
    def _measuring(self) -> Iterator[None]:
        """A measurement: forward passes with a graph, and the model's buffers restored only at its
        end (a restore between a forward and its backward would fail autograd's version check)."""
        with torch.enable_grad(), self._frozen_buffers():
            yield

    @contextmanager
    def _mixing(self, alpha: float) -> Iterator[None]:
        if alpha != 1.0:
            raise RuntimeError(f"{type(self).__name__} has no counter loss")
        yield

    def _part_loss(self, batch: Batch, gamma: Dict[float, float]) -> torch.Tensor:
        """Σ_α γ_α L'_α on the batch, with its graph (one forward per α; inside ``_measuring``)."""
        assert self._model is not None  # attach() ran: the step checked
        total: Optional[torch.Tensor] = None
        for alpha, weight in gamma.items():
            with self._mixing(alpha):
                term = weight * batch.loss_fn(self._model(batch.inputs), batch.targets)
            total = term if total is None else total + term
        assert total is not None  # every decomposition has at least one term
        return total

    def _update_rho(self) -> None:
        """``rho="auto"``: re-measure ρ when ``rho_every`` steps have passed (the first step included)."""
        if self.defaults["rho"] != AUTO or not self.curvature.due("rho", self._nsteps):
            return
        batch, params = self._batch_or_fail("rho='auto'"), [p for p in self._params() if p.requires_grad]
        lams = {}
        for name, gamma in self._convex_parts().items():
            with self._measuring():
                lams[name] = min_eigenvalue(self._part_loss(batch, gamma), params, self.defaults["rho_lanczos"],
                                            seed=self._nsteps)
        if not all(math.isfinite(lam) for lam in lams.values()):
            raise ValueError(f"{type(self).__name__}: rho='auto' measured lambda_min = {lams}, not finite (the "
                             "loss or its curvature overflowed on this batch); pass a number for rho")
        bound = max(max(0.0, -lam) for lam in lams.values()) / self.RHO_HESSIAN
        self._rho = self.defaults["rho_safety"] * bound
        self.curvature.record(self._nsteps, rho=self._rho, **{f"lam_min_{k}": v for k, v in lams.items()})

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
    of size lr (one step is SGD). ρ ≥ −λ_min(∇²L) makes G convex (what ``rho="auto"`` sets)."""

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: Rho = 1.0, inner_steps: int = 3, **kwargs) -> None:
        super().__init__(params, lr=lr, lam=lam, rho=rho, inner_steps=inner_steps, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {1.0: 1.0}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        closure = self._require_closure(closure)
        self._check_batch()
        self._update_rho()
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

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 rho: Rho = 0.0, solver: str = "newton", inner_steps: int = 3,
                 where: str = "last", c: str = "shortcut", beta_every: int = 1,
                 kappa: Optional[float] = None, **kwargs) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
        if kappa is not None:
            _check("kappa", kappa, "> 0 (the rank-one curvature factor of paper 000, eqs. 15, 22) or None",
                   isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and kappa > 0)
            if solver != "newton":
                raise ValueError("kappa is the curvature scale of the closed-form (solver='newton') steps only")
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
                       beta_every=beta_every, kappa=None if kappa is None else float(kappa))
        super().__init__(params, lr=lr, lam=lam, rho=rho, inner_steps=inner_steps,
                         options=options, **kwargs)
        self._counter: Optional[CounterLoss] = None
        self._tap: Optional[ShortcutTap] = None
        self._coef: Optional[Tuple[float, float]] = None

    def closure_reason(self) -> Optional[str]:
        if self.defaults["solver"] == "inner":
            return "solver='inner' evaluates the counter loss at every inner step"
        if self.defaults["c"] == "skip":
            return "c='skip' evaluates the loss again with the last block's output mixed"
        return None

    @property
    def takes_batch(self) -> bool:
        return super().takes_batch or self._measures_kappa()

    def _batch_due(self) -> Optional[str]:
        what = super()._batch_due()
        if what is None and self._measures_kappa() and self.curvature.due("kappa", self._nsteps) \
                and self._reused_coefficients() is None:
            what = "kappa (rho > 0 without kappa=...)"
        return what

    def _uses_kappa(self) -> bool:
        """Whether this configuration's coefficient turns ρ into gradient units with κ."""
        return self.defaults["solver"] == "newton"

    def _measures_kappa(self) -> bool:
        return self._uses_kappa() and self.defaults["kappa"] is None and self.defaults["rho"] != 0

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the model's same-shape blocks (idempotent for the same model); without a closure
        the step needs the ``ShortcutTap`` too."""
        if self._counter is not None and self._counter.model is model:
            return
        for hooks in (self._tap, self._counter):
            if hooks is not None:
                hooks.detach()
        self._counter = CounterLoss(model, self.defaults["where"])
        self._tap = None if self.needs_closure else ShortcutTap(self._counter, self._params(), self._fused_ratio)
        super().attach(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the c recorded with them."""
        super().zero_grad(set_to_none)
        if self._tap is not None:
            self._tap.clear()

    def _counter_or_fail(self) -> CounterLoss:
        if self._counter is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model: call "
                               "dcanets.optim.decompositions.prepare(optimizer, model) first")
        return self._counter

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Without a closure: the step from the last ``loss.backward()`` (``ShortcutTap``). With one:
        the closure is run as many times as the step needs (hooks of the plain path paused)."""
        if closure is None:
            if self.needs_closure:
                self._require_closure(None)
            self._check_batch()
            return self._plain_step(self._counter_or_fail())
        counter = self._counter_or_fail()
        self._check_batch()
        with self._tap_paused():
            self._learn_blocks(closure, counter)
            self._update_rho()
            if self.defaults["solver"] == "newton" and self.defaults["c"] == "shortcut":
                return self._shortcut_step(closure, counter)
            loss, a = self._first(closure)
            counter.observe()
            inner = self.defaults["solver"] == "inner"
            d = self._inner_solve(closure, a) if inner else self._skip_direction(closure, a)
        self._restore_grads(a)
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

    def _skip_direction(self, closure: Callable, a: Grads) -> Grads:
        """The Newton direction with c="skip" (the counter loss re-evaluated by the closure)."""
        raise NotImplementedError

    # -- c = "shortcut": coefficients and the two ways to get a and c ----------------------------
    def _coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        """(s_a, s_c) of the direction d = s_a·a + s_c·c (and set ``self.diagnostics``)."""
        raise NotImplementedError

    def _constant_coefficients(self) -> Optional[Tuple[float, float]]:
        return None

    def _constant_diagnostics(self) -> Dict[str, float]:
        return {}

    def _reused_coefficients(self) -> Optional[Tuple[float, float]]:
        """(s_a, s_c) known before this step's backward (constant, or kept for ``beta_every``
        steps); None when this step computes them from its a and c."""
        coef = self._constant_coefficients()
        if coef is None and self._coef is not None and self._nsteps % self.defaults["beta_every"] != 0:
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
        self._coef = self._coefficients(a, c, closure)
        return _axpy(_scale(a, self._coef[0]), self._coef[1], c)

    def _finish(self, d: Grads, grads: Grads, coef: Tuple[float, float], refreshed: bool) -> None:
        """Diagnostics, step count, ``p.grad`` (a, or d on fused steps) and the update."""
        if not refreshed and self._constant_coefficients() is not None:
            self.diagnostics = self._constant_diagnostics()
        # on reused steps the diagnostics of the step that set the coefficients stay
        self.diagnostics.update({"s_a": coef[0], "s_c": coef[1], "refreshed": refreshed})
        self._restore_grads(grads)
        self._apply(d)

    def _plain_step(self, counter: CounterLoss) -> None:
        """The step from what ``ShortcutTap`` recorded during the loop's ``loss.backward()``:
        p.grad = a and c apart, or p.grad = a + r·c after a fused backward."""
        tap = self._tap
        assert tap is not None  # made by attach whenever no closure is needed
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
        if counter._probing:
            with torch.enable_grad(), self._frozen_buffers():
                closure()
            counter.observe()

    def _kappa(self, direction: Grads, alpha: float) -> float:
        """κ of the rank-one model ∂²L'_α ≈ κ·u uᵀ along the model's direction u (eqs. 15, 22,
        25): ``kappa``, or the Gauss–Newton curvature of L'_α along u over ‖u‖², measured every
        ``rho_every`` steps on the remembered batch (``dcanets.optim.rho.gauss_newton_curvature``)."""
        kappa = self.defaults["kappa"]
        if kappa is not None:
            return kappa
        if self.curvature.due("kappa", self._nsteps):
            batch = self._batch_or_fail("kappa")
            assert self._model is not None  # attach() ran: the step checked
            with self._measuring():
                with self._mixing(alpha):
                    outputs = self._model(batch.inputs)
                curv = gauss_newton_curvature(outputs, batch.targets, batch.loss_fn, self._params(), direction)
            if not curv > 0:
                raise ValueError(
                    f"{type(self).__name__}: the Gauss-Newton curvature of L'_{alpha:g} along the step's direction is "
                    f"{curv:.3g}, not > 0, so it gives no kappa to put rho in Hessian units: pass kappa=..., or rho=0")
            self.curvature.record(self._nsteps, kappa=curv / _sqnorm(direction))
        kappa = self.curvature.latest("kappa")
        assert kappa is not None  # recorded above on the first call
        return kappa

    def _ridge(self, direction: Grads, alpha: float) -> float:
        """ρ/(2κ): ρ (Hessian units) in the squared-gradient units of a closed-form coefficient
        (docs/decompositions.md, "ρ in the paper's units"); 0 when ρ = 0 or u = 0."""
        if self.rho == 0 or _sqnorm(direction) == 0:
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
            a = _axpy(post, 1.0, list(trunk_a))
            d = self._new_direction(a, c, closure)
            assert self._coef is not None  # set by _new_direction
            self._finish(d, a, self._coef, refreshed=True)
        else:
            s_a, s_c = coef
            with torch.enable_grad():
                trunk = torch.autograd.grad(h, params, s_a * g_in + s_c * g_out, allow_unused=True)
            d = _axpy(_scale(post, s_a), 1.0, list(trunk))
            self._finish(d, d, coef, refreshed=False)
        return loss


class DcaCounter(_CounterDCA):
    """G2 = L + ½L'_{−1} + ρ/2·L2, H2 = ½L'_{−1} + ρ/2·L2 (paper 000, eq. 12).

    solver="newton": one Newton step on the subproblem (eq. 14) with a ⊥ c gives eq. 19,
    d = a + β·c, with a = ∇L and c from ``c`` (default "shortcut", eq. 17's c; see
    ``_CounterDCA``). In these gradient units eq. 19 reads β = ‖a‖²/(2‖c‖² + ρ/(2κ)): the paper's
    a, c (eq. 17, MSE) are ours times √(κ/2), so its ρ/4 is our ρ/(2κ) and ρ stays a Hessian
    eigenvalue (docs/decompositions.md). solver="inner": K gradient steps on the subproblem (no c).
    ``rho="auto"`` makes both G2 and H2 convex at w_k.

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

    def _convex_parts(self) -> Dict[str, Dict[float, float]]:
        return {"G": self._gamma(), "H": {-1.0: 0.5}}     # a DC decomposition: both convex (eq. 12)

    def _beta(self, a: Grads, c: Grads) -> float:
        """β of paper 000, eq. 19 with ρ in Hessian units, checked against ``beta_max``."""
        self.diagnostics = {}
        a2, c2 = _sqnorm(a), _sqnorm(c)
        denom = 2 * c2 + self._ridge(a, 1.0)                      # κ along a, in L's Hessian
        beta = a2 / denom if denom > 0 else 0.0                   # paper 000, eq. 19
        ratio = (c2 / a2) ** 0.5 if a2 > 0 else 0.0
        self.diagnostics.update({"beta_eq19": beta, "c_over_a": ratio})
        bmax = self.defaults["beta_max"]
        if beta > bmax:
            if self.defaults["beta_policy"] == "raise":
                raise ValueError(
                    f"dcacounter: beta = |a|^2/(2|c|^2 + rho/(2 kappa)) = {beta:.3g} exceeds beta_max = {bmax:g} "
                    f"(|c|/|a| = {ratio:.3g}, so beta*c would be {beta * ratio:.3g}x the gradient a): "
                    "raise rho, or pass beta_policy='clamp' or a larger beta_max")
            beta = bmax
        self.diagnostics["beta"] = beta
        return beta

    def _skip_direction(self, closure: Callable, a: Grads) -> Grads:
        c = self._eval(closure, 0.0)                                # c = ∇L'_0 (not eq. 17's c)
        return _axpy(a, self._beta(a, c), c)

    def _coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        return 1.0, self._beta(a, c)


class _QuasiDCA(_CounterDCA):
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
    DIRECTION = "paper"
    DIRECTIONS = ("paper", "projection", "newton")
    ALIASES = {"line": "projection"}    # the old name of "projection"

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 direction: Optional[str] = None, kappa: Optional[float] = None, fd_eps: float = 1e-3,
                 **kwargs) -> None:
        direction = self.DIRECTION if direction is None else self.ALIASES.get(direction, direction)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(self.DIRECTIONS)}; got {direction!r}")
        if kappa is not None and direction == "paper":
            raise ValueError("kappa is the curvature scale of direction='newton' and 'projection' only")
        if kwargs.get("rho") == AUTO and direction == "paper" and kwargs.get("solver", "newton") == "newton":
            raise ValueError("rho='auto' would measure the curvature for nothing: direction='paper' (t = 1/alpha) "
                             "has no rho; use direction='projection' or 'newton', or leave rho out")
        _check("fd_eps", fd_eps, "> 0", fd_eps > 0)
        options = dict(kwargs.pop("options", None) or {}, direction=direction, fd_eps=float(fd_eps))
        super().__init__(params, lr=lr, lam=lam, kappa=kappa, options=options, **kwargs)

    def _gamma(self) -> Dict[float, float]:
        return {self.ALPHA: 1.0}

    def _uses_kappa(self) -> bool:
        return super()._uses_kappa() and self.defaults["direction"] == "projection"

    def closure_reason(self) -> Optional[str]:
        reason = super().closure_reason()
        if reason is None and self.defaults["direction"] == "newton" and self.defaults["kappa"] is None:
            reason = "direction='newton' without kappa measures the curvature at w +- eps*g"
        return reason

    def _curvature(self, closure: Optional[Callable], g: Grads, g2: float) -> float:
        """gᵀ∂²L'_α g: eq. 25's κ‖g‖⁴, or a central difference of ∇L'_α along g."""
        kappa = self.defaults["kappa"]
        if kappa is not None:
            return kappa * g2 * g2
        assert closure is not None  # closure_reason() demands one for this configuration
        params = self._params()
        eps = fd_step(params, self.defaults["fd_eps"])
        return directional_curvature(lambda: self._eval(closure, self.ALPHA), params, g, eps) * g2

    def _line(self, closure: Optional[Callable], a: Grads, g: Grads) -> float:
        """t of d = t·g for ``direction`` (see the class docstring)."""
        kind, rho = self.defaults["direction"], self.rho
        if kind == "paper":
            t = 1.0 / self.ALPHA
            self.diagnostics = {"coef": t}
            return t
        g2, ag = _sqnorm(g), _dot(a, g)
        if kind == "projection":
            self.diagnostics = {}
            denom = g2 + self._ridge(g, self.ALPHA)
            t = ag / denom if denom > 0 else 0.0
            self.diagnostics["coef"] = t
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

    def _constant_coefficients(self) -> Optional[Tuple[float, float]]:
        if self.defaults["direction"] == "paper":      # g/α = a + (1 − α)/α · c
            return 1.0, (1.0 - self.ALPHA) / self.ALPHA
        return None

    def _constant_diagnostics(self) -> Dict[str, float]:
        return {"coef": 1.0 / self.ALPHA}

    def _coefficients(self, a: Grads, c: Grads, closure: Optional[Callable]) -> Tuple[float, float]:
        al = self.ALPHA                                  # g = αa + (1 − α)c (eq. 25)
        g = _axpy(_scale(a, al), 1.0 - al, c)
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


def remember_batch(optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Optional[LossFn] = None) -> None:
    """Hand the coming step's batch to a decomposition that measures curvature on it
    (``rho="auto"``, or ρ > 0 without ``kappa``); a no-op for every other optimizer, so a loop
    may call it before every step. The loss is ``loss_fn(model(inputs), targets)``
    (default: cross-entropy). The step uses the batch once and forgets it."""
    import torch.nn.functional as F

    inner = _unwrap(optimizer)
    if getattr(inner, "takes_batch", False):
        inner.remember(Batch(inputs, targets, loss_fn or F.cross_entropy))  # type: ignore[attr-defined]


def measured_curvature(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """The last measured values behind ρ (``rho`` of ``rho="auto"``, ``lam_min_G``/``lam_min_H``,
    ``kappa``), each prefixed ``dca_``, for a training loop's metrics; {} when nothing is measured."""
    log = getattr(_unwrap(optimizer), "curvature", None)
    if not isinstance(log, CurvatureLog):
        return {}
    return {f"dca_{name}": value for name, value in log.latest_values().items()}


def hooks_model(optimizer: torch.optim.Optimizer) -> bool:
    """True if ``prepare`` hooked the model for ``optimizer``: its hooks run on the eager
    modules, so a ``torch.compile``'d forward would bypass them (the step then raises)."""
    return getattr(_unwrap(optimizer), "_counter", None) is not None
