"""Cached mode's batches: index the decoded uint8 set, augment the whole batch with torch ops, normalize.

Augmentation is the CIFAR recipe on whole batches: pad-4 random crop + horizontal flip as one
gather (:func:`random_crop_flip`), and, with ``reprob``, timm's ``RandomErasing`` on the normalized
batch (exactly what timm's prefetcher does). Per-image policies (RandAugment/AutoAugment, ``aa``)
need stream mode.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from dcanets.engine.data.sources import ImageData
from dcanets.engine.distributed import batch_count, epoch_order

GPU_RESIDENT_BYTES = 2 * 2**30  # decoded sets below this size live on the GPU during training
STATS_CHUNK = 256  # images per chunk of the channel statistics


def channel_stats(images: torch.Tensor | ImageData, max_images: int = 10000) -> Tuple[List[float], List[float]]:
    """Per-channel mean and (unbiased) std in [0, 1] units, of the first ``max_images`` images.

    Exact: integer sums of the pixels and their squares over chunks of :data:`STATS_CHUNK` images
    (int64 accumulators; a chunk holds at most 256 x 50k x 65025, far below 2^63), so memory stays
    at one chunk whatever the set's size, and no float64 copy of the set is made.
    """
    n = min(len(images), max_images)
    c = images.storage.shape[1] if isinstance(images, ImageData) else images.shape[1]
    s = torch.zeros(c, dtype=torch.int64)
    ss = torch.zeros(c, dtype=torch.int64)
    for start in range(0, n, STATS_CHUNK):
        k = torch.arange(start, min(n, start + STATS_CHUNK))
        x = images.take(k)[0] if isinstance(images, ImageData) else images[k]
        x = x.to("cpu", torch.int64)
        s += x.sum(dim=(0, 2, 3))
        ss += (x * x).sum(dim=(0, 2, 3))
    count = n * (images.image_size[0] * images.image_size[1] if isinstance(images, ImageData)
                 else images.shape[2] * images.shape[3])
    mean = s.double() / count
    var = (ss.double() - s.double() ** 2 / count) / max(count - 1, 1)
    return (mean / 255.0).tolist(), (var.clamp_min(0).sqrt() / 255.0).clamp_min(1e-3).tolist()


def normalized(images: torch.Tensor, stats: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images as the engine feeds them, ``(x / 255 − mean) / std`` per channel, in
    float32; ``stats`` (mean, std) default to these images' own :func:`channel_stats`."""
    mean, std = channel_stats(images) if stats is None else stats
    return (images.float() / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     flip: bool = True, of: Tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Pad-``pad`` random crop + horizontal flip of a whole batch ``[B, C, H, W]`` at once.

    Zero padding, as torchvision's ``RandomCrop(padding=4)``; the per-sample offsets become one
    gather instead of B slicing calls. ``of=(i, k)``: x is part i of k of a batch (a data-parallel
    rank's slice), drawn as the whole batch would be.
    """
    b, c, h, w = x.shape
    part = slice(of[0] * b, (of[0] + 1) * b)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b * of[1],), generator=generator)[part]
    dx = torch.randint(0, 2 * pad + 1, (b * of[1],), generator=generator)[part]
    rows = (dy[:, None] + torch.arange(h)).to(x.device)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)
    if flip:
        mirror = (torch.rand(b * of[1], generator=generator)[part] < 0.5).to(x.device)
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Batches of a decoded set: index the uint8 cache, augment, move to device, normalize.

    Shuffling and augmentation draw from a generator seeded with ``(seed, epoch)``, so an epoch
    is the same whether it runs in one process or after a resume. ``data_seconds`` accumulates
    the time spent producing batches (indexing + augmentation + transfer + normalization).
    ``erase`` (timm's ``RandomErasing``) runs on the normalized training batch. ``rank`` of
    ``world_size`` data-parallel ranks takes its slice of the one-process order
    (``dcanets.engine.distributed.epoch_order``): of every global batch of ``batch_size × world_size``
    when shuffled (training), a contiguous part of the set otherwise (evaluation).
    """

    def __init__(self, data: ImageData, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: bool = False, drop_last: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0, channels_last: bool = False,
                 erase: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.drop_last, self.device, self.seed, self.epoch = drop_last, torch.device(device), seed, 0
        self.erase = erase
        c = data.in_chans
        self.view = data
        self.pin = self.device.type == "cuda"
        if self.pin and data.storage.nbytes < GPU_RESIDENT_BYTES:  # CIFAR-10 is 150 MB: keep it on the GPU
            self.view = _on(data, self.device)
            self.pin = False
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255)
        self.data_seconds = 0.0

    def __len__(self) -> int:
        return batch_count(len(self.data), self.batch_size, self.rank, self.world_size, self.shuffle, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = epoch_order(len(self.data), g, self.shuffle, self.batch_size, self.rank, self.world_size)
        pin = self.pin
        order = self.view.rows(order.to(self.view.storage.device))  # storage rows, on the storage's device
        images, labels = self.view.storage, self.view.label_storage
        self.data_seconds += time.perf_counter() - t0
        for k in range(len(self)):
            t0 = time.perf_counter()
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            x, y = images[idx], labels[idx]
            if self.augment:
                x = random_crop_flip(x, g, of=(self.rank, self.world_size))
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=pin)
            y = y.to(self.device, non_blocking=pin)
            x = (x.float() - self.mean) * self.inv_std
            if self.erase is not None:
                x = self.erase(x)
            x = x.contiguous(memory_format=self.memory_format)
            self.data_seconds += time.perf_counter() - t0
            yield x, y


def _on(data: ImageData, device: torch.device) -> ImageData:
    view = ImageData(data.storage.to(device), data.label_storage.to(device), data.classes, data.name,
                     data.from_cache, None if data.index is None else data.index.to(device))
    view.origin = data.origin
    return view


def erasing(prob: float, mode: str, count: int, device: torch.device) -> Optional[Any]:
    """timm's ``RandomErasing`` on normalized batches (None when ``prob`` is 0), as timm's prefetcher
    applies it."""
    if prob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode=mode, max_count=count, device=str(device))
