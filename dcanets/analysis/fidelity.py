"""Direction fidelity: how close an optimizer's actual step is to the shortcut network's gradient.

Paper 000's claim is "DCA on a vanilla network = SGD on the shortcut network". This module
measures it for any optimizer and any model of the shortcut family with the probe of
``dcanets.engine.fidelity`` (the reference g_ref of the model's gradnet twin, the real step Δw,
cos(Δw, −g_ref) whole-net and per stage, and SGD's baseline cosine; that module says how):
one step on a trial basis (:func:`direction_fidelity`), several optimizers from one point
(:func:`compare_steps`), or every ``every`` steps of a training run (:func:`fidelity_over_training`).

Cost: :func:`direction_fidelity` is one reference forward/backward, one baseline forward/backward
(``baseline=False`` drops it) and one optimizer step on a trial basis (the weights, buffers and
optimizer state are restored afterwards). :func:`fidelity_over_training` measures the real
training steps every ``every`` steps, adding only the reference (and baseline) passes there.

CLI: ``dcanets fidelity --model cifar_plainnet56 --opt dcacounter --steps 20 --every 5``.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets._compat import wrapped_optimizers
from dcanets.engine.fidelity import (
    FidelityProbe,
    FidelityReport,
    Reference,
    optimizer_step,
    seeded,
    trainable_params,
)
from dcanets.hessian import FrozenBuffers
from dcanets.optim.rho import LossFn

OptimizerLike = Union[torch.optim.Optimizer, Callable[[nn.Module], torch.optim.Optimizer]]


@contextmanager
def trial_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Whatever happens inside (an optimizer step), the weights, gradients, buffers, optimizer state
    (momentum ...) and the optimizer's own attributes (a DCA optimizer's step count, reused β) are
    restored on exit."""
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    attrs = [(o, dict(vars(o))) for o in wrapped_optimizers(optimizer)]
    with FrozenBuffers(model):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w, g in zip(params, weights, grads):
                    p.copy_(w)
                    p.grad = g
            for o, saved in attrs:
                o.__dict__.clear()
                o.__dict__.update(saved)
            optimizer.load_state_dict(state)


def direction_fidelity(model: nn.Module, optimizer: OptimizerLike, inputs: torch.Tensor, targets: torch.Tensor,
                       reference: Reference = "gradnet", loss_fn: LossFn = F.cross_entropy, baseline: bool = True,
                       seed: Optional[int] = 0, create_graph: bool = False) -> FidelityReport:
    """cos(Δw, −g_ref) of one optimizer step at the model's current weights, on one batch.

    ``optimizer`` is an optimizer over ``model``'s parameters (its step is taken on a trial basis:
    weights, buffers and optimizer state are restored afterwards) or a factory ``model -> optimizer``
    (called on a copy of the model, which takes the step). The model is measured in train mode and
    left in the mode it had.
    """
    was_training = model.training
    if isinstance(optimizer, torch.optim.Optimizer):
        model.train()
        try:
            with trial_step(model, optimizer):
                return FidelityProbe(model, reference, loss_fn, baseline, seed, create_graph).measure(
                    optimizer, inputs, targets)
        finally:
            model.train(was_training)
    twin = copy.deepcopy(model).train()
    return FidelityProbe(twin, reference, loss_fn, baseline, seed, create_graph).measure(
        optimizer(twin), inputs, targets)


def compare_steps(model: nn.Module, optimizers: Mapping[str, Callable[[nn.Module], torch.optim.Optimizer]],
                  inputs: torch.Tensor, targets: torch.Tensor, reference: Reference = "gradnet",
                  loss_fn: LossFn = F.cross_entropy, seed: Optional[int] = 0) -> Dict[str, Union[FidelityReport, str]]:
    """cos(Δw, −g_ref) of one step of each optimizer from the model's current weights, on one batch.

    The reference and baseline passes run once for all of them (that is why this exists: a table
    of several optimizers at one point costs one g_ref, not one per optimizer); each factory gets
    its own copy of the model, so hooks an optimizer attaches never reach the next one, and the
    model itself is not changed. A step that raises ``ValueError`` (a refused β, a G not convex
    along the step) gives its one-line message instead of a report."""
    was_training = model.training
    probe = FidelityProbe(model.train(), reference, loss_fn, True, seed)
    try:
        pending = probe.begin(inputs, targets)
    finally:
        model.train(was_training)
    out: Dict[str, Union[FidelityReport, str]] = {}
    for name, factory in optimizers.items():
        twin = copy.deepcopy(model).train()
        optimizer = factory(twin)
        try:
            with seeded(seed, inputs.device):
                step_loss = optimizer_step(twin, optimizer, inputs, targets, loss_fn)
        except ValueError as exc:
            out[name] = str(exc).splitlines()[0]
            continue
        out[name] = probe.finish(pending, optimizer, step_loss=step_loss, after=trainable_params(twin)[1])
    return out


def fidelity_over_training(model: nn.Module, optimizer: torch.optim.Optimizer,
                           batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], every: int = 1,
                           reference: Reference = "gradnet", loss_fn: LossFn = F.cross_entropy,
                           baseline: bool = True, seed: Optional[int] = None,
                           callback: Optional[Callable[[FidelityReport], None]] = None,
                           create_graph: bool = False) -> List[FidelityReport]:
    """Train ``model`` on ``batches`` (one real step each, in train mode) and measure the step's
    fidelity at steps 0, every, 2·every, ...: the measured steps are the training steps themselves,
    so a measurement costs the reference (and baseline) forward/backward only. ``seed=None`` leaves
    the RNG to the training run; an integer seeds both passes of each measured step alike.
    ``create_graph``: backward with a graph, for second-order optimizers (timm's AdaHessian)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1; got {every!r}")
    model.train()
    probe = FidelityProbe(model, reference, loss_fn, baseline, seed, create_graph)
    reports: List[FidelityReport] = []
    for k, (x, y) in enumerate(batches):
        if k % every == 0:
            report = probe.measure(optimizer, x, y, step=k)
            reports.append(report)
            if callback is not None:
                callback(report)
        else:
            optimizer_step(model, optimizer, x, y, loss_fn, create_graph)
    return reports


__all__ = ["OptimizerLike", "trial_step", "direction_fidelity", "compare_steps", "fidelity_over_training"]
