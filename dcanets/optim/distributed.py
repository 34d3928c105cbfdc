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

from typing import Any, Dict, List, Optional

import torch

from dcanets._compat import unwrap_optimizer
from dcanets.optim._base import DCAOptimizer, Grads


class Collective:
    """Means over the ranks of a ``torch.distributed`` process group (default: the whole world)."""

    def __init__(self, group: Optional[Any] = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.world_size = dist.get_world_size(group)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` replaced, in place, by its mean over the ranks (and returned)."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.div_(self.world_size)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of ``tensor`` (a new tensor: a caller's vector is not touched)."""
        return self.mean_(tensor.detach().clone())

    def mean_scalar(self, value: float) -> float:
        return float(self.mean_(torch.tensor([value], dtype=torch.float64, device=self._device()))[0])

    def mean_grads(self, vectors: Grads) -> Grads:
        """Per-parameter vectors averaged over the ranks, one all-reduce per dtype and device (a
        missing entry stays missing: which ones are missing is the model's structure, the same on
        every rank)."""
        buckets: Dict[tuple, List[int]] = {}
        for i, v in enumerate(vectors):
            if v is not None:
                buckets.setdefault((v.dtype, v.device), []).append(i)
        out: Grads = list(vectors)
        for index in buckets.values():
            flat = self.mean_(torch.cat([vectors[i].detach().reshape(-1) for i in index]))  # type: ignore[union-attr]
            pieces = torch.split(flat, [vectors[i].numel() for i in index])  # type: ignore[union-attr]
            for i, piece in zip(index, pieces):
                out[i] = piece.view_as(vectors[i])  # type: ignore[arg-type]
        return out

    def _device(self) -> torch.device:
        """Where this group's backend reduces: NCCL only reduces CUDA tensors."""
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def data_parallel(optimizer: torch.optim.Optimizer, group: Optional[Any] = None) -> None:
    """Make a decomposition's steps global over ``group`` (the ranks of the model's DDP wrapper);
    a no-op for an optimizer that is not a :class:`DCAOptimizer` (DDP's gradient is all it uses).

    Call it once, after ``dcanets.optim.prepare``. A configuration that needs a closure is refused
    with one line that says why (see the module docstring)."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, DCAOptimizer):
        return
    reason = inner.closure_reason()
    if reason is not None:
        raise ValueError(
            f"{type(inner).__name__} steps with a closure here ({reason}), which evaluates the loss again outside "
            "the backward pass DDP synchronises, so the ranks' steps would differ: train it in one process, or "
            "choose a configuration without a closure (dcacounter/dcaquasi* with c='shortcut' and solver='newton')")
    inner.collective = Collective(group)


__all__ = ["Collective", "data_parallel"]
