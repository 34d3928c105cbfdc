"""Cached mode: a data set decoded once into one ``uint8 [N, C, H, W]`` tensor, kept and reused.

Why: decoding tens of thousands of small JPEG/PNG files per epoch with PIL costs more than the
training step of a CIFAR-sized net on 2 cores. So a small set is decoded once, into memory and
into the disk cache (:mod:`.cache`), and the training loop only indexes that tensor.

Size policy (image folders and tars): images are decoded at ``img_size`` when it is given, else
at the most common size among up to 256 evenly spaced images of the source (ties: the first in
file order). An image of another size is resized, aspect kept, and centre-cropped to it (timm's
evaluation transform at ``crop_pct=1``); never squashed, and never does one stray image set the
size. An image under 1/16 of that size or 2 pixels (a 1x1 stray) or over the decode pixel limit is skipped
with a warning naming it (:mod:`.decode`). An image that cannot be decoded ends the load with one
line naming it. Channels follow the first image (grayscale stays 1 channel).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from dcanets.engine.data import cache
from dcanets.engine.data.decode import BadImage, OutOfRange, check_size, decode, fit, header, most_common
from dcanets.engine.data.layout import (
    Layout,
    Part,
    check_classes,
    check_path,
    class_names,
    locator,
    open_blob,
    reader,
    resolve,
    split_reader,
    tar_complete,
    val_reader,
    warn_once,
)
from dcanets.engine.data.sources import ImageData, generated, is_torchvision_dir, torchvision_format

SIZE_SAMPLE = 256  # images whose headers set the decode size
OUTLIER = 16  # an image whose shorter side is below 1/OUTLIER of the target's (or 2 pixels) is skipped


def min_side(size: Sequence[int]) -> int:
    """The shortest side an image may have to be resized to ``size``: 1/16 of it, and at least 2 pixels."""
    return max(2, min(int(s) for s in size) // OUTLIER)


def size_policy(part: Part, r: Any, size: Optional[Tuple[int, int]]) -> Tuple[Tuple[int, int], bool]:
    """(decode size, grayscale) of ``part``: ``size`` or the most common size of a header sample."""
    where = locator(part, r)
    step = max(1, len(r) // SIZE_SAMPLE)
    heads = []
    for i in range(0, len(r), step)[:SIZE_SAMPLE]:
        try:
            heads.append(header(open_blob(r, i, where)[0]))
        except OutOfRange:  # a decompression bomb: the decode skips it too
            continue
        except BadImage as exc:
            if not heads:  # the first image sets the channels: it must be readable
                raise ValueError(f"cannot decode image '{where(i)}' ({exc}); remove or replace the file") from None
    common = most_common([(h, w) for h, w, _ in heads])
    if common is None:
        raise ValueError(f"no usable image among the first of '{part}': all are over the decode pixel limit")
    return (size or common), heads[0][2]


def decode_part(part: Part, r: Any, indices: Optional[Sequence[int]], size: Tuple[int, int], gray: bool,
                progress: bool) -> ImageData:
    """Images ``indices`` (all: None) of ``part``, decoded at ``size`` into one preallocated tensor."""
    where = locator(part, r)
    idx = list(range(len(r))) if indices is None else [int(i) for i in indices]
    out = torch.empty((len(idx), 1 if gray else 3, *size), dtype=torch.uint8)
    labels: List[int] = []
    kept: List[int] = []
    skipped: List[str] = []
    smallest = min_side(size)
    it = tqdm(idx, desc=f"decoding {part.path.name}", unit="img", mininterval=1.0, leave=False, disable=not progress)
    for i in it:
        blob, target = open_blob(r, i, where)
        try:
            h, w, _ = header(blob)
            check_size(h, w, smallest)
            img = decode(blob, gray)
        except OutOfRange as exc:
            skipped.append(f"{where(i)} ({exc})")
            continue
        except BadImage as exc:
            raise ValueError(f"cannot decode image '{where(i)}' ({exc}); remove or replace the file") from None
        out[len(kept)] = fit(img, size)
        labels.append(target)
        kept.append(i)
    if skipped:
        warn_once(f"skipped {len(skipped)} image(s) of '{part}' far outside the set's {size[1]}x{size[0]} "
                  f"images: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
    images = out if len(kept) == len(idx) else out[: len(kept)].clone()
    data = ImageData(images, torch.tensor(labels, dtype=torch.int64), class_names(r), str(part))
    data.origin = torch.tensor(kept, dtype=torch.int64)
    return data


def load_part(spec: str, part: Part, indices: Optional[Sequence[int]] = None, progress: bool = True,
              size: Optional[Tuple[int, int]] = None, r: Any = None, gray: Optional[bool] = None) -> ImageData:
    """Images ``indices`` of an image folder or tar part, from the cache or decoded into it; ``size``
    and ``gray`` (channels) default to the size policy's."""
    r = reader(part) if r is None else r
    if len(r) == 0:
        if part.path.is_file() and not tar_complete(part.path):
            raise ValueError(f"tar archive '{part.path}' is truncated: no image could be read; "
                             "re-create or re-download it")
        raise ValueError(f"no images found in '{part}'; expected <class>/<image> files")
    target, first_gray = size_policy(part, r, size)
    gray = first_gray if gray is None else gray
    settings = f"size={target[0]}x{target[1]} gray={int(gray)}"
    if indices is not None and cache.is_cached(part, r, settings):  # slice the full decode, do not re-decode
        return load_part(spec, part, None, progress, size, r, gray).at(torch.as_tensor(list(indices)))
    data = cache.cached(part, r, indices, settings, lambda: decode_part(part, r, indices, target, gray, progress))
    _check_truncated(spec, part, data, len(r))
    check_classes(spec, data.classes)
    return data


def _check_truncated(spec: str, part: Part, data: ImageData, total: int) -> None:
    """A tar without its end-of-archive marker trains on what it holds, with a warning giving the counts."""
    if part.path.is_file() and not tar_complete(part.path):
        if total == 0:
            raise ValueError(f"tar archive '{spec}' is truncated: no image could be read; re-create or re-download it")
        warn_once(f"tar archive '{spec}' is truncated (no end-of-archive marker): using only the {total} "
                  f"images in {data.num_classes} classes before the cut; re-create or re-download it for the rest")


def load(spec: str, indices: Optional[Sequence[int]] = None, progress: bool = True,
         size: Optional[Tuple[int, int]] = None) -> ImageData:
    """Decode a data source (see the package docstring); ``indices`` decodes only those images."""
    data = generated(spec)
    if data is None:
        path = check_path(spec)
        data = torchvision_format(path)
        if data is None:
            return load_part(spec, Part(path), indices, progress, size)
    return data if indices is None else data.subset(torch.as_tensor(list(indices), dtype=torch.long))


def source_size(spec: str) -> int:
    """How many images ``spec`` holds, without decoding image folders."""
    data = generated(spec)
    if data is None:
        path = check_path(spec)
        data = torchvision_format(path)
        if data is None:
            return len(reader(Part(path)))
    return len(data)


def forget_decoded() -> None:
    """Drop the decoded sets and folder listings kept in memory; the disk cache stays (what a new
    process would find)."""
    from dcanets.engine.data.layout import forget_readers

    cache.forget()
    forget_readers()


def split_indices(n: int, val_fraction: float, seed: int = 0, limit: Optional[int] = None,
                  val_limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed-seed train/validation split of ``range(n)``.

    ``limit`` caps the training part at ``limit`` images and shrinks the validation part in
    proportion unless ``val_limit`` caps it instead (a small training budget can still be judged
    on the whole validation set); both are prefixes of the unlimited split, so a quick run
    validates on a subset of the full run's validation images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        if val_limit is None and limit < len(train):
            val = val[: int(np.ceil(limit * val_fraction / (1 - val_fraction)))]
        train = train[:limit]
    if val_limit is not None:
        if val_limit <= 0:
            raise ValueError(f"val_limit must be a positive number of images, got {val_limit}")
        val = val[:val_limit]
    return train, val


def split_layout_indices(n_train: int, n_val: int, seed: int, limit: Optional[int],
                         val_limit: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images used of a data set's own two splits: all, or with ``limit`` a fixed-seed random
    ``limit`` of the training split and of the validation split its share (or ``val_limit``)."""
    train = torch.arange(n_train)
    val = torch.arange(n_val)
    if limit is not None and limit < n_train:
        train = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:limit]
        if val_limit is None:
            val = torch.randperm(n_val, generator=torch.Generator().manual_seed(seed + 1))[
                : max(1, int(np.ceil(limit * n_val / n_train)))]
    if val_limit is not None and val_limit < len(val):
        val = torch.randperm(n_val, generator=torch.Generator().manual_seed(seed + 1))[:val_limit]
    return train, val


def load_split(spec: str, val_fraction: float = 0.1, seed: int = 0, limit: Optional[int] = None,
               progress: bool = True, val_limit: Optional[int] = None, train_split: Optional[str] = None,
               val_split: Optional[str] = None,
               size: Optional[Tuple[int, int]] = None) -> Tuple[ImageData, ImageData]:
    """Train and validation sets of ``spec`` (views, no copies); with ``limit`` only the needed
    images are decoded. A data path in timm's layout uses its own splits (``val_fraction`` unused)."""
    layout = _layout(spec, train_split, val_split)
    if layout is not None and layout.val is not None:
        return _split_parts(spec, layout, seed, limit, val_limit, progress, size)
    n = source_size(spec)
    train, val = split_indices(n, val_fraction, seed, limit, val_limit)
    part = None if layout is None else layout.train
    whole = part is None or (limit is None and val_limit is None) or len(train) + len(val) >= n
    if whole:
        full = load(spec, progress=progress, size=size) if part is None else load_part(spec, part, None, progress, size)
        return full.at(train), full.at(val)
    assert part is not None
    wanted = torch.sort(torch.cat([train, val])).values  # decode in file order: sequential tar reads
    some = load_part(spec, part, wanted.tolist(), progress, size)
    return some.at(train), some.at(val)


def _layout(spec: str, train_split: Optional[str], val_split: Optional[str]) -> Optional[Layout]:
    """The layout of an image folder or tar; None for the in-memory sources."""
    if generated(spec) is not None:
        return None
    path = check_path(spec)
    if is_torchvision_dir(path):
        return None
    return resolve(path, train_split, val_split)


def _split_parts(spec: str, layout: Layout, seed: int, limit: Optional[int], val_limit: Optional[int],
                 progress: bool, size: Optional[Tuple[int, int]]) -> Tuple[ImageData, ImageData]:
    assert layout.val is not None
    tr = split_reader(layout.train, "training")
    vr = val_reader(tr, layout.val)
    train_idx, val_idx = split_layout_indices(len(tr), len(vr), seed, limit, val_limit)
    train = load_part(spec, layout.train, _maybe(train_idx, len(tr)), progress, size, tr)
    val = load_part(spec, layout.val, _maybe(val_idx, len(vr)), progress, train.image_size, vr, train.in_chans == 1)
    return train.at(train_idx), val.at(val_idx)


def _maybe(idx: torch.Tensor, n: int) -> Optional[List[int]]:
    return None if len(idx) == n else sorted(idx.tolist())

