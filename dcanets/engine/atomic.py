"""Files written whole or not at all, and a full disk said in one line.

Every file a run or a search keeps (``last.pt``, ``metrics.json``, ``search.json``) is written to
``<name>.tmp``, flushed to the disk (``fsync``: a rename that reaches the disk before the data
would leave an empty file after a power cut) and renamed over the old one. On any failure the
temporary file is removed and the old file is left as it was: the last complete checkpoint stays
valid. A full disk (``ENOSPC``, or a quota: ``EDQUOT``) becomes :class:`DiskFull`, whose message
names the file and says "no space left" (torch's own error for it is a C++ enforce failure that
never does). Checkpoints are serialized in memory first for that reason: torch writes a file path
from C++, where the errno is lost.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any, Optional

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space left for ``path`` (an ``OSError`` with errno ENOSPC/EDQUOT); one line. ``path`` is
    None when the failed write happened elsewhere (in Ray) and only its message came back."""

    def __init__(self, path: Optional[str | Path], cause: Optional[OSError] = None) -> None:
        super().__init__(cause.errno if cause is not None else errno.ENOSPC, "No space left on device")
        self.path = Path(path) if path else None

    def __reduce__(self) -> Any:
        """Pickled as its path: data-parallel ranks receive rank 0's (``dcanets.engine.distributed.on_main``)."""
        return DiskFull, (str(self.path) if self.path else None,)

    def __str__(self) -> str:
        if self.path is None:
            return "no space left on device; free space on the disk of the output folder"
        return (f"no space left on device writing '{self.path}' (it was not changed, and no temporary file "
                "is left); free space on that disk")


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring); :class:`DiskFull` when full."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in FULL:
            raise DiskFull(path, exc) from None
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`write_bytes`."""
    import torch  # here: the commands' --help and flag errors import this module, and no torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def no_space(exc: Optional[BaseException]) -> Optional[str]:
    """If ``exc`` (or an exception it was raised from, or the text of one that Ray passed along from
    another process) is a full disk: the file it failed to write, ``""`` when unknown; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return str(exc.path or "")
        if isinstance(exc, OSError) and exc.errno in FULL:
            return str(exc.filename or "")
        if "no space left on device" in str(exc).lower():
            return ""
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["DiskFull", "no_space", "torch_save", "write_bytes", "write_text"]
