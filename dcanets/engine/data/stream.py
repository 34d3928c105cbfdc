"""Stream mode: images decoded and transformed every epoch in DataLoader workers; memory does not grow
with the number of images.

- :class:`StreamDataset` reads image ``i`` through timm's reader, decodes it (:mod:`.decode`: size
  checks first) and applies the per-image transform (:mod:`.transforms`). An image that cannot be
  used comes back as a :class:`Bad` record naming it instead of a sample, so one corrupt file costs
  one image, not the run.
- :class:`EpochSampler` orders an epoch by a generator seeded with ``(seed, epoch)`` and gives every
  position its own sample seed from the same generator; the transform of that sample runs under
  it. An epoch is therefore the same for any number of workers, and after a resume (the checkpoint
  needs no loader state). ``rank`` / ``world_size`` shard the epoch as the cached loader does: each
  data-parallel rank takes its slice of every global batch of the one-process order, with the
  sample seeds those images have in one process (the ranks' batches concatenated are one process's).
- :class:`StreamLoader` is a ``torch.utils.data.DataLoader`` (persistent workers, pinned memory on
  CUDA) under timm's ``PrefetchLoader`` (next batch copied to the device on a side stream,
  normalized there, random erasing there), with the engine's loader interface (``set_epoch``,
  ``data_seconds``, ``device``). Unusable images are counted per epoch: a warning naming them at the
  epoch's end, or one error line when more than ``max_bad_fraction`` of the epoch's images failed.
"""
from __future__ import annotations

import io
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcanets.engine.data.decode import BadImage, check_size, decode, header
from dcanets.engine.data.layout import DataWarning, Part, class_names, locator, open_blob
from dcanets.engine.distributed import rank_order, rank_share


@dataclass(frozen=True)
class Bad:
    """An image that could not be used: where it is and why."""

    where: str
    reason: str


class _SeededRng:
    """Run a sample's transform under its own seed (python, numpy and torch CPU RNGs), restoring the
    caller's state afterwards: in a worker or in the main process, the training RNG is untouched."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class StreamDataset(Dataset):
    """Images ``index`` (all: None) of a timm reader, decoded and transformed per access.

    Keys are ``(image, sample_seed)`` pairs from :class:`EpochSampler`. ``path`` is ``tensor``
    (torchvision decode + v2 kernels) or ``pil`` (timm's own PIL path); see :mod:`.transforms`.
    """

    def __init__(self, part: Part, r: Any, transform: Callable[[Any], torch.Tensor], channels: int,
                 min_side: int, index: Optional[Sequence[int]] = None, path: str = "tensor") -> None:
        self.part, self.reader, self.transform, self.channels = part, r, transform, channels
        self.min_side, self.path = min_side, path
        self.index = list(range(len(r))) if index is None else [int(i) for i in index]
        self.classes = class_names(r)
        self.where = locator(part, r)
        self.pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        if self.pid != os.getpid():
            self._own_files()
        k, seed = key
        i = self.index[k]
        try:
            blob, target = open_blob(self.reader, i, self.where)
        except ValueError as exc:  # its message names the file; the record keeps the reason
            return Bad(self.where(i), str(exc).rsplit("': ", 1)[-1])
        try:
            img = self._decode(blob)
        except BadImage as exc:
            return Bad(self.where(i), str(exc))
        with _SeededRng(seed):
            return self.transform(img), target

    def _own_files(self) -> None:
        """In a worker forked from a process that had read the tar (a header sample, an earlier epoch
        in the main process), timm's reader holds the parent's open TarFile: its file offset is shared
        with every other worker, so their seeks and reads would interleave. Drop it; timm reopens."""
        state = getattr(self.reader, "tar_state", None)
        states = list(state.values()) if isinstance(state, dict) else [] if state is None else [state]
        for tar in states:
            tar.reset()
            for child in tar.children.values():
                child.reset()
        self.pid = os.getpid()

    def _decode(self, blob: bytes) -> Any:
        """Size checks on the header, then the pixels: a tensor (``tensor``) or a PIL image (``pil``)."""
        if self.path == "tensor":
            return decode(blob, gray=self.channels == 1, min_side=self.min_side)
        from PIL import Image

        h, w, _ = header(blob)
        check_size(h, w, self.min_side)
        try:
            return Image.open(io.BytesIO(blob)).convert("L" if self.channels == 1 else "RGB")
        except Exception as exc:
            raise BadImage(f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None


class EpochSampler(Sampler):
    """``(position, sample seed)`` pairs of one epoch: seeded by ``(seed, epoch)``, sharded by rank.

    ``rank`` of ``world_size`` takes its slice of the one-process order as the cached loader does
    (``dcanets.engine.distributed.rank_order``): of every global batch of ``batch_size × world_size``
    when shuffled (training), a contiguous part otherwise (evaluation); each position keeps the
    sample seed it has in one process, so the ranks' batches concatenated are one process's."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.shuffle, self.seed, self.rank, self.world_size, self.epoch = n, shuffle, seed, rank, world_size, 0
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return rank_share(self.n, self.batch_size, self.rank, self.world_size, self.shuffle)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        mine = rank_order(torch.arange(self.n), self.batch_size, self.rank, self.world_size, even=self.shuffle)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def collate(batch: List[Any]) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Bad]]:
    """Stack the usable samples (uint8, as timm's ``fast_collate``); pass the :class:`Bad` ones on."""
    good = [b for b in batch if not isinstance(b, Bad)]
    bad = [b for b in batch if isinstance(b, Bad)]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, torch.tensor([int(g[1]) for g in good], dtype=torch.int64), bad


class StreamLoader:
    """Batches of a :class:`StreamDataset` on ``device``, normalized; the engine's loader interface."""

    def __init__(self, dataset: StreamDataset, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, drop_last: bool = False, device: torch.device | str = "cpu", seed: int = 0,
                 workers: int = 0, channels_last: bool = False, reprob: float = 0.0, remode: str = "pixel",
                 recount: int = 1, max_bad_fraction: float = 0.01, rank: int = 0, world_size: int = 1,
                 persistent: bool = True) -> None:
        from timm.data.loader import PrefetchLoader

        self.dataset, self.device = dataset, torch.device(device)
        self.sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size, batch_size)
        self.world_size = world_size  # evaluation sums over the ranks' parts (dcanets.engine.recipe)
        # its own generator: a DataLoader draws its workers' base seed when an iterator is made (once, with
        # persistent workers), which would otherwise shift the training RNG after a resume
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                                 persistent_workers=persistent and workers > 0,
                                 prefetch_factor=2 if workers > 0 else None,
                                 generator=torch.Generator().manual_seed(seed))
        # timm's PrefetchLoader only iterates its loader and asks its len(): _Usable is enough
        usable: Any = _Usable(self)
        self.prefetch = PrefetchLoader(usable, mean=tuple(mean), std=tuple(std), channels=dataset.channels,
                                       device=self.device, re_prob=reprob, re_mode=remode, re_count=recount)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.max_bad_fraction, self.epoch, self.data_seconds = max_bad_fraction, 0, 0.0
        self.bad: List[Bad] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def close(self) -> None:
        """End the worker processes now (a later iteration starts new ones)."""
        from dcanets._compat import end_dataloader_workers

        end_dataloader_workers(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.bad, self.seen = [], 0
        it = iter(self.prefetch)
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x = x.contiguous(memory_format=self.memory_format)
            self.data_seconds += time.perf_counter() - t0
            yield x, y
        self._report()

    def _report(self) -> None:
        """The epoch's unusable images: a warning naming them, or an error above ``max_bad_fraction``."""
        if not self.bad:
            return
        n, first = len(self.bad), self.bad[0]
        names = "; ".join(f"{b.where} ({b.reason})" for b in self.bad[:3]) + (" ..." if n > 3 else "")
        where = self.dataset.part
        if n > self.max_bad_fraction * max(self.seen, 1):
            raise ValueError(f"{n} of {self.seen} images of '{where}' could not be used in epoch {self.epoch + 1}, "
                             f"more than max_bad_fraction={self.max_bad_fraction} (first: '{first.where}': "
                             f"{first.reason}); fix or remove them, or raise max_bad_fraction")
        warnings.warn(f"skipped {n} of {self.seen} images of '{where}' in epoch {self.epoch + 1} that could not "
                      f"be used: {names}", DataWarning, stacklevel=2)


class _Usable:
    """The DataLoader's batches without their :class:`Bad` records (kept on the loader) and
    without batches left empty; what timm's ``PrefetchLoader`` iterates."""

    def __init__(self, owner: StreamLoader) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for x, y, bad in self.owner.loader:
            self.owner.bad.extend(bad)
            self.owner.seen += len(y) + len(bad)
            if x is not None:
                yield x, y
