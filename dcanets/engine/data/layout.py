"""Where the images of a data path are: timm's readers, timm's split layout, and the checks on both.

A path is read by timm's own readers (``timm.data.create_dataset``: ``ReaderImageFolder`` for a
directory, following symlinks; ``ReaderImageInTar`` for a ``.tar``), built once per process
(:func:`reader`). The layout follows timm's ``train.py``:

- a root holding a training split folder (``train/``, ``training/``) and a validation split folder
  (``val/``, ``valid/``, ``validation/``, ``eval/``, ``evaluation/``: timm's synonyms), or a tar
  whose top-level folders are such splits, uses them as the two splits (``train_split`` /
  ``val_split`` pick other folder names);
- anything else is one set of ``<class>/<image>`` folders (any depth above; the leaf folder is the
  class), split by a fixed-seed permutation.

Refused in one line: a validation split without a training split, two validation folders, split
folders beside other folders, an empty split, a compressed tar. Tar members with an absolute or
``../`` name are dropped with a warning: timm would make their folders extra classes.
"""
from __future__ import annotations

import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

TRAIN_SPLITS = ("train", "training")  # timm's _TRAIN_SYNONYM, in its order
VAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")  # timm's _EVAL_SYNONYM
OTHER_SPLITS = ("test", "testing")  # may sit beside the two splits
_READERS: Dict[Tuple[Any, ...], Any] = {}


class DataWarning(UserWarning):
    """Data that can be used but is not what it should be (a truncated tar, skipped images); the CLI
    prints one line."""


_WARNED: set = set()


def warn_once(message: str) -> None:
    """A :class:`DataWarning`, once per process however often the set is loaded."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, DataWarning, stacklevel=3)


@dataclass(frozen=True)
class Part:
    """One readable set of class folders: a directory or tar, optionally only its members under
    ``prefix/`` (a split inside a tar)."""

    path: Path
    prefix: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.path}:{self.prefix}/" if self.prefix else str(self.path)


@dataclass(frozen=True)
class Layout:
    """The training part, and the validation part when the data has its own (timm's layout)."""

    train: Part
    val: Optional[Part] = None


def check_path(spec: str) -> Path:
    """The path of a data source given by path, or one line saying why it cannot be one."""
    path = Path(spec).expanduser()
    prefix = spec.split("/", 1)[0]
    if not path.exists() and prefix in ("wds", "hfds", "hfids", "tfds", "torch"):
        raise ValueError(f"data '{spec}': timm's {prefix}/ datasets are not read by dcanets (iterable, or downloaded); "
                         "pass an image-folder directory or .tar (timm's train/ + val/ layout works)")
    if not path.exists():
        raise FileNotFoundError(
            f"data path '{spec}' does not exist; pass 'digits', 'synthetic[:N]', an image-folder "
            "directory or .tar, or a torchvision CIFAR-10/100 or MNIST directory")
    if path.is_file():
        if _compressed(path):
            raise ValueError(f"data file '{spec}' is a compressed tar: timm's readers need random access to an "
                             f"uncompressed .tar; decompress it first (e.g. gunzip -k, or tar -xf into a folder)")
        if not tarfile.is_tarfile(path):
            raise ValueError(f"data file '{spec}' is not a tar archive; pass an image-folder directory "
                             "or a .tar of <class>/<image> files")
        if path.suffix.lower() != ".tar":
            raise ValueError(f"data file '{spec}' is a tar archive without the .tar suffix timm's readers need; "
                             "rename it to <name>.tar")
    return path


def _compressed(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\0"


def tar_complete(path: Path) -> bool:
    """Whether an uncompressed tar ends with its end-of-archive marker (two zero blocks).

    A tar cut short at a member boundary reads without any error: Python's tarfile (and timm's
    readers with it) simply stop at the end of the file, so the missing images would go unnoticed.
    """
    try:
        size = path.stat().st_size
        if size < 1024 or size % 512:
            return False
        with open(path, "rb") as fh:
            fh.seek(size - 1024)
            return not fh.read(1024).strip(b"\0")
    except OSError:
        return False


# ----------------------------------------------------------------------------- readers
def _stat_key(path: Path) -> Tuple[Any, ...]:
    """What tells a listing made earlier in this process is stale: the tar's or root's stat, and for a
    folder the mtimes of its class folders (through symlinks), which change when an image is added."""
    st = path.stat()
    key: Tuple[Any, ...] = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if path.is_dir():
        key += tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_dir()))
    return key


def classes_of(r: Any) -> Dict[str, int]:
    """A timm reader's class-name -> index map (the folder and tar readers name it differently)."""
    return dict(getattr(r, "class_to_idx", None) or getattr(r, "class_name_to_idx", {}))


def targets_of(r: Any) -> List[int]:
    if hasattr(r, "targets"):
        return [int(t) for t in r.targets]
    return [int(t) for _, t in r.samples]


def member_name(r: Any, i: int) -> str:
    """The name of image ``i`` inside its source (a tar member name, or the path below the root)."""
    return str(r.filename(i))


def restrict(r: Any, keep: Sequence[int], class_to_idx: Optional[Dict[str, int]] = None) -> Any:
    """Keep images ``keep`` of reader ``r`` and renumber the classes: those left (timm's natural
    order), or ``class_to_idx`` (a validation split takes the training split's numbers)."""
    import numpy as np
    from timm.utils.misc import natural_key

    names = {v: k for k, v in classes_of(r).items()}
    labels = [names[t] for t in (targets_of(r)[i] for i in keep)]
    if class_to_idx is None:
        class_to_idx = {c: k for k, c in enumerate(sorted(set(labels), key=natural_key))}
    new_targets = [class_to_idx[c] for c in labels]
    if hasattr(r, "targets"):  # ReaderImageInTar: arrays of (TarInfo, tar, child) and targets
        r.samples = r.samples[np.asarray(keep, dtype=np.int64)] if len(keep) else r.samples[:0]
        r.targets = np.asarray(new_targets, dtype=np.int64)
        r.class_name_to_idx = dict(class_to_idx)
        r.class_idx_to_name = {v: k for k, v in class_to_idx.items()}
    else:  # ReaderImageFolder: a list of (path, target)
        r.samples = [(r.samples[i][0], t) for i, t in zip(keep, new_targets)]
        r.class_to_idx = dict(class_to_idx)
    return r


def _unsafe(name: str) -> bool:
    """An absolute tar member name, or one with a ``..`` component: it names a place outside the archive."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def _top(name: str) -> str:
    return name.lstrip("./").split("/", 1)[0]


def reader(part: Part) -> Any:
    """timm's reader of ``part``, built once per process (indexing a 50k tar takes ~2 s, walking a
    folder one ``os.walk``); a tar rewritten since gets a fresh one. Unsafe tar members are dropped;
    a split inside a tar is a copy of the whole tar's reader restricted to its members."""
    import copy

    from timm.data import create_dataset

    key = (*_stat_key(part.path), part.prefix)
    if key in _READERS:
        return _READERS[key]
    if part.prefix is not None:
        whole = reader(Part(part.path))
        r = copy.copy(whole)
        restrict(r, [i for i in range(len(whole)) if _top(member_name(whole, i)) == part.prefix])
    else:
        try:
            r = create_dataset("", root=str(part.path), search_split=False).reader
        except (RuntimeError, tarfile.TarError, OSError, EOFError, ValueError, AssertionError) as exc:
            raise _unreadable(part.path, exc) from None
        if part.path.is_file():
            _drop_unsafe(part.path, r)
    _READERS[key] = r
    return r


def _drop_unsafe(path: Path, r: Any) -> None:
    names = [member_name(r, i) for i in range(len(r))]
    bad = [n for n in names if _unsafe(n)]
    if bad:
        warn_once(f"tar archive '{path}': ignored {len(bad)} member(s) with an absolute or '../' name "
                  f"(e.g. '{bad[0]}'): they would become classes outside the archive's folders")
        restrict(r, [i for i, n in enumerate(names) if not _unsafe(n)])


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    if path.is_file() and not tar_complete(path):
        detail = "" if isinstance(exc, (ValueError, AssertionError)) else f" ({exc})"  # timm's say nothing useful
        return ValueError(f"cannot read '{path}': the tar archive is truncated or damaged{detail}; "
                          "re-create or re-download it")
    if isinstance(exc, RuntimeError) and "Found 0 images" in str(exc):
        return ValueError(f"no images found in '{path}'; expected <class>/<image> files (.png, .jpg, .jpeg)")
    return ValueError(f"cannot read image folder '{path}': {exc}; expected <class>/<image> "
                      "files in a directory or a .tar of one")


def forget_readers() -> None:
    _READERS.clear()


# ----------------------------------------------------------------------------- layout
def _pick(found: Sequence[str], wanted: Optional[str], synonyms: Sequence[str], where: str,
          flag: str) -> Optional[str]:
    """The split folder among ``found``: ``wanted`` exactly, or the one of timm's synonyms."""
    if wanted is not None:
        if wanted not in found:
            raise ValueError(f"{flag}='{wanted}': no folder '{wanted}' in '{where}' (found: "
                             f"{', '.join(sorted(found)) or 'none'})")
        return wanted
    hits = [s for s in synonyms if s in found]
    if len(hits) > 1:
        raise ValueError(f"'{where}' has {' and '.join(h + '/' for h in hits)}: pick one with {flag}")
    return hits[0] if hits else None


def resolve(path: Path, train_split: Optional[str] = None, val_split: Optional[str] = None) -> Layout:
    """The :class:`Layout` of an image-folder directory or tar (see the module docstring)."""
    if path.is_dir():
        found = sorted(e.name for e in os.scandir(path) if e.is_dir())
    else:
        r = reader(Part(path))
        found = sorted({_top(member_name(r, i)) for i in range(len(r))} - {""})
    train = _pick(found, train_split, TRAIN_SPLITS, str(path), "train_split")
    val = _pick(found, val_split, VAL_SPLITS, str(path), "val_split")
    if val is None:
        if train_split is not None:  # a training split asked for by name, no validation folder: split it
            return Layout(_part(path, train))
        return Layout(Part(path))  # class folders (a lone train/ is a prefix above them, as in timm)
    if train is None:
        raise ValueError(f"'{path}' has a validation folder '{val}/' but no training folder (train/); "
                         "add it, or pass the folder to train on as data")
    others = [f for f in found if f not in (train, val) and f not in (*TRAIN_SPLITS, *VAL_SPLITS, *OTHER_SPLITS)]
    if others:
        raise ValueError(f"'{path}' mixes split folders ({train}/, {val}/) with other folders "
                         f"({', '.join(o + '/' for o in others[:3])}): keep the splits alone, "
                         "or pass one folder as data")
    return Layout(_part(path, train), _part(path, val))


def _part(root: Path, split: Optional[str]) -> Part:
    if split is None:
        return Part(root)
    return Part(root / split) if root.is_dir() else Part(root, split)


def split_reader(part: Part, what: str) -> Any:
    """The reader of one of the data's own splits (``what``: training or validation); an empty one refused."""
    try:
        r = reader(part)
    except ValueError as exc:
        if not str(exc).startswith("no images found"):
            raise
        r = []
    if len(r) == 0:
        raise ValueError(f"{what} split '{part}' has no images; put <class>/<image> files in it")
    return r


def val_reader(train_r: Any, part: Part) -> Any:
    """The validation split's reader, with the training split's class numbers; a class folder the
    training split lacks is refused (its images could never be right)."""
    import copy

    r = copy.copy(split_reader(part, "validation"))  # renumbered below: the cached listing stays as timm made it
    train_classes = classes_of(train_r)
    extra = sorted(set(classes_of(r)) - set(train_classes))
    if extra:
        raise ValueError(f"validation split '{part}' has class folders the training split lacks: "
                         f"{', '.join(extra[:5])}; both splits need the same <class>/ folders")
    return restrict(r, list(range(len(r))), train_classes)


def class_names(r: Any) -> List[str]:
    return [c for c, _ in sorted(classes_of(r).items(), key=lambda kv: kv[1])]


def check_classes(spec: str, classes: List[str]) -> None:
    if len(classes) < 2:
        found = f"only the class '{classes[0]}'" if classes else "no class"
        raise ValueError(f"data '{spec}' has {found}: a classifier needs at least 2 classes, one "
                         "<class>/ folder of images each (<root>/<class>/<image>)")


def open_blob(r: Any, i: int, where: Callable[[int], str]) -> Tuple[bytes, int]:
    """The bytes and class of image ``i``; one line naming the image if it cannot be read."""
    try:
        f, target = r[i]
        try:
            return f.read(), int(target)
        finally:
            f.close()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise ValueError(f"cannot read image '{where(i)}': {exc}") from None


def locator(part: Part, r: Any) -> Callable[[int], str]:
    """Image ``i``'s path as the user finds it: ``dir/class/x.png`` or ``data.tar:class/x.png``."""
    if part.path.is_file():
        return lambda i: f"{part.path}:{r.filename(i)}"
    return lambda i: str(r.filename(i, absolute=True))
