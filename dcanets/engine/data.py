"""Image data sets decoded once into uint8 tensors, augmented on whole batches with torch ops.

Why: decoding tens of thousands of small JPEG/PNG files per epoch with PIL costs more than the
training step of a CIFAR-sized net on 2 cores. So every source is decoded once into one
``uint8 [N, C, H, W]`` tensor (kept in memory, and on disk under ``$DCANETS_CACHE`` or
``~/.cache/dcanets`` keyed by path + mtime + size), and the training loop only indexes that
tensor, crops/flips the batch with tensor ops and normalizes it.

Sources (``load(spec)``):

- ``"digits"``: ``sklearn.datasets.load_digits`` (1,797 images, 8x8, 1 channel, 10 classes),
  the embedded default: real data that ships with a dependency.
- ``"synthetic"`` or ``"synthetic:N"``: a seeded generated 3x32x32, 10-class set for tests.
- an image-folder directory (``<class>/<file>``, any depth above) or a ``.tar`` of one, read
  through timm's dataset readers (``timm.data.create_dataset("", root=path)``).
- torchvision-format CIFAR-10 (``cifar-10-batches-py``), CIFAR-100 (``cifar-100-python``) or
  MNIST (``MNIST/raw/train-images-idx3-ubyte[.gz]``) directories (the training split).

Images keep their channel count (MNIST 1, CIFAR 3).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from dcanets.engine.distributed import batch_count, epoch_order

CACHE_VERSION = 1
GPU_RESIDENT_BYTES = 2 * 2**30  # decoded sets below this size live on the GPU during training
_MEMORY: Dict[str, "ImageData"] = {}


@dataclass
class ImageData:
    """Decoded images ``uint8 [N, C, H, W]``, integer labels ``[N]`` and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    name: str = ""
    from_cache: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.images[index], self.labels[index], self.classes, self.name)


# ----------------------------------------------------------------------------- sources
def load_digits_data() -> ImageData:
    """sklearn's 8x8 handwritten digits; values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return ImageData(images, torch.from_numpy(d.target.astype(np.int64)),
                     [str(c) for c in d.target_names], "digits")


def synthetic(n: int = 512, num_classes: int = 10, size: int = 32, channels: int = 3,
              seed: int = 0) -> ImageData:
    """A seeded, learnable generated set: one random smooth template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                align_corners=False)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    noise = 0.25 * torch.randn(n, channels, size, size, generator=g)
    images = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, labels, [f"class{i}" for i in range(num_classes)], f"synthetic:{n}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a CIFAR batch file cannot run code.

    torchvision's CIFAR files are pickles of dicts of bytes, lists and uint8 arrays; any other
    global (``os.system`` in a crafted file) is refused instead of called.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays and plain data")
        return super().find_class(module, name)


def _load_array_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read CIFAR batch '{path}': {exc}") from None


def _cifar_pickles(root: Path) -> Optional[ImageData]:
    """torchvision's CIFAR-10/100 python format (training split)."""
    for sub, files, key, meta, meta_key in (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels", "batches.meta", b"label_names"),
        ("cifar-100-python", ["train"], b"fine_labels", "meta", b"fine_label_names"),
    ):
        for base in (root / sub, root):
            if all((base / f).is_file() for f in files) and (base / meta).is_file():
                xs, ys = [], []
                for f in files:
                    d = _load_array_pickle(base / f)
                    xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.extend(d[key])
                names = [n.decode() for n in _load_array_pickle(base / meta)[meta_key]]
                return ImageData(torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64),
                                 names, str(base))
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_idx(root: Path) -> Optional[ImageData]:
    """torchvision's MNIST raw format (``train-images-idx3-ubyte[.gz]``), training split."""
    for base in (root / "MNIST" / "raw", root / "raw", root):
        for ext in ("", ".gz"):
            img, lab = base / f"train-images-idx3-ubyte{ext}", base / f"train-labels-idx1-ubyte{ext}"
            if img.is_file() and lab.is_file():
                x = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
                y = torch.from_numpy(_read_idx(lab).astype(np.int64))
                return ImageData(x, y, [str(i) for i in range(10)], str(base))
    return None


def _decode(blob: bytes, gray: bool) -> torch.Tensor:
    """One image file -> uint8 [C, H, W]; torchvision's decoder is ~3x faster than PIL's."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=mode)
    except RuntimeError:  # formats torchvision cannot read (bmp, tiff, ...): PIL
        from PIL import Image

        im = Image.open(io.BytesIO(blob)).convert("L" if gray else "RGB")
        arr = np.asarray(im)
        return torch.from_numpy(arr[None] if gray else arr.transpose(2, 0, 1).copy())


def _is_gray(blob: bytes) -> bool:
    from PIL import Image

    return Image.open(io.BytesIO(blob)).mode in ("1", "L", "I", "I;16", "LA")


def _image_folder(path: Path, indices: Optional[Sequence[int]], progress: bool) -> ImageData:
    """An image-folder dir or tar through timm's readers, decoded into one uint8 tensor.

    The channel count follows the first image (grayscale stays 1 channel); images whose size
    differs from the first one are resized to it.
    """
    reader = _reader(path)
    n_total = len(reader)
    if n_total == 0:
        if path.is_file() and not _tar_complete(path):
            raise ValueError(f"tar archive '{path}' is truncated: no image could be read; re-create or re-download it")
        raise ValueError(f"no images found in '{path}'; expected <class>/<image> files")
    names = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", {})
    classes = [c for c, _ in sorted(names.items(), key=lambda kv: kv[1])]
    idx = list(range(n_total)) if indices is None else [int(i) for i in indices]

    def where(i: int) -> str:
        """The image's path, as the user would find it: ``dir/class/x.png`` or ``data.tar:class/x.png``."""
        name = reader.filename(i, absolute=True)
        return f"{path}:{name}" if path.is_file() else str(name)

    def blob(i: int) -> Tuple[bytes, int]:
        try:
            f, target = reader[i]
            if isinstance(f, (str, Path)):
                return Path(f).read_bytes(), int(target)
            try:
                return f.read(), int(target)
            finally:
                f.close()
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise ValueError(f"cannot read image '{where(i)}': {exc}") from None

    def decode(i: int, data: bytes, gray: Optional[bool]) -> torch.Tensor:
        try:
            return _decode(data, _is_gray(data) if gray is None else gray)
        except Exception as exc:  # PIL and torchvision raise many kinds; the file is what matters
            if not data:
                reason = "empty file"
            elif type(exc).__name__ == "UnidentifiedImageError":  # its message names a BytesIO, not the file
                reason = "not an image format PIL or torchvision can read, or a damaged file"
            else:
                reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            raise ValueError(f"cannot decode image '{where(i)}' ({reason}); remove or replace the file") from None

    # torchvision 0.29 deprecates its decoders in favour of torchcodec; they are still the fastest here
    warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
    first_img = decode(idx[0], blob(idx[0])[0], None)
    gray = first_img.shape[0] == 1
    it = tqdm(idx, desc=f"decoding {path.name}", unit="img", mininterval=1.0, leave=False, disable=not progress)
    # one preallocated tensor, not a list + stack: half the peak memory on a 50k-image decode
    out = torch.empty((len(idx), *first_img.shape), dtype=torch.uint8)
    labels: List[int] = []
    for k, i in enumerate(it):
        data, target = blob(i)
        out[k] = _fit(decode(i, data, gray), first_img.shape[1:])
        labels.append(target)
    return ImageData(out, torch.tensor(labels, dtype=torch.int64), classes, str(path))


def _fit(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``img`` [C, H, W] to ``size`` when it differs (folders of mixed image sizes)."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    resized = torch.nn.functional.interpolate(img[None].float(), size=tuple(size), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


_READERS: Dict[str, object] = {}


def _reader(path: Path) -> Any:
    """timm's reader for an image folder or tar (indexing a 50k tar takes ~2 s: done once)."""
    from timm.data import create_dataset

    key = _fingerprint(path)  # a rewritten file gets a fresh index
    if key not in _READERS:
        try:
            _READERS[key] = create_dataset("", root=str(path)).reader
        except (RuntimeError, tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if path.is_file() and not _tar_complete(path):
                detail = "" if isinstance(exc, ValueError) else f" ({exc})"  # timm's ValueErrors say nothing useful
                raise ValueError(f"cannot read '{path}': the tar archive is truncated or damaged{detail}; "
                                 "re-create or re-download it") from None
            raise ValueError(f"cannot read image folder '{path}': {exc}; expected <class>/<image> "
                             "files in a directory or a .tar of one") from None
    return _READERS[key]


# ----------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    return Path(os.environ.get("DCANETS_CACHE") or Path.home() / ".cache" / "dcanets")


def _fingerprint(path: Path) -> str:
    """path + mtime + size; for a directory, of every file below it."""
    p = path.resolve()
    if p.is_file():
        st = p.stat()
        parts = [f"{p}|{st.st_mtime_ns}|{st.st_size}"]
    else:
        parts = [str(p)]
        for dirpath, _, files in sorted(os.walk(p)):
            for f in sorted(files):
                st = os.stat(os.path.join(dirpath, f))
                parts.append(f"{dirpath}/{f}|{st.st_mtime_ns}|{st.st_size}")
    return "\n".join(parts)


def _cache_file(path: Path, indices: Optional[Sequence[int]]) -> Path:
    h = hashlib.sha1(f"v{CACHE_VERSION}\n{_fingerprint(path)}".encode())
    if indices is not None:
        h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return cache_dir() / f"{path.name.replace('.', '_')}-{h.hexdigest()[:16]}.pt"


def _cached(path: Path, indices: Optional[Sequence[int]], decode: Callable[[], ImageData]) -> ImageData:
    """Memory cache, then the disk cache, then ``decode()`` (whose result is written to disk)."""
    file = _cache_file(path, indices)
    key = str(file)
    if key in _MEMORY:
        hit = _MEMORY[key]
        return ImageData(hit.images, hit.labels, hit.classes, hit.name, from_cache=True)
    data: Optional[ImageData] = None
    if file.is_file():
        try:
            d = torch.load(file, weights_only=True)
            data = ImageData(d["images"], d["labels"], list(d["classes"]), str(path), from_cache=True)
        except Exception:  # a corrupt or foreign cache file is rebuilt, never trusted
            data = None
    if data is None:
        data = decode()
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            torch.save({"images": data.images, "labels": data.labels, "classes": data.classes}, tmp)
            os.replace(tmp, file)
        except OSError:  # a read-only cache dir only costs the next run a decode
            pass
    _MEMORY[key] = data
    return data


# ----------------------------------------------------------------------------- checks
class DataWarning(UserWarning):
    """Data that can be used but is not what it should be (a truncated tar); the CLI prints one line."""


_WARNED: set = set()


def _tar_complete(path: Path) -> bool:
    """Whether an uncompressed tar ends with its end-of-archive marker (two zero blocks).

    A tar cut short at a member boundary reads without any error: Python's tarfile (and timm's
    readers with it) simply stop at the end of the file, so the missing images would go unnoticed.
    Compressed tars are not checked here (their decompressor reports a cut stream).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(6)
            if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\0":  # gzip, bzip2, xz
                return True
            if size < 1024 or size % 512:
                return False
            fh.seek(size - 1024)
            return not fh.read(1024).strip(b"\0")
    except OSError:
        return False


def _check_data(spec: str, path: Optional[Path], data: ImageData, total: Optional[int] = None) -> ImageData:
    """One line for data a classifier cannot learn from; a warning with counts for a truncated tar."""
    if path is not None and path.is_file() and not _tar_complete(path):
        if len(data) == 0:
            raise ValueError(f"tar archive '{spec}' is truncated: no image could be read; re-create or re-download it")
        count = len(data) if total is None else total
        message = (f"tar archive '{spec}' is truncated (no end-of-archive marker): using only the {count} "
                   f"images in {data.num_classes} classes before the cut; re-create or re-download it for the rest")
        if message not in _WARNED:  # once per process, however often the set is loaded
            _WARNED.add(message)
            warnings.warn(message, DataWarning, stacklevel=3)
    if data.num_classes < 2:
        found = f"only the class '{data.classes[0]}'" if data.classes else "no class"
        raise ValueError(f"data '{spec}' has {found}: a classifier needs at least 2 classes, one "
                         "<class>/ folder of images each (<root>/<class>/<image>)")
    return data


# ----------------------------------------------------------------------------- entry points
def check_path(spec: str) -> Path:
    """The path of a data source given by path, or one line saying why it cannot be one."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data path '{spec}' does not exist; pass 'digits', 'synthetic[:N]', an image-folder "
            "directory or .tar, or a torchvision CIFAR-10/100 or MNIST directory")
    if path.is_file() and not tarfile.is_tarfile(path):
        raise ValueError(f"data file '{spec}' is not a tar archive; pass an image-folder directory "
                         "or a .tar of <class>/<image> files")
    return path


def load(spec: str, indices: Optional[Sequence[int]] = None, progress: bool = True) -> ImageData:
    """Decode a data source (see the module docstring); ``indices`` decodes only those images."""
    data: Optional[ImageData]
    if spec == "digits":
        data = load_digits_data()
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1]) if ":" in spec else 512
        except ValueError:
            raise ValueError(f"bad generated set '{spec}'; use 'synthetic' or 'synthetic:N'") from None
        data = synthetic(n)
    else:
        path = check_path(spec)
        data = (_cifar_pickles(path) or _mnist_idx(path)) if path.is_dir() else None
        if data is None:
            if indices is not None and _fully_cached(path):  # slice the full decode, do not re-decode
                return load(spec, progress=progress).subset(torch.as_tensor(list(indices), dtype=torch.long))
            decoded = _cached(path, indices, lambda: _image_folder(path, indices, progress))
            return _check_data(spec, path, decoded, None if indices is None else source_size(spec))
    assert data is not None
    return data if indices is None else data.subset(torch.as_tensor(list(indices), dtype=torch.long))


def source_size(spec: str) -> int:
    """How many images ``spec`` holds, without decoding image folders."""
    if spec == "digits" or spec.startswith("synthetic"):
        return len(load(spec))
    path = check_path(spec)
    data = (_cifar_pickles(path) or _mnist_idx(path)) if path.is_dir() else None
    if data is not None:
        return len(data)
    if _fully_cached(path):
        return len(load(spec))
    return len(_reader(path))


def _fully_cached(path: Path) -> bool:
    full = _cache_file(path, None)
    return str(full) in _MEMORY or full.is_file()


def forget_decoded() -> None:
    """Drop the decoded sets kept in memory; the disk cache stays (what a new process would find)."""
    _MEMORY.clear()


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


def load_split(spec: str, val_fraction: float = 0.1, seed: int = 0, limit: Optional[int] = None,
               progress: bool = True, val_limit: Optional[int] = None) -> Tuple[ImageData, ImageData]:
    """Train and validation sets of ``spec``; with ``limit`` only the needed images are decoded."""
    n = source_size(spec)
    train, val = split_indices(n, val_fraction, seed, limit, val_limit)
    path_spec = spec not in ("digits",) and not spec.startswith("synthetic")
    if ((limit is None and val_limit is None) or len(train) + len(val) >= n
            or (path_spec and _fully_cached(Path(spec).expanduser()))):
        full = load(spec, progress=progress)
        return full.subset(train), full.subset(val)
    wanted = torch.cat([train, val])
    order = torch.sort(wanted).values  # decode in file order: sequential tar reads
    part = load(spec, indices=order.tolist(), progress=progress)
    pos = torch.searchsorted(order, wanted)
    return part.subset(pos[: len(train)]), part.subset(pos[len(train):])


# ----------------------------------------------------------------------------- batches
def channel_stats(images: torch.Tensor, max_images: int = 10000) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std in [0, 1] units (of at most ``max_images`` images)."""
    x = images[:max_images].to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def normalized(images: torch.Tensor, stats: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images as the engine feeds them, ``(x / 255 − mean) / std`` per channel, in
    float32; ``stats`` (mean, std) default to these images' own :func:`channel_stats`."""
    mean, std = channel_stats(images) if stats is None else stats
    return (images.float() / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     flip: bool = True, of: Tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Pad-``pad`` random crop + horizontal flip of a whole batch ``[B, C, H, W]`` at once.

    Zero padding, as torchvision's ``RandomCrop(padding=4)``; the per-sample offsets become one
    gather instead of B slicing calls. ``of=(i, k)``: x is part i of k of a batch, drawn as the whole.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b * of[1],), generator=generator)[of[0] * b:(of[0] + 1) * b]
    dx = torch.randint(0, 2 * pad + 1, (b * of[1],), generator=generator)[of[0] * b:(of[0] + 1) * b]
    rows = (dy[:, None] + torch.arange(h)).to(x.device)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)
    if flip:
        mirror = (torch.rand(b * of[1], generator=generator)[of[0] * b:(of[0] + 1) * b] < 0.5).to(x.device)
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Batches of a decoded set: index the uint8 cache, augment, move to device, normalize.

    Shuffling and augmentation draw from a generator seeded with ``(seed, epoch)``, so an epoch
    is the same whether it runs in one process or after a resume. ``data_seconds`` accumulates
    the time spent producing batches (indexing + augmentation + transfer + normalization).
    """

    rank, world_size = 0, 1  # data parallel: this rank's batches (dcanets.engine.distributed.epoch_order)

    def __init__(self, data: ImageData, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: bool = False, drop_last: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0, channels_last: bool = False) -> None:
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.drop_last, self.device, self.seed, self.epoch = drop_last, torch.device(device), seed, 0
        c = data.in_chans
        self.images, self.labels = data.images, data.labels
        self.pin = self.device.type == "cuda"
        if self.pin and data.images.nbytes < GPU_RESIDENT_BYTES:  # CIFAR-10 is 150 MB: keep it on the GPU
            self.images, self.labels = data.images.to(self.device), data.labels.to(self.device)
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
        order = order.to(self.images.device)
        self.data_seconds += time.perf_counter() - t0
        for k in range(len(self)):
            t0 = time.perf_counter()
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = random_crop_flip(x, g, of=(self.rank, self.world_size))
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=pin)
            y = y.to(self.device, non_blocking=pin)
            x = ((x.float() - self.mean) * self.inv_std).contiguous(memory_format=self.memory_format)
            self.data_seconds += time.perf_counter() - t0
            yield x, y


def write_image_folder(data: ImageData, root: Path | str, ext: str = "png") -> Path:
    """Write ``data`` as ``root/<class>/<i>.<ext>`` (tests and examples build folders with it)."""
    from PIL import Image

    root = Path(root)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        d = root / data.classes[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        arr = img.numpy()
        im = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
        im.save(d / f"{i:05d}.{ext}")
    return root


def write_image_tar(data: ImageData, tar_path: Path | str, ext: str = "png") -> Path:
    """Write ``data`` as a tar of ``train/<class>/<i>.<ext>``, the layout of the shared data sets."""
    tar_path = Path(tar_path)
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(data, Path(tmp) / "train", ext)
        with tarfile.open(tar_path, "w") as tf:
            tf.add(Path(tmp) / "train", arcname="train")
    return tar_path
