"""Decoded image sets (``ImageData``) and the sources that are in memory from the start.

``ImageData`` holds ``uint8 [N, C, H, W]`` images, labels and class names; ``subset`` returns a
view (a row index into the same storage), never a copy, so a train/validation split of a decoded
set costs no memory. Sources here: sklearn's digits, a seeded generated set, torchvision-format
CIFAR-10/100 and MNIST directories; image folders and tars are decoded by :mod:`.cached`.
"""
from __future__ import annotations

import gzip
import pickle
import tarfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch


class ImageData:
    """Decoded images ``uint8 [N, C, H, W]``, integer labels ``[N]`` and the class names.

    ``index`` (optional) makes this a view: row ``k`` is row ``index[k]`` of the storage. The
    engine reads batches with :meth:`take`, which gathers only the batch; ``images`` and
    ``labels`` materialize the whole view (for small sets, tests and tools). ``origin`` (decoded
    image folders) is each storage row's image number in its source; :meth:`at` selects by it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: List[str], name: str = "",
                 from_cache: bool = False, index: Optional[torch.Tensor] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name}: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.storage, self.label_storage, self.classes, self.name = images, labels, list(classes), name
        self.from_cache = from_cache
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long)
        self.origin: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.label_storage) if self.index is None else len(self.index)

    def __repr__(self) -> str:
        return f"ImageData({self.name!r}, {len(self)} x {self.in_chans}x{self.image_size[0]}x{self.image_size[1]})"

    def rows(self, k: torch.Tensor) -> torch.Tensor:
        """Storage rows of the view's rows ``k``."""
        return k if self.index is None else self.index.to(k.device)[k]

    def take(self, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the view's rows ``k`` (a gather of just those rows)."""
        r = self.rows(k)
        return self.storage[r.to(self.storage.device)], self.label_storage[r.to(self.label_storage.device)]

    @property
    def images(self) -> torch.Tensor:
        return self.storage if self.index is None else self.storage[self.index]

    @property
    def labels(self) -> torch.Tensor:
        return self.label_storage if self.index is None else self.label_storage[self.index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.storage.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.storage.shape[2]), int(self.storage.shape[3])

    @property
    def nbytes(self) -> int:
        """Bytes of this view's images (what a copy of it would take)."""
        return len(self) * self.storage[0].numel() if len(self.storage) else 0

    def subset(self, index: torch.Tensor | Sequence[int]) -> "ImageData":
        """A view of rows ``index`` of this set, sharing its storage."""
        k = torch.as_tensor(index, dtype=torch.long)
        view = ImageData(self.storage, self.label_storage, self.classes, self.name, self.from_cache, self.rows(k))
        view.origin = self.origin
        return view

    def at(self, source_index: torch.Tensor) -> "ImageData":
        """A view of the images numbered ``source_index`` in their source, in that order; images the
        decode skipped (see :mod:`.decode`) are left out. Without ``origin``, storage row = number."""
        wanted = torch.as_tensor(source_index, dtype=torch.long)
        if self.origin is None and self.index is None:
            return self.subset(wanted)
        numbers = torch.arange(len(self.storage)) if self.origin is None else self.origin
        numbers = numbers if self.index is None else numbers[self.index]  # the source number of each row
        order = torch.argsort(numbers)
        ranked = numbers[order]
        pos = torch.searchsorted(ranked, wanted).clamp(max=max(len(ranked) - 1, 0))
        found = ranked[pos] == wanted if len(ranked) else torch.zeros_like(wanted, dtype=torch.bool)
        return self.subset(order[pos[found]])


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


def generated(spec: str) -> Optional[ImageData]:
    """``digits`` and ``synthetic[:N]``; None for any other spec."""
    if spec == "digits":
        return load_digits_data()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1]) if ":" in spec else 512
        except ValueError:
            raise ValueError(f"bad generated set '{spec}'; use 'synthetic' or 'synthetic:N'") from None
        return synthetic(n)
    return None


def is_generated(spec: str) -> bool:
    return spec == "digits" or spec == "synthetic" or spec.startswith("synthetic:")


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


_CIFAR = (("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), b"labels", "batches.meta",
           b"label_names"),
          ("cifar-100-python", ("train",), b"fine_labels", "meta", b"fine_label_names"))


def _cifar_layout(root: Path) -> Optional[Tuple[Path, Tuple[str, ...], bytes, str, bytes]]:
    for sub, files, key, meta, meta_key in _CIFAR:
        for base in (root / sub, root):
            if all((base / f).is_file() for f in files) and (base / meta).is_file():
                return base, files, key, meta, meta_key
    return None


def cifar_pickles(root: Path) -> Optional[ImageData]:
    """torchvision's CIFAR-10/100 python format (training split)."""
    found = _cifar_layout(root)
    if found is None:
        return None
    base, files, key, meta, meta_key = found
    xs, ys = [], []
    for f in files:
        d = _load_array_pickle(base / f)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(d[key])
    names = [n.decode() for n in _load_array_pickle(base / meta)[meta_key]]
    return ImageData(torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64), names, str(base))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_files(root: Path) -> Optional[Tuple[Path, Path, Path]]:
    for base in (root / "MNIST" / "raw", root / "raw", root):
        for ext in ("", ".gz"):
            img, lab = base / f"train-images-idx3-ubyte{ext}", base / f"train-labels-idx1-ubyte{ext}"
            if img.is_file() and lab.is_file():
                return base, img, lab
    return None


def mnist_idx(root: Path) -> Optional[ImageData]:
    """torchvision's MNIST raw format (``train-images-idx3-ubyte[.gz]``), training split."""
    found = _mnist_files(root)
    if found is None:
        return None
    base, img, lab = found
    x = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(lab).astype(np.int64))
    return ImageData(x, y, [str(i) for i in range(10)], str(base))


def is_torchvision_dir(path: Path) -> bool:
    """Whether ``path`` is a torchvision CIFAR or MNIST directory (files present; nothing read)."""
    return path.is_dir() and (_cifar_layout(path) is not None or _mnist_files(path) is not None)


def torchvision_format(path: Path) -> Optional[ImageData]:
    """A torchvision CIFAR or MNIST directory, decoded; None for anything else."""
    if not path.is_dir():
        return None
    return cifar_pickles(path) or mnist_idx(path)


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


def write_jpeg_folder(root: Path | str, n: int, num_classes: int = 10, sizes: Tuple[int, int] = (200, 320),
                      seed: int = 0, quality: int = 90) -> Path:
    """``n`` generated photo-like JPEGs as ``root/<class>/<i>.jpg``, each of a random width and height in
    ``sizes``: a smooth per-class colour template plus noise (learnable, and compressing like a photo).
    Two calls with other seeds make timm's ``train/`` and ``val/`` (tests, ``benchmarks/data_scale.py``)."""
    from PIL import Image

    root = Path(root)
    templates = np.random.default_rng(12345).integers(0, 256, (num_classes, 4, 4, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % num_classes
        w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        smooth = np.asarray(Image.fromarray(templates[c]).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = (smooth + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"class{c:03d}" / f"{i:06d}.jpg", quality=quality)
    return root


def write_image_tar(data: ImageData, tar_path: Path | str, ext: str = "png") -> Path:
    """Write ``data`` as a tar of ``train/<class>/<i>.<ext>``, the layout of the shared data sets."""
    import tempfile

    tar_path = Path(tar_path)
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(data, Path(tmp) / "train", ext)
        with tarfile.open(tar_path, "w") as tf:
            tf.add(Path(tmp) / "train", arcname="train")
    return tar_path
