"""What a training loop does with any optimizer, a DC decomposition or not: the four calls around
``timm.optim.create_optimizer_v2`` and the one training step.

``prepare(optimizer, model)`` once: it attaches the counter-loss hooks a decomposition needs and
says whether ``optimizer.step`` must be given a closure (a decomposition built on the parameters of
a model dcanets built has attached itself already: ``dcanets.builder.owning_model``). Most
configurations need none: their extra vector–Jacobian product runs inside the loop's own ``loss.backward()``
(``dcanets.optim.counter.ShortcutTap``). ``remember_batch`` before each step hands the batch to a
decomposition that measures curvature on it (without it, a closure-free step reads the batch off
the loop's own passes: ``dcanets.optim.batches``); ``take_step`` is the step itself, with or without a
closure (``dcanets.engine``, ``dcanets.analysis.fidelity`` and the benchmarks all step through it).
Every call sees through timm's Lookahead (``dcanets._compat.unwrap_optimizer``) and is a no-op, or
False, for an optimizer that is not a :class:`DCAOptimizer`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from dcanets._compat import unwrap_optimizer
from dcanets.optim._base import DCAOptimizer
from dcanets.optim.rho import Batch, LossFn

Closure = Callable[[], torch.Tensor]


def _decomposition(optimizer: torch.optim.Optimizer) -> Optional[DCAOptimizer]:
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, DCAOptimizer) else None


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
    inner = _decomposition(optimizer)
    if inner is None:
        return False
    inner.attach(unwrapped(model))
    return inner.needs_closure


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch's ``DistributedDataParallel`` wrapper (its ``module``), else ``model``:
    a decomposition hooks the model's own blocks and runs its extra passes on it, never through the
    wrapper (whose forward expects a backward that DDP synchronises), the model its parameters
    belong to, as ``dcanets.builder.owning_model`` finds it without ``prepare``."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def remember_batch(optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Optional[LossFn] = None) -> None:
    """Hand the coming step's batch to a decomposition that measures curvature on it
    (``rho="auto"``, or ρ > 0 without ``kappa``); a no-op for every other optimizer, so a loop
    may call it before every step. The loss is ``loss_fn(model(inputs), targets)``
    (default: cross-entropy). The step uses the batch once and forgets it."""
    inner = _decomposition(optimizer)
    if inner is not None and inner.takes_batch:
        inner.remember(Batch(inputs, targets, loss_fn or F.cross_entropy))


def measured_curvature(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """The last measured values behind ρ (``rho`` of ``rho="auto"``, ``lam_min_G``/``lam_min_H``,
    ``kappa``), each prefixed ``dca_``, for a training loop's metrics; {} when nothing is measured."""
    inner = _decomposition(optimizer)
    if inner is None or inner.curvature is None:
        return {}
    return {f"dca_{name}": value for name, value in inner.curvature.latest_values().items()}


def hooks_model(optimizer: torch.optim.Optimizer) -> bool:
    """True if ``prepare`` hooked the model for ``optimizer``: its hooks run on the eager
    modules, so a ``torch.compile``'d forward would bypass them (the step then raises)."""
    inner = _decomposition(optimizer)
    return inner is not None and inner.hooks_model


def take_step(optimizer: torch.optim.Optimizer, closure: Closure, needs_closure: bool,
              scaler: Optional[torch.amp.GradScaler] = None,
              before_step: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """One training step; returns the loss at w_k. ``closure`` zeroes the gradients, runs forward,
    loss and backward and returns the (detached) loss.

    ``needs_closure`` (what :func:`prepare` returned, or True to take a decomposition's closure
    path on purpose): ``optimizer.step(closure)``, which runs the closure as often as the step
    needs; an optimizer that returns no loss from it gets one more closure run for the loss.
    Otherwise the closure runs once, then ``optimizer.step()`` (``scaler.step`` and
    ``scaler.update`` when a ``GradScaler`` drives the step; the closure then backpropagates
    ``scaler.scale(loss)``). Between the backward and the step, a decomposition's
    ``gradients_ready()`` runs first (data parallel: what the backward measured besides ``p.grad``,
    eq. 17's c, averaged over the ranks as DDP averaged ``p.grad``), then ``before_step`` (gradient
    clipping, after the GradScaler's unscale), so both act on the global gradients; the closure path
    has no such point, so it refuses one.
    """
    if needs_closure:
        if before_step is not None:
            raise ValueError("before_step needs the plain step: a closure-stepped optimizer computes its "
                             "gradients inside optimizer.step(closure)")
        stepped: Any = optimizer.step(closure)  # type: ignore[arg-type]  # torch types closures as -> float
        return closure() if stepped is None else stepped
    with torch.enable_grad():
        loss = closure()
    inner = _decomposition(optimizer)
    if inner is not None:  # data parallel: what the backward measured besides p.grad made global
        inner.gradients_ready()
    if before_step is not None:  # after gradients_ready: clipping rescales the global c with the global gradient
        before_step()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss
