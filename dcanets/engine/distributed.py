"""Data-parallel training: one code path for one process or N.

Who starts the processes does not matter to the engine: ``torchrun`` (``dcanets train --nproc N``,
``torchrun -m dcanets train``) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous
variables, and :func:`join` starts the process group from them (gloo on CPU, NCCL on CUDA); Ray
Train (a search trial's gang, ``dcanets.tune.gang``) has started it already, and it is used as is.
Without either, the world is one process and nothing below changes the run.

The rules every rank follows (torch DDP's, as timm's train.py uses them):

- the global batch is ``batch_size × world_size``: each rank takes its slice of every global batch
  of the one-process order (:func:`rank_order`), so a run's batches, and with them its resume, do not
  depend on how many processes share them (any world size that divides the global batch);
- the model is wrapped in ``DistributedDataParallel`` (gradients averaged during the backward),
  after ``sync_bn`` turned its BatchNorm layers into ``SyncBatchNorm`` (CUDA only, as torch's);
- the lr is the step size of the global batch, as given: nothing scales it with the world size;
- metrics are sums over every rank's images (:func:`totals`); rank 0 alone writes files
  (:func:`is_main_process` is the guard to reuse: checkpoints, metrics.json, MLflow).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks; ``grouped`` when a process group joins
    them (then the model is DDP's even for one rank: a one-GPU NCCL group runs the code of N)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    grouped: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.grouped


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"${name} must be an integer (torchrun sets it), got {os.environ[name]!r}") from None


def launched() -> bool:
    """Whether this process is one of several ranks (a process group, or torchrun's variables)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_int("WORLD_SIZE", 1) > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (before the group starts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def current() -> World:
    """The world as it stands (one process when there is no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), grouped=True)


def is_main_process() -> bool:
    """True in rank 0, or when there is one process: the guard for every write and print of a run."""
    return rank() == 0


def join(device: torch.device) -> Tuple[World, torch.device]:
    """The world of this run and this rank's device (``device``, or for ``cuda`` without an index
    this rank's GPU, ``LOCAL_RANK``): the process group already started (Ray Train), else the one
    torchrun's variables describe (started here, gloo on CPU and NCCL on CUDA, destroyed at exit),
    else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = current()
    elif _env_int("WORLD_SIZE", 1) > 1:
        world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0), grouped=True)
    else:
        return World(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return world, device


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ batches
def rank_order(order: torch.Tensor, batch_size: int, rank: int, world_size: int, even: bool = True) -> torch.Tensor:
    """Rank ``rank``'s images of an epoch, in step order, from the one-process ``order`` (the
    ``DistributedSampler`` of the engine's loaders, for any sampler's permutation).

    ``even`` (training): step k's slice is part ``rank`` of the k-th global batch of
    ``batch_size × world_size`` images, contiguous parts, rank 0 first, so the ranks' slices
    concatenated are that global batch and the run sees the batches one process would; a last
    partial global batch is cut to a multiple of the world size (unequal slices would weigh the
    ranks' mean losses unequally in DDP's average). Otherwise (evaluation, whose sums are
    all-reduced) the rank's contiguous part of ``order``: every image once over all the ranks."""
    if world_size == 1:
        return order
    if not even:
        return torch.tensor_split(order, world_size)[rank]
    step = batch_size * world_size
    full, rest = divmod(len(order), step)
    body = order[:full * step].view(full, world_size, batch_size)[:, rank].reshape(-1)
    part = rest // world_size
    tail = order[full * step + rank * part:full * step + (rank + 1) * part]
    return torch.cat([body, tail])


def epoch_order(n: int, generator: torch.Generator, shuffle: bool, batch_size: int, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """A loader's epoch of ``n`` images for one rank: the one-process order (a permutation drawn
    from ``generator`` when ``shuffle``, else ``0..n-1``) through :func:`rank_order`; shuffled
    (training) loaders take even slices of each global batch, the others a contiguous part."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return rank_order(order, batch_size, rank, world_size, even=shuffle)


def batch_count(n: int, batch_size: int, rank: int, world_size: int, even: bool, drop_last: bool) -> int:
    """How many batches of ``batch_size`` rank ``rank`` gets from :func:`rank_order` of ``n``
    images (without a last partial one for ``drop_last``); the same on every rank when ``even``."""
    if world_size == 1:
        share = n
    elif even:
        full, rest = divmod(n, batch_size * world_size)
        share = full * batch_size + rest // world_size
    else:
        share = n // world_size + int(rank < n % world_size)
    return share // batch_size if drop_last else -(-share // batch_size)


def totals(loss_sum: torch.Tensor, correct: torch.Tensor, n: int,
           world_size: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Sums over every rank's images (one all-reduce); as they are for one process."""
    if world_size == 1:
        return loss_sum, correct, n
    import torch.distributed as dist

    sums = torch.stack([loss_sum.double(), correct.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(sums)
    return sums[0], sums[1], int(sums[2].item())


# ------------------------------------------------------------------------------ the model
def parallel_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (the forward the training steps call), or
    ``model`` itself for one process. The wrapper shares the model's parameters: the optimizer,
    the decompositions' hooks and the checkpoints use the model, unwrapped."""
    if not world.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: torch.nn.Module, sync_bn: bool, world: World, device: torch.device) -> torch.nn.Module:
    """``sync_bn``: BatchNorm statistics over the global batch (``SyncBatchNorm``, as timm's
    ``--sync-bn``); one line where torch cannot (CPU). Without it each rank normalizes its own slice."""
    if not (sync_bn and world.parallel):
        return model
    check_sync_bn(sync_bn, device)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise ValueError("sync_bn=True needs CUDA: torch's SyncBatchNorm runs on GPUs only; on CPU each process "
                         "normalizes its own slice of the batch (sync_bn=false)")


def sharded(loader: Any, world: World) -> Any:
    """A ``dcanets.engine.data.BatchLoader`` that yields this rank's batches (:func:`epoch_order`)."""
    loader.rank, loader.world_size = world.rank, world.size
    return loader


def parallel_steps(world: World, optimizer: torch.optim.Optimizer, train_images: int, *, fidelity_every: int,
                   sync_bn: bool) -> None:
    """Make the optimizer's steps global (``dcanets.optim.distributed.data_parallel``), or one line
    for what a data-parallel run cannot do, before any step."""
    if not world.parallel:
        return
    from dcanets.optim.distributed import data_parallel

    if train_images < world.size:
        raise ValueError(f"{train_images} training image(s) for {world.size} processes: every process needs a part "
                         "of each batch; use fewer processes or more images")
    check_parallel(optimizer, fidelity_every=fidelity_every, sync_bn=sync_bn)
    data_parallel(optimizer)


def check_parallel(optimizer: torch.optim.Optimizer, *, fidelity_every: int, sync_bn: bool) -> None:
    """One line for what a run of several processes cannot do with ``optimizer`` and these settings;
    a launcher asks it (with the run's optimizer built on any parameters) before it starts one."""
    from dcanets.optim.distributed import check_data_parallel, measures_curvature

    if fidelity_every:
        raise ValueError(f"fidelity_every={fidelity_every} measures one process's steps against its own reference "
                         "passes: train with one process for the fidelity diagnostic (fidelity_every=0 here)")
    if sync_bn and measures_curvature(optimizer):
        raise ValueError("sync_bn=True with a decomposition that measures curvature (rho='auto', or rho > 0 without "
                         "kappa): SyncBatchNorm has no second derivative; give kappa, or sync_bn=false")
    check_data_parallel(optimizer)


# ------------------------------------------------------------------------------ RNG
def rng_states(world: World, state: Dict[str, Any]) -> Dict[str, Any]:
    """Every rank's RNG state, for rank 0's checkpoint (``rng_ranks``); {} for one process.
    A collective: every rank calls it."""
    if not world.parallel:
        return {}
    import torch.distributed as dist

    gathered: List[Any] = [None] * world.size
    dist.all_gather_object(gathered, state)
    return {"rng_ranks": gathered}


def restore_rng(ckpt: Dict[str, Any], world: World, seed: int) -> None:
    """Resume this rank's RNGs: its own state from the checkpoint (rank 0's is ``rng``, in every
    checkpoint); a rank the checkpoint has none for (a resume with more processes than wrote it)
    is seeded from (seed, epoch, rank) instead."""
    from dcanets.engine.checkpoint import set_rng_state

    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if world.rank < len(ranks):
        set_rng_state(ranks[world.rank])
    else:
        torch.manual_seed(seed * 1_000_003 + int(ckpt.get("epoch", 0)) * 1009 + world.rank)


__all__ = ["World", "batch_count", "check_parallel", "check_sync_bn", "current", "epoch_order", "is_main_process",
           "join", "launched", "parallel_model", "parallel_steps", "rank", "rank_order", "restore_rng", "rng_states",
           "sharded", "sync_batchnorm", "totals"]
