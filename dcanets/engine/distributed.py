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
import contextlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")


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


def rank_share(n: int, batch_size: int, rank: int, world_size: int, even: bool) -> int:
    """How many of ``n`` images :func:`rank_order` gives rank ``rank`` (the same on every rank when ``even``)."""
    if world_size == 1:
        return n
    if even:
        full, rest = divmod(n, batch_size * world_size)
        return full * batch_size + rest // world_size
    return n // world_size + int(rank < n % world_size)


def batch_count(n: int, batch_size: int, rank: int, world_size: int, even: bool, drop_last: bool) -> int:
    """How many batches of ``batch_size`` rank ``rank`` gets from :func:`rank_order` of ``n``
    images (without a last partial one for ``drop_last``); the same on every rank when ``even``."""
    share = rank_share(n, batch_size, rank, world_size, even)
    return share // batch_size if drop_last else -(-share // batch_size)


def totals(sums: Sequence[torch.Tensor], n: int, world_size: int) -> Tuple[List[torch.Tensor], int]:
    """Sums over every rank's images (one all-reduce) and their count; as they are for one process."""
    if world_size == 1:
        return list(sums), n
    import torch.distributed as dist

    device = sums[0].device
    stacked = torch.stack([s.double() for s in sums] + [torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(stacked)
    return list(stacked[:-1].unbind()), int(stacked[-1].item())


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


def no_sync(model: torch.nn.Module) -> ContextManager[Any]:
    """DDP's ``no_sync()`` for the micro-batches of an accumulation group before its last (their
    gradients add up on each rank, and the last backward averages the sum once, as timm's train.py
    does); a context that does nothing for one process."""
    from torch.nn.parallel import DistributedDataParallel

    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def settle_batchnorm(world: World, sync_bn: bool, *models: torch.nn.Module) -> None:
    """At an epoch's end, every rank's BatchNorm running statistics replaced by their mean over the
    ranks (timm's ``distribute_bn``, its train.py's default ``--dist-bn reduce``), in the model and
    its EMA: each rank updated them from its own slice, and the validation (every rank its part),
    the checkpoint (rank 0's) and the next epoch must all see the same model. Nothing to do for
    one process, or with ``sync_bn`` (the statistics are the global batch's already)."""
    if not world.parallel or sync_bn:
        return
    from timm.utils import distribute_bn

    for model in models:
        distribute_bn(model, world.size, reduce=True)


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


# ------------------------------------------------------------------------------ rank 0's work
class MainFailed(RuntimeError):
    """What the other ranks raise when rank 0 failed at a step they all wait on: its error, in one line."""


def on_main(work: Callable[[], T], world: World) -> T | None:
    """``work()`` on rank 0 alone (claiming the run folder, writing ``last.pt`` or ``metrics.json``);
    every rank learns its outcome (one broadcast), so a failure there (a folder in use, a full disk)
    ends every rank at once with that one line, instead of leaving the others waiting in the next
    collective. Rank 0 raises its own exception, the others the same (pickled), or
    :class:`MainFailed` with its line. For one process: ``work()``. Returns rank 0's result there,
    None on the other ranks."""
    if not world.parallel:
        return work()
    import torch.distributed as dist

    result: Any = None
    failure: BaseException | None = None
    if world.main:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001  (any failure must reach the other ranks)
            failure = exc
    box: List[Any] = [None if failure is None else _portable(failure)]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise _revived(box[0])
    return result


def _portable(exc: BaseException) -> Tuple[bytes | None, str]:
    """``exc`` pickled (None when it cannot be) and its one line."""
    try:
        blob: bytes | None = pickle.dumps(exc)
    except Exception:  # noqa: BLE001
        blob = None
    return blob, f"{exc}"


def _revived(sent: Tuple[bytes | None, str]) -> BaseException:
    blob, line = sent
    try:
        revived = pickle.loads(blob) if blob is not None else None  # noqa: S301  (rank 0 of this run sent it)
    except Exception:  # noqa: BLE001
        revived = None
    return revived if isinstance(revived, BaseException) else MainFailed(f"rank 0: {line}")


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


__all__ = ["MainFailed", "World", "batch_count", "check_parallel", "check_sync_bn", "current", "epoch_order",
           "is_main_process", "join", "launched", "no_sync", "on_main", "parallel_model", "parallel_steps", "rank",
           "rank_order", "rank_share", "restore_rng", "rng_states", "settle_batchnorm", "sync_batchnorm", "totals"]
