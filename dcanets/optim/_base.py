"""What every DC decomposition shares: the conventions, vector algebra on per-parameter gradient
lists, torch.optim.SGD's update rule applied to a direction d, and the thin base class.

Conventions (kept by every family): L2(w) = ½‖w‖², so a term "μ·L2" has Hessian μ·I. Every
decomposition moves the weights to the DCA point w_{k+1} = w_k − lr·d. ``lr`` is the step size 1/λ
of the strongly convex part of G (G1 = λ·L2 gives exactly SGD with lr = 1/λ, paper 000, eq. 9);
``lam`` is another way to say the same thing (lr = 1/lam). ``weight_decay`` adds wd·w to d,
momentum/dampening/nesterov act on d, both exactly as torch.optim.SGD does on the gradient.

A family's own options (ρ, the solver, c, β's guard, the quasi direction ...) are a frozen
dataclass, ``Options`` on the class, checked once when the optimizer is built; the per-group
hyperparameters above stay in ``param_groups``, where timm's factory and the lr schedulers set them.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence

import torch

from dcanets.builder import owning_model
from dcanets.optim.collective import Collective, unsynced_ranks
from dcanets.optim.rho import Batch, CurvatureLog

Grads = List[Optional[torch.Tensor]]


def check_option(name: str, value: Any, allowed: str, ok: bool) -> None:
    """A one-line ValueError naming the option, what it must be and what it got."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def resolve_lr(lr: Optional[float], lam: Optional[float]) -> float:
    """The step size: ``lr`` or ``1/lam`` (paper 000, eq. 9: G1 = λ·L2 gives lr = 1/λ)."""
    if lam is not None:
        check_option("lam", lam, "> 0 (the L2 weight λ of G1 = λ·L2; lr = 1/λ)", lam > 0)
        if lr is not None and abs(lr * lam - 1.0) > 1e-9:
            raise ValueError(f"lr and lam set the same step (lr = 1/lam); got lr={lr} and lam={lam}: "
                             "give one of them, or consistent values")
        return 1.0 / lam
    if lr is None:
        raise ValueError("give lr (> 0) or lam (> 0, lr = 1/lam)")
    check_option("lr", lr, "> 0", lr > 0)
    return float(lr)


def normalise(options: Any, name: str, value: Any) -> None:
    """Store a checked, normalised value in a frozen options record (from its ``__post_init__``)."""
    object.__setattr__(options, name, value)


# -- vector algebra on per-parameter lists (None: a parameter without a gradient) -----------------

def total_sqnorm(vs: Sequence[Optional[torch.Tensor]]) -> float:
    """‖v‖² over every tensor, in float64."""
    return float(sum((v.double() ** 2).sum() for v in vs if v is not None))


def total_dot(us: Grads, vs: Grads) -> float:
    """⟨u, v⟩ over every pair of tensors, in float64 (a missing one counts as zero)."""
    return float(sum((u.double() * v.double()).sum() for u, v in zip(us, vs)
                     if u is not None and v is not None))


def scaled(xs: Grads, s: float) -> Grads:
    """s·x, a missing gradient staying missing."""
    return [None if x is None else (x if s == 1 else s * x) for x in xs]


def axpy(xs: Grads, beta: float, ys: Grads) -> Grads:
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


def grads_of(params: Sequence[torch.Tensor]) -> Grads:
    """Copies of the parameters' ``.grad`` (None where there is none)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def restore_grads(params: Sequence[torch.Tensor], grads: Grads) -> None:
    """Leave ``grads`` in ``p.grad`` (∇L(w_k), as after an ordinary backward pass, or a fused d)."""
    for p, g in zip(params, grads):
        p.grad = g


@torch.no_grad()
def sgd_update(param_groups: List[Dict[str, Any]], state: Dict[Any, Dict[str, Any]], directions: Grads) -> None:
    """w ← w − lr·d per group, with d + wd·w and momentum on d exactly as torch.optim.SGD does on
    the gradient (``directions`` in the order of the groups' parameters)."""
    i = 0
    for group in param_groups:
        m, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
        for p in group["params"]:
            d, i = directions[i], i + 1
            if d is None:
                continue
            if wd != 0:
                d = d.add(p, alpha=wd)
            if m != 0:
                pstate = state[p]
                buf = pstate.get("momentum_buffer")
                if buf is None:
                    buf = pstate["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(m).add_(d, alpha=1 - damp)
                d = d.add(buf, alpha=m) if group["nesterov"] else buf
            p.add_(d, alpha=-group["lr"])


class DCAOptimizer(torch.optim.Optimizer):
    """Parameter groups with SGD's hyperparameters, the family's ``Options``, and what
    ``dcanets.optim.protocol`` asks of a decomposition (``attach``, ``needs_closure``, ``remember``,
    ``curvature``, ``hooks_model``). A decomposition from a plugin subclasses it."""

    Options: ClassVar[type]
    options: Any
    curvature: Optional[CurvatureLog] = None      # what the steps measured for ρ (None: nothing)
    collective: Optional[Collective] = None     # the data-parallel ranks (dcanets.optim.distributed)

    def __init__(self, params: Iterable, lr: Optional[float] = None, lam: Optional[float] = None,
                 weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, **options: Any) -> None:
        self.options = self.Options(**options)     # a misspelt option is a TypeError naming it
        lr = resolve_lr(lr, lam)
        check_option("weight_decay", weight_decay, ">= 0", weight_decay >= 0)
        check_option("momentum", momentum, "in [0, 1)", 0 <= momentum < 1)
        check_option("dampening", dampening, "in [0, 1]", 0 <= dampening <= 1)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults)
        self._model: Optional[torch.nn.Module] = None
        self.diagnostics: Dict[str, float] = {}   # last step's β (eq. 19) or line coefficient
        self._nsteps = 0                          # steps taken (the schedules of beta_every, rho_every)
        self._batch: Optional[Batch] = None
        # A model dcanets built is known (dcanets.builder): attach now, before the loop's first
        # forward, so that any loop works without prepare(). Subclasses keep what attach() sets
        # as class-level defaults, since this runs before their own __init__ body.
        owner = owning_model(self._params())
        if owner is not None:
            self.attach(owner)

    # -- the protocol (dcanets.optim.protocol) ---------------------------------------------------
    @property
    def needs_closure(self) -> bool:
        """Whether ``step`` must be given a closure (``closure_reason`` says why)."""
        return self.closure_reason() is not None

    def closure_reason(self) -> Optional[str]:
        """Why one backward's gradients are not enough for a step; None when they are."""
        return None

    @property
    def takes_batch(self) -> bool:
        """Whether steps measure curvature on the batch given by ``remember_batch``."""
        return False

    @property
    def hooks_model(self) -> bool:
        """Whether ``attach`` put hooks on the model's modules (a compiled forward bypasses them)."""
        return False

    @property
    def num_steps(self) -> int:
        """Steps taken so far (the clock of ``beta_every`` and ``rho_every``)."""
        return self._nsteps

    def gradients_ready(self) -> None:
        """The loop's backward is done and DDP has averaged ``p.grad``; nothing has unscaled or
        clipped them yet. A data-parallel decomposition averages here what that backward measured
        besides the gradient (eq. 17's c); ``dcanets.optim.protocol.take_step`` calls it."""

    def _global(self, value: float) -> float:
        """A measurement on this rank's batch as the global batch's (its mean over the ranks)."""
        self._require_global("the curvature behind kappa")
        return value if self.collective is None else self.collective.mean_scalar(value)

    def _require_global(self, what: str) -> None:
        """One line when a process group of several ranks steps this decomposition without
        :func:`dcanets.optim.distributed.data_parallel`: ``what``, measured on this rank's batch
        alone, would differ between the ranks, and so would their weights (DDP averages ``p.grad``
        only). A loop that calls ``optimizer.step()`` itself under torchrun (timm's train.py) is
        such a loop."""
        ranks = unsynced_ranks(self.collective)
        if ranks:
            raise ValueError(f"{type(self).__name__}: {what} is measured on this rank's batch, but {ranks} "
                             "data-parallel ranks share each step: call dcanets.optim.distributed.data_parallel("
                             "optimizer) after prepare() and step with dcanets.optim.take_step (dcanets train --nproc "
                             "N does both); in a loop that cannot (timm's train.py under torchrun), use an optimizer "
                             "that measures nothing on the batch (sgd, dcal2)")

    def attach(self, model: torch.nn.Module) -> None:
        """Remember the model (its buffers are frozen during extra loss evaluations)."""
        self._model = model

    def remember(self, batch: Batch) -> None:
        """The coming step's batch (used, and forgotten, by that step)."""
        self._batch = batch

    # -- helpers of the steps --------------------------------------------------------------------
    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _grads(self) -> Grads:
        return grads_of(self._params())

    def _lrs(self) -> List[float]:
        return [g["lr"] for g in self.param_groups for _ in g["params"]]

    def _require_closure(self, closure: Optional[Callable]) -> Callable:
        if closure is None:
            raise ValueError(
                f"{type(self).__name__} needs a closure ({self.closure_reason()}): "
                "call optimizer.step(closure) with a closure that zeroes the gradients, runs forward, "
                "loss and backward and returns the loss (optimizer.needs_closure says so); a loop that calls "
                f"step() without one, like timm's train.py, needs {self.closure_free_hint()}")
        return closure

    def closure_free_hint(self) -> str:
        """What to use instead in a loop that cannot give a closure (the end of the one-line error)."""
        return "a configuration that needs none (docs/decompositions.md lists them)"

    def _apply(self, directions: Grads) -> None:
        """w ← w − lr·d (:func:`sgd_update`), and the step is counted."""
        sgd_update(self.param_groups, self.state, directions)
        self._nsteps += 1
        self._batch = None                        # remember_batch hands over one step's batch
