"""Means over the ranks of a ``torch.distributed`` process group, for the data-parallel steps of
the decompositions (``dcanets.optim.distributed``): per-parameter vectors, tensors and scalars."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

Grads = List[Optional[torch.Tensor]]


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


def unsynced_ranks(collective: Optional[Collective]) -> int:
    """The ranks of the default process group when it has several and ``collective`` is None (a
    decomposition not made data parallel), else 0."""
    if collective is not None:
        return 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size()
    return 0


__all__ = ["Collective", "unsynced_ranks"]
