"""Decompositions G = Σ_α γ_α L'_α + μ·L2 of the loss, evaluated at more than one point.

The base of ``dcaprox`` and of the counter-loss families (``dcanets.optim.dcacounter``,
``dcanets.optim.dcaquasi``): the inexact DCA inner solver (:func:`inner_solve`), gradients of the
loss or of a counter loss L'_α at the current weights, and ``rho="auto"``, which measures ρ as a
Hessian eigenvalue on the batch handed over by ``remember_batch`` (``dcanets.optim.rho``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from dcanets.hessian import FrozenBuffers
from dcanets.optim._base import DCAOptimizer, Grads, axpy, check_option, normalise
from dcanets.optim.batches import BatchRecorder
from dcanets.optim.counter import CounterLoss
from dcanets.optim.rho import AUTO, Batch, CurvatureLog, Rho, check_measurement, check_rho, min_eigenvalue


@dataclass(frozen=True)
class ClosureOptions:
    """ρ (a Hessian eigenvalue, or ``"auto"``), the inner solver's steps and ``rho="auto"``'s schedule:
    re-measured every ``rho_every`` steps, ``rho_safety`` times the bound, ``rho_lanczos`` Lanczos steps."""

    rho: Rho = 0.0
    inner_steps: int = 3
    rho_every: int = 100
    rho_safety: float = 1.0
    rho_lanczos: int = 10

    def __post_init__(self) -> None:
        normalise(self, "rho", check_rho(self.rho))
        check_option("inner_steps", self.inner_steps, "an integer >= 1",
                     isinstance(self.inner_steps, int) and self.inner_steps >= 1)
        check_measurement(self.rho_every, self.rho_safety, self.rho_lanczos)
        normalise(self, "rho_safety", float(self.rho_safety))


@torch.no_grad()
def inner_solve(params: List[torch.Tensor], lrs: List[float], a0: Grads, gamma: Dict[float, float], mu: float,
                steps: int, grad_at: Callable[[float], Grads]) -> Grads:
    """Inexact DCA: ``steps`` gradient steps (size lr) on the convex subproblem
    S(w) = G(w) − ⟨∇H(w_k), w⟩, whose gradient is
    ∇S(w) = ∇L(w_k) + Σ_α γ_α (∇L'_α(w) − ∇L'_α(w_k)) + μ (w − w_k)   (H = G − L),
    ``grad_at(α)`` giving ∇L'_α at the parameters' current values. Returns d with
    w_K = w_k − lr·d; the parameters are back at w_k."""
    w0 = [p.detach().clone() for p in params]
    ref = {al: (a0 if al == 1.0 else grad_at(al)) for al in gamma}
    grad = a0                                           # ∇S(w_k) = ∇L(w_k)
    for j in range(steps):
        for p, g, lr in zip(params, grad, lrs):
            if g is not None:
                p.add_(g, alpha=-lr)
        if j == steps - 1:
            break
        grad = list(a0)
        for al, ga in gamma.items():
            cur = grad_at(al)
            grad = axpy(axpy(grad, ga, cur), -ga, ref[al])
        grad = [None if g is None else g.add(p - w, alpha=mu) for g, p, w in zip(grad, params, w0)]
    d = [(w - p) / lr for w, p, lr in zip(w0, params, lrs)]
    for p, w in zip(params, w0):
        p.copy_(w)
    return [None if a is None and (di == 0).all() else di for a, di in zip(a0, d)]


class ClosureDCA(DCAOptimizer):
    """Decompositions G = Σ_α γ_α L'_α + μ·L2, solved by evaluating the loss at more than one
    point (:func:`inner_solve`) unless a subclass forms its step from one backward.

    A family says what its G is with :meth:`gamma` (``{α: γ_α}``) and ``RHO_HESSIAN``.
    ρ is a Hessian eigenvalue, as in paper 000 (μ = ``RHO_HESSIAN``·ρ; footnote 2 compares ρ with
    λ = 1/lr). ``rho="auto"`` measures it (``dcanets.optim.rho``): every ``rho_every`` steps
    (the first included), ρ = ``rho_safety``·max over the parts that must be convex of
    max(0, −λ_min)/``RHO_HESSIAN``, λ_min from ``rho_lanczos`` Lanczos steps on exact
    Hessian–vector products of the batch handed over by ``remember_batch``. ``rho`` (the value
    in use) and ``rho_history`` report it."""

    RHO_HESSIAN = 1.0     # the Hessian of the ρ-term per unit ρ: G = L + ρ·L2 (the proximal point)
    Options = ClosureOptions
    options: ClosureOptions
    curvature: CurvatureLog
    _recorder: Optional[BatchRecorder] = None   # the loop's batch, when no remember_batch gives it (attach)

    def __init__(self, params: Any, lr: Optional[float] = None, lam: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, lam=lam, **kwargs)
        self.curvature = CurvatureLog(self.options.rho_every)
        self._rho = 0.0 if self.options.rho == AUTO else float(self.options.rho)

    def gamma(self) -> Dict[float, float]:
        """The decomposition's G without its ρ-term, as {α: γ_α} (G = Σ_α γ_α L'_α)."""
        raise NotImplementedError

    def convex_parts(self) -> Dict[str, Dict[float, float]]:
        """The parts whose convexity ρ must ensure, each as {α: γ_α} (the ρ-term left out)."""
        return {"G": self.gamma()}

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
        return self.options.rho == AUTO

    def attach(self, model: torch.nn.Module) -> None:
        """Remember the model and, when steps measure on a batch, record the loop's batches from
        its forward and backward (``dcanets.optim.batches``), for loops without ``remember_batch``."""
        if self.takes_batch and (self._recorder is None or self._recorder.model is not model):
            if self._recorder is not None:
                self._recorder.detach()
            self._recorder = BatchRecorder(model, self._params())
        super().attach(model)

    def _use_recorded_batch(self) -> None:
        """Closure-free steps: without ``remember_batch``, a measurement due at this step uses the
        batch of the loop's last forward and backward (``BatchRecorder``); none, or one whose loss
        does not fit, is the one-line error of ``_batch_or_fail``."""
        if self._batch is None and self._recorder is not None and self._batch_due() is not None:
            self._batch, self._no_batch_why = self._recorder.take()

    def _apply(self, directions: Grads) -> None:
        super()._apply(directions)
        self._no_batch_why = ""
        if self._recorder is not None:
            self._recorder.clear()                # the next step measures on its own batch

    def _mu(self) -> float:
        return self.RHO_HESSIAN * self.rho

    def _batch_due(self) -> Optional[str]:
        """What this step will measure on the remembered batch, if anything."""
        if self.options.rho == AUTO and self.curvature.due("rho", self._nsteps):
            return "rho='auto'"
        return None

    def _check_batch(self) -> None:
        """Fail before the step consumes anything (the recorded c, a closure run) if it needs a
        batch that ``remember_batch`` did not give: the loop can then give it and step again."""
        what = self._batch_due()
        if what is not None:
            self._batch_or_fail(what)

    _no_batch_why = ""    # why the recorder gave no batch at this step (the error names it)

    def _batch_or_fail(self, what: str) -> Batch:
        if self._batch is None:
            why = f" ({self._no_batch_why})" if self._no_batch_why else ""
            raise RuntimeError(
                f"{type(self).__name__}: {what} is measured on the current batch at this step{why}: call "
                "dcanets.optim.remember_batch(optimizer, inputs, targets[, loss_fn]) before step() "
                "(dcanets.engine does)")
        return self._batch

    @contextmanager
    def _measuring(self) -> Iterator[None]:
        """A measurement: forward passes with a graph, and the model's buffers restored only at its
        end (a restore between a forward and its backward would fail autograd's version check)."""
        recorder, was = self._recorder, self._recorder.suspended if self._recorder is not None else False
        if recorder is not None:
            recorder.suspended = True             # these forward passes are not the loop's
        try:
            with torch.enable_grad(), self._frozen_buffers():
                yield
        finally:
            if recorder is not None:
                recorder.suspended = was

    @contextmanager
    def _mixing(self, alpha: float) -> Iterator[None]:
        """Forward passes compute L'_α (only α = 1, the loss itself, without a counter loss)."""
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
        if self.options.rho != AUTO or not self.curvature.due("rho", self._nsteps):
            return
        batch, params = self._batch_or_fail("rho='auto'"), [p for p in self._params() if p.requires_grad]
        self._require_global("rho='auto' (the Hessian's lambda_min)")
        lams = {}
        for name, gamma in self.convex_parts().items():
            with self._measuring():
                lams[name] = min_eigenvalue(self._part_loss(batch, gamma), params, self.options.rho_lanczos,
                                            seed=self._nsteps,
                                            reduce=None if self.collective is None else self.collective.mean_)
        if not all(math.isfinite(lam) for lam in lams.values()):
            raise ValueError(f"{type(self).__name__}: rho='auto' measured lambda_min = {lams}, not finite (the "
                             "loss or its curvature overflowed on this batch); pass a number for rho")
        bound = max(max(0.0, -lam) for lam in lams.values()) / self.RHO_HESSIAN
        self._rho = self.options.rho_safety * bound
        self.curvature.record(self._nsteps, rho=self._rho, **{f"lam_min_{k}": v for k, v in lams.items()})

    def loss_gradients(self, closure: Callable, alpha: float) -> Grads:
        """Gradients of L'_α at the current weights (α = 1: the loss itself), the model's buffers
        left as they were."""
        with torch.enable_grad(), self._frozen_buffers():
            if alpha == 1.0:
                closure()
            else:
                self._counter_or_fail().evaluate(closure, alpha)
        return self._grads()

    def _counter_or_fail(self) -> CounterLoss:
        raise RuntimeError(f"{type(self).__name__} has no counter loss")

    def _frozen_buffers(self) -> FrozenBuffers:
        """Extra evaluations must not move BatchNorm running statistics."""
        return FrozenBuffers(self._model)

    def _inner_solve(self, closure: Callable, a0: Grads) -> Grads:
        """:func:`inner_solve` on this decomposition's G, the closure giving the gradients."""
        return inner_solve(self._params(), self._lrs(), a0, self.gamma(), self._mu(), self.options.inner_steps,
                           lambda alpha: self.loss_gradients(closure, alpha))

    def _first(self, closure: Callable) -> Tuple[Any, Grads]:
        """Evaluate the ordinary loss L at w_k; its gradient is a (eq. 17)."""
        with torch.enable_grad():
            loss = closure()
        return loss, self._grads()
