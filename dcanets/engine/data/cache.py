"""The decode cache: a decoded image folder or tar on disk, keyed by what was decoded and checksummed.

Key (the file's name holds its hash): the cache version, the source's resolved path, the decode
settings (size, channels), and for every image actually decoded its name, class, size, mtime and
ctime, following symlinks as timm's folder reader does (``os.stat``); for a tar, every member's
name, class, size and mtime plus the tar file's own size, mtime and ctime. So an image added under
a symlinked class folder, a tar rebuilt with one more member, or a same-size edit with the mtime
kept (the ctime changes) gives a new key, and the stale file is simply never read again.

Each file also holds a BLAKE2b checksum of its images, labels, class names and key; a file whose
checksum does not match (altered labels, a damaged disk) is rebuilt, never used. Files are
written atomically (a temporary file renamed into place) and loaded with ``mmap``: the images stay
in the page cache instead of being copied into the process. The name is ``<source>-<hash>.pt`` with
the source's name cut to 32 characters, so any data path length works.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from dcanets.engine.data.layout import Part, classes_of, member_name, targets_of, warn_once
from dcanets.engine.data.sources import ImageData

CACHE_VERSION = 2
_MEMORY: Dict[str, ImageData] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("DCANETS_CACHE") or Path.home() / ".cache" / "dcanets")


def decode_key(part: Part, r: Any, indices: Optional[Sequence[int]], settings: str) -> str:
    """The hash of what a decode of images ``indices`` (all: None) of ``part`` reads (module docstring)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\n{part.path.resolve()}\n{part.prefix}\n{settings}\n".encode())
    is_tar = part.path.is_file()
    if is_tar:
        st = part.path.stat()
        h.update(f"tar {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
    targets = targets_of(r)
    for i in range(len(r)) if indices is None else indices:
        if is_tar:
            info = r.samples[i][0]
            stamp = f"{info.size} {info.mtime}"
        else:
            st = os.stat(r.samples[i][0])  # follows symlinks, as the reader's os.walk(followlinks=True)
            stamp = f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
        h.update(f"{member_name(r, i)}\0{targets[i]}\0{stamp}\n".encode())
    h.update(json.dumps(sorted(classes_of(r).items())).encode())
    return h.hexdigest()


def cache_file(part: Part, key: str) -> Path:
    """``<source name, 32 characters at most>-<key hash>.pt``: a long data path still makes a valid name."""
    name = f"{part.path.name}_{part.prefix}" if part.prefix else part.path.name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:32] or "data"
    return cache_dir() / f"{stem}-{key[:24]}.pt"


def checksum(images: torch.Tensor, labels: torch.Tensor, origin: torch.Tensor, classes: Sequence[str],
             key: str) -> str:
    """BLAKE2b of everything a cache file holds; read straight from the (mmap'd) tensors' memory."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{key}\n{json.dumps(list(classes))}\n{tuple(images.shape)}\n".encode())
    for t in (labels, origin, images):
        h.update(t.contiguous().numpy().data)  # the tensor's memory itself, no copy
    return h.hexdigest()


def _read(file: Path, key: str, name: str) -> Optional[ImageData]:
    """The file's set if it is this key's and its checksum holds; None (rebuild) otherwise."""
    try:
        d = torch.load(file, weights_only=True, mmap=True)
        data = ImageData(d["images"], d["labels"], list(d["classes"]), name, from_cache=True)
        ok = d["key"] == key and d["checksum"] == checksum(d["images"], d["labels"], d["origin"], d["classes"], key)
    except Exception:  # a damaged or foreign file is rebuilt, never trusted
        ok = False
    if not ok:
        warn_once(f"decode cache file '{file}' does not match its checksum or key (altered or damaged): "
                  "decoding again")
        return None
    data.origin = d["origin"]
    return data


def _write(file: Path, data: ImageData, key: str) -> None:
    origin = data.origin if data.origin is not None else torch.arange(len(data))
    blob = {"images": data.storage, "labels": data.label_storage, "classes": data.classes, "origin": origin,
            "key": key, "checksum": checksum(data.storage, data.label_storage, origin, data.classes, key)}
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, file)
    except OSError:  # a read-only or full cache dir only costs the next run a decode
        tmp.unlink(missing_ok=True)


def cached(part: Part, r: Any, indices: Optional[Sequence[int]], settings: str,
           decode: Callable[[], ImageData]) -> ImageData:
    """Memory, then the disk cache, then ``decode()`` (whose result is written to disk)."""
    key = decode_key(part, r, indices, settings)
    file = cache_file(part, key)
    hit = _MEMORY.get(str(file))
    if hit is not None:
        return _again(hit)
    data = _read(file, key, str(part)) if file.is_file() else None
    if data is None:
        data = decode()
        _write(file, data, key)
    _MEMORY[str(file)] = data
    return data


def _again(hit: ImageData) -> ImageData:
    data = ImageData(hit.storage, hit.label_storage, hit.classes, hit.name, from_cache=True)
    data.origin = hit.origin
    return data


def is_cached(part: Part, r: Any, settings: str) -> bool:
    """Whether the full decode of ``part`` with ``settings`` is in memory or on disk."""
    file = cache_file(part, decode_key(part, r, None, settings))
    return str(file) in _MEMORY or file.is_file()


def forget() -> None:
    _MEMORY.clear()
