"""The DC decompositions under data parallelism: every quantity a step measures on the batch is
made global the way DDP makes the gradient global.

torch's DistributedDataParallel averages ``p.grad`` over the ranks during ``loss.backward()``: with
equal per-rank batches that is the gradient of the mean loss over the global batch (the ranks'
batches concatenated). A decomposition's step measures more than the gradient on the batch, and
each of those measurements is linear in the loss, so it becomes the global batch's by the same
average:

- eq. 17's c (paper 000), the extra vector–Jacobian product the loop's own backward runs
  (``dcanets.optim.counter.ShortcutTap``): averaged once the backward is done
  (:meth:`DCAOptimizer.gradients_ready`, called by ``dcanets.optim.protocol.take_step``);
- the Gauss–Newton curvature behind κ (ρ > 0 without ``kappa``): one scalar, averaged;
- ``rho="auto"``: every Hessian–vector product of the Lanczos run, averaged, so every rank runs the
  same Lanczos on the global batch's Hessian.

Eq. 19's β and the quasi-DC line coefficients are then norms and dots of global vectors: every
rank computes the same step, which is the single-process step on the concatenated batch (up to
the order of floating-point sums). Configurations stepped with a closure (``dcaprox``, ``c="skip"``,
``solver="inner"``, ``direction="newton"`` without ``kappa``) evaluate the loss again at other
weights or with a block's output replaced, passes DDP does not synchronise: they are refused.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dcanets._compat import unwrap_optimizer
from dcanets.optim._base import DCAOptimizer
from dcanets.optim.collective import Collective


def data_parallel(optimizer: torch.optim.Optimizer, group: Optional[Any] = None) -> None:
    """Make a decomposition's steps global over ``group`` (the ranks of the model's DDP wrapper);
    a no-op for an optimizer that is not a :class:`DCAOptimizer` (DDP's gradient is all it uses).

    Call it once, after ``dcanets.optim.prepare``. A configuration that needs a closure is refused
    with one line that says why (see the module docstring)."""
    check_data_parallel(optimizer)
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, DCAOptimizer):
        inner.collective = Collective(group)


def check_data_parallel(optimizer: torch.optim.Optimizer) -> None:
    """One line when ``optimizer`` cannot step under DDP (it needs a closure; see the module
    docstring); needs no process group, so a launcher can ask before it starts any process."""
    inner = unwrap_optimizer(optimizer)
    reason = inner.closure_reason() if isinstance(inner, DCAOptimizer) else None
    if reason is not None:
        raise ValueError(
            f"{type(inner).__name__} steps with a closure here ({reason}), which evaluates the loss again outside "
            "the backward pass DDP synchronises, so the ranks' steps would differ: train it in one process, or "
            "choose a configuration without a closure (dcacounter/dcaquasi* with c='shortcut' and solver='newton')")


def measures_curvature(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the steps differentiate the loss twice on the batch (``rho="auto"``, or ρ > 0
    without ``kappa``): what a layer without a second derivative (SyncBatchNorm) cannot serve."""
    inner = unwrap_optimizer(optimizer)
    return isinstance(inner, DCAOptimizer) and inner.takes_batch


__all__ = ["Collective", "check_data_parallel", "data_parallel", "measures_curvature"]
