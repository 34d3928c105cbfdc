"""The engine's one entry to data: ``build_loaders(cfg, device) -> Loaders``, in cached or stream mode.

``data_mode``:

- ``cached``: the set is decoded once into one uint8 tensor and batches are cut from it
  (:mod:`.cached`, :mod:`.batches`): the fast path for small sets (CIFAR, MNIST, digits). Refused
  when the decoded set would take more than 80% of the available memory, and with the per-image
  transform options (``aa``, ``crop_pct``, ``scale``, ``ratio``, non-default ``hflip``,
  ``color_jitter``, ``train_interpolation``), which need stream mode.
- ``stream``: every epoch decoded in DataLoader workers through timm's readers and transforms
  (:mod:`.stream`); memory does not grow with the number of images.
- ``auto`` (default): in-memory sources are cached; an image folder or tar streams when a
  per-image transform option is set or when its decoded size (images x channels x height x width,
  at the cached decode size and after ``limit``) is over 25% of the available memory
  (``MemAvailable``, or the cgroup's limit when lower), else it is cached. The choice and its
  reason are printed as one line and recorded in the run's metrics (``data_mode``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from dcanets.engine.data import transforms
from dcanets.engine.data.batches import BatchLoader, channel_stats, erasing
from dcanets.engine.data.cached import (
    load,
    load_split,
    min_side,
    size_policy,
    source_size,
    split_indices,
    split_layout_indices,
)
from dcanets.engine.data.layout import (
    Part,
    check_classes,
    check_path,
    class_names,
    reader,
    resolve,
    split_reader,
    val_reader,
)
from dcanets.engine.data.sources import is_generated, is_torchvision_dir
from dcanets.engine.data.stream import StreamDataset, StreamLoader

if TYPE_CHECKING:
    from dcanets.engine.config import TrainConfig

AUTO_SHARE = 0.25  # auto: stream when the decoded set would take more than this share of available memory
CACHED_SHARE = 0.8  # cached: refused above this share
STREAM_ONLY: Dict[str, Any] = {"aa": None, "crop_pct": None, "scale": None, "ratio": None, "hflip": 0.5,
                               "color_jitter": 0.4, "train_interpolation": "random"}  # field: its default


@dataclass
class Loaders:
    """What the engine trains and validates on; ``mode``/``reason`` say how the data is read."""

    train: Any  # BatchLoader | StreamLoader: len(), set_epoch(e), data_seconds, device; yields (x, y)
    val: Any
    classes: List[str]
    in_chans: int
    mean: List[float]
    std: List[float]
    mode: str
    reason: str
    augment: bool
    train_data: Any  # ImageData view (cached) or StreamDataset: len() and classes
    val_data: Any
    settings: Dict[str, Any] = field(default_factory=dict)  # what held-out data needs to match

    def close(self) -> None:
        """End the loaders' worker processes (stream mode), when the run ends rather than at garbage collection."""
        for loader in (self.train, self.val):
            if hasattr(loader, "close"):
                loader.close()


def split_seed(cfg: TrainConfig) -> int:
    return cfg.seed if cfg.split_seed is None else int(cfg.split_seed)


def build_loaders(cfg: TrainConfig, device: torch.device, progress: bool = True, eval_batch: int = 1024,
                  rank: int = 0, world_size: int = 1) -> Loaders:
    """Train and validation loaders of ``cfg`` (module docstring). ``rank`` of ``world_size``
    data-parallel ranks gets its slice of every global batch (``batch_size × world_size``) of the
    one-process order, and a contiguous part of the validation images, in both modes
    (``dcanets.engine.distributed.rank_order``)."""
    mode, reason = choose_mode(cfg)
    if mode == "cached":
        loaders = _cached(cfg, device, progress, eval_batch, reason, rank, world_size)
    else:
        loaders = _stream(cfg, device, reason, rank, world_size)
    if cfg.data_mode == "auto" and not (is_generated(cfg.data) or is_torchvision_dir(check_path(cfg.data))):
        print(f"dcanets: data_mode auto chose {mode}: {reason}", file=sys.stderr, flush=True)  # once the data is ready
    return loaders


def _stream_only(cfg: TrainConfig) -> List[str]:
    return [f"{k}={getattr(cfg, k)!r}" for k, default in STREAM_ONLY.items() if getattr(cfg, k) != default]


def choose_mode(cfg: TrainConfig) -> Tuple[str, str]:
    """(``cached`` or ``stream``, why), or one line saying why ``cfg.data_mode`` cannot be used."""
    spec, wanted, per_image = cfg.data, cfg.data_mode, _stream_only(cfg)
    if is_generated(spec) or is_torchvision_dir(check_path(spec)):
        if wanted == "stream" or per_image:
            why = "data_mode=stream" if wanted == "stream" else f"{per_image[0]} (a per-image transform of stream mode)"
            raise ValueError(f"{why} needs an image folder or tar, but '{spec}' is an in-memory set; "
                             "use data_mode=cached without per-image transform options")
        return "cached", f"'{spec}' is an in-memory set"
    if wanted == "stream":
        return "stream", "data_mode=stream"
    if wanted == "cached":
        if per_image:
            raise ValueError(f"{per_image[0]} is a per-image transform of data_mode=stream; cached mode augments "
                             "whole batches (pad-4 crop + flip, reprob): use data_mode=stream (or auto)")
        need, avail, what = estimate(cfg)
        if need > CACHED_SHARE * avail:
            raise ValueError(f"data_mode=cached: {what} decode to {_gb(need)}, more than {CACHED_SHARE:.0%} of the "
                             f"{_gb(avail)} of available memory; use data_mode=stream (or auto)")
        return "cached", "data_mode=cached"
    if per_image:
        return "stream", f"{', '.join(per_image)} need per-image transforms"
    need, avail, what = estimate(cfg)
    verdict = "over" if need > AUTO_SHARE * avail else "within"
    return ("stream" if verdict == "over" else "cached",
            f"{what} decode to {_gb(need)}, {verdict} {AUTO_SHARE:.0%} of the {_gb(avail)} of available memory")


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def training_images(cfg: TrainConfig) -> int:
    """How many images a run of ``cfg`` trains on (after its split and ``limit``), without decoding
    any: what ``dcanets train --nproc`` checks the global batch against before it starts a process."""
    if is_generated(cfg.data) or is_torchvision_dir(check_path(cfg.data)):
        train_idx, _ = split_indices(source_size(cfg.data), cfg.val_fraction, split_seed(cfg), cfg.limit,
                                     cfg.val_limit)
        return len(train_idx)
    return len(_split(cfg)[2])


def _split(cfg: TrainConfig) -> Tuple[Any, Any, Any, Any]:
    """(timm layout, training reader, training and validation indices) of an image folder or tar."""
    layout = resolve(check_path(cfg.data), cfg.train_split, cfg.val_split)
    r = split_reader(layout.train, "training") if layout.val is not None else reader(layout.train)
    if layout.val is not None:
        n_val = len(split_reader(layout.val, "validation"))
        train_idx, val_idx = split_layout_indices(len(r), n_val, split_seed(cfg), cfg.limit, cfg.val_limit)
    else:
        train_idx, val_idx = split_indices(len(r), cfg.val_fraction, split_seed(cfg), cfg.limit, cfg.val_limit)
    return layout, r, train_idx, val_idx


def estimate(cfg: TrainConfig) -> Tuple[int, int, str]:
    """(bytes the cached decode would take, bytes of memory available, what is counted)."""
    layout, r, train_idx, val_idx = _split(cfg)
    (h, w), gray = size_policy(layout.train, r, _size(cfg))
    n, c = len(train_idx) + len(val_idx), 1 if gray else 3
    return n * c * h * w, available_memory(), f"{n:,} images of {c}x{h}x{w}"


def available_memory() -> int:
    """Bytes a process can still take: ``MemAvailable`` of /proc/meminfo, or the cgroup's room if smaller."""
    import os

    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit.isdigit():
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(int(avail), 1)


def _size(cfg: TrainConfig) -> Optional[Tuple[int, int]]:
    if cfg.input_size:
        return int(cfg.input_size[1]), int(cfg.input_size[2])
    return (int(cfg.img_size), int(cfg.img_size)) if cfg.img_size else None


def _cached(cfg: TrainConfig, device: torch.device, progress: bool, eval_batch: int, reason: str, rank: int,
            world_size: int) -> Loaders:
    train, val = load_split(cfg.data, cfg.val_fraction, split_seed(cfg), cfg.limit, val_limit=cfg.val_limit,
                            progress=progress, train_split=cfg.train_split, val_split=cfg.val_split, size=_size(cfg))
    if len(train) == 0:
        raise ValueError(f"no training images left in '{cfg.data}' after the validation split")
    mean, std = channel_stats(train)
    augment = train.in_chans == 3 if cfg.augment is None else bool(cfg.augment)
    bs = int(cfg.batch_size)
    common: Dict[str, Any] = dict(mean=mean, std=std, device=device, seed=cfg.seed,
                                  channels_last=bool(cfg.channels_last))
    ranks: Dict[str, Any] = dict(rank=rank, world_size=world_size)
    train_loader = BatchLoader(train, bs, shuffle=True, augment=augment, drop_last=len(train) >= 2 * bs * world_size,
                               erase=erasing(cfg.reprob, cfg.remode, cfg.recount, device), **common, **ranks)
    val_loader = BatchLoader(val, max(bs, eval_batch), shuffle=False, augment=False, **common, **ranks)
    return Loaders(train_loader, val_loader, train.classes, train.in_chans, mean, std, "cached", reason, augment,
                   train, val, dict(common, batch=eval_batch, image_size=train.image_size))


def _stream(cfg: TrainConfig, device: torch.device, reason: str, rank: int, world_size: int) -> Loaders:
    dc = transforms.data_config(cfg.model, cfg.input_size, cfg.img_size, cfg.crop_pct)
    layout = resolve(check_path(cfg.data), cfg.train_split, cfg.val_split)
    tr = split_reader(layout.train, "training") if layout.val is not None else reader(layout.train)
    check_classes(cfg.data, class_names(tr))
    if layout.val is not None:
        vr, val_part = val_reader(tr, layout.val), layout.val
        train_idx, val_idx = split_layout_indices(len(tr), len(vr), split_seed(cfg), cfg.limit, cfg.val_limit)
    else:
        vr, val_part = tr, layout.train
        train_idx, val_idx = split_indices(len(tr), cfg.val_fraction, split_seed(cfg), cfg.limit, cfg.val_limit)
    c = int(dc["input_size"][0])
    augment = c == 3 if cfg.augment is None else bool(cfg.augment)
    train_tf = transforms.build(dc, True, augment, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                color_jitter=cfg.color_jitter, train_interpolation=cfg.train_interpolation, aa=cfg.aa)
    eval_tf = transforms.build(dc, False, False)
    smallest = min_side(dc["input_size"][1:])
    train = StreamDataset(layout.train, tr, train_tf, c, smallest, train_idx.tolist())
    val = StreamDataset(val_part, vr, eval_tf, c, smallest, val_idx.tolist())
    bs, mean, std = int(cfg.batch_size), list(dc["mean"]), list(dc["std"])
    common: Dict[str, Any] = dict(mean=mean, std=std, device=device, seed=cfg.seed, workers=int(cfg.workers),
                  channels_last=bool(cfg.channels_last), max_bad_fraction=float(cfg.max_bad_fraction))
    train_loader = StreamLoader(train, bs, shuffle=True, drop_last=len(train) >= 2 * bs * world_size, reprob=cfg.reprob,
                                remode=cfg.remode, recount=cfg.recount, rank=rank, world_size=world_size, **common)
    val_loader = StreamLoader(val, bs, shuffle=False, rank=rank, world_size=world_size, **common)
    return Loaders(train_loader, val_loader, train.classes, c, mean, std, "stream", reason, augment, train, val,
                   dict(common, batch=bs, transform=eval_tf, min_side=smallest))


def held_out(spec: str, data: Loaders, progress: bool = True) -> Tuple[Any, int]:
    """A loader over held-out data ``spec`` (``eval_data``) prepared as the validation split is, and its
    number of images; refused in one line when its classes (or, cached, its image shape) differ."""
    s = dict(data.settings)
    batch = s.pop("batch")
    if data.mode == "cached":
        held = load(spec, progress=progress)
        size = s.pop("image_size")
        if held.in_chans != data.in_chans or held.image_size != size:
            raise ValueError(f"eval data '{spec}' has images {held.in_chans}x{held.image_size[0]}x{held.image_size[1]} "
                             f"but the training data {data.in_chans}x{size[0]}x{size[1]}")
        _same_classes(spec, held.classes, data.classes)
        return BatchLoader(held, batch, shuffle=False, augment=False, **s), len(held)
    part = Part(check_path(spec))
    r = reader(part)
    _same_classes(spec, class_names(r), data.classes)
    ds = StreamDataset(part, r, s.pop("transform"), data.in_chans, s.pop("min_side"))
    return StreamLoader(ds, batch, shuffle=False, persistent=False, **s), len(ds)  # one pass: workers end with it


def _same_classes(spec: str, held: List[str], train: List[str]) -> None:
    if held != train:
        raise ValueError(f"eval data '{spec}' has classes {held[:5]}... but the training data "
                         f"{train[:5]}...; both need the same class folders")
