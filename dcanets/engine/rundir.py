"""The run folder (``output``): one run at a time, and never a fresh run over an earlier one.

Why: two ``dcanets train`` into one ``--output`` both wrote ``last.pt`` and ``metrics.json`` and
one result vanished; a fresh run into the folder of a finished run replaced it without a word.
So a run holds a lock on its folder while it runs (:class:`FolderLock`, ``.dcanets.lock``): a
second run is refused in one line naming the holder (pid, host, since when). And a fresh run (no
resume) into a folder that holds a run (``last.pt`` or ``metrics.json``) is refused, with the
``--resume`` command that continues that run: dcanets never replaces a run's files, and never
renames an output the user chose (timm's train.py numbers its folders instead; here only the
default name is numbered, :func:`unused`, since a script reads results from the folder it named).

Under data parallelism rank 0 alone holds the lock and makes the checks, for every rank of the run.
The lock is ``flock(2)`` on the lock file, so the kernel releases it when its holder ends, however
it ends (SIGKILL, a power cut): a stale lock cannot exist. The file keeps the last holder's pid
and host for the message; ``flock`` reaches other machines on NFS v4 shares.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

LOCK = ".dcanets.lock"
RUN_FILES = ("last.pt", "metrics.json")  # a folder holding one of these holds a run
F = TypeVar("F", bound=Callable[..., Any])


class RunFolderError(ValueError):
    """An output folder a run may not use (in use, or holding another run): one line."""


def prepare_output(output: str | Path) -> Path:
    """Create the output directory and check it is writable, before any data is decoded."""
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output '{output}' is a file, not a directory; pass a directory for last.pt and metrics.json")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".dcanets-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot write to output directory '{output}': {reason}; pass a writable --output") from None
    return out_dir


class FolderLock:
    """An exclusive ``flock`` on ``path`` that says who holds it.

    ``acquire`` does not block unless given ``wait`` seconds; once held, the file records this
    process (pid, host, command, time) for :meth:`holder`. Released by :meth:`release`, or by the
    kernel when the process ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, wait: float = 0.0) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        self._fd = fd
        return True

    def record_holder(self) -> None:
        """Write this process into the lock file (after acquiring; read by a refused process)."""
        assert self._fd is not None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:2]),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode(), 0)

    def holder(self) -> str:
        """``pid 123 on host h (python -m dcanets), since ...``, as the lock file says."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info.get("pid"):
            return "a process that has not said which"
        text = (f"pid {info['pid']} on host {info.get('host', '?')} ({info.get('command', '?')}), "
                f"since {info.get('since')}")
        if info.get("host") == socket.gethostname() and not _alive(int(info["pid"])):
            text += "; that process has ended, but a process it started still holds the lock"
        return text

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def claimed(output: str | Path | None, resume: str | Path | None = None) -> Iterator[Optional[Path]]:
    """The run's output folder, created and locked for the duration of the block (None: no output).

    Refused in one :class:`RunFolderError` line: a folder another run holds, and a folder that holds
    a run unless the run resumes that very folder (``resume`` is it or its ``last.pt``). Data
    parallel (a process group joined before, ``dcanets.engine.distributed``): rank 0 alone claims
    the folder, for the run's every rank, and its refusal is every rank's (none waits on it).
    """
    if not output:
        yield None
        return
    from dcanets.engine import distributed  # here: it imports torch, and flag errors need none

    world = distributed.current()
    lock = distributed.on_main(lambda: _claim(output, resume), world)
    try:
        yield Path(output)
    finally:
        if lock is not None:
            lock.release()


def _claim(output: str | Path, resume: str | Path | None) -> FolderLock:
    """``output`` created and locked by this process, after the checks of :func:`claimed`."""
    folder = prepare_output(output)
    lock = FolderLock(folder / LOCK)
    if not lock.acquire():
        raise RunFolderError(f"output '{output}' is in use by another run ({lock.holder()}); wait for it to end, "
                             "or pass another output folder")
    try:
        if not _resumes(folder, resume):
            refuse_earlier_run(folder, output)
        lock.record_holder()
    except BaseException:
        lock.release()
        raise
    return lock


def _resumes(folder: Path, resume: str | Path | None) -> bool:
    return resume is not None and folder_of(resume).resolve() == folder.resolve()


def folder_of(resume: str | Path) -> Path:
    """The run folder of a ``resume`` argument (a run folder or its ``last.pt``); FileNotFoundError's
    one line when there is no checkpoint."""
    from dcanets.engine.checkpoint import checkpoint_file  # here: checkpoint imports torch, flag errors need none

    return checkpoint_file(resume).parent


def refuse_earlier_run(folder: Path, output: str | Path) -> None:
    """One line when ``folder`` holds a run: a fresh run there would replace its files."""
    held = [name for name in RUN_FILES if (folder / name).exists()]
    if not held:
        return
    raise RunFolderError(f"output '{output}' holds {describe_run(folder)} ({', '.join(held)}); a new run there would "
                         f"replace it: pass another output folder, or continue it with: dcanets train --resume "
                         f"{output}" + (" --epochs N" if (folder / "metrics.json").exists() else ""))


def describe_run(folder: Path) -> str:
    """``a finished run, epoch 2 of 2``, ``a run that diverged at epoch 1``, ``an unfinished run``."""
    try:
        record = json.loads((folder / "metrics.json").read_text())
        epoch, epochs = record["final"]["epoch"], record["config"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "an unfinished run"
    if record["final"].get("diverged"):
        return f"a run that diverged at epoch {epoch}"
    return f"a finished run, epoch {epoch} of {epochs}"


def holds_output(train: F) -> F:
    """``train(cfg, ..., resume=...)`` run inside :func:`claimed` for ``cfg.output``: the engine's
    every run (``dcanets train``, a search trial, a reproduction) holds its folder while it runs."""
    signature = inspect.signature(train)

    @functools.wraps(train)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs).arguments
        cfg = bound["cfg"]
        cfg.validate()  # an invalid config is its own one line, before any folder is made
        with claimed(cfg.output, bound.get("resume")):
            return train(*args, **kwargs)

    return run  # type: ignore[return-value]


def unused(base: Path) -> Path:
    """``base``, else ``base-2``, ``base-3``, ...: the first name nothing has taken (default outputs)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def resume_output(resume: str | Path, given: str | Path | None) -> str:
    """The folder a ``--resume`` writes into: the one it resumed from (the checkpoint's saved output
    may be another run's folder now, or a search trial's temporary one). ``given``: an output the
    user also named, refused in one line when it is another folder."""
    folder = folder_of(resume)
    if given and Path(given).resolve() != folder.resolve():
        raise ValueError(f"--resume {resume} continues the run in its own folder '{folder}', not output '{given}': "
                         "drop --output (to continue a copy elsewhere, copy the folder and resume the copy)")
    return str(folder)


def resume_hint(output: str | Path) -> str:
    """The command that continues the run in ``output``, or why there is none."""
    import shlex

    if (Path(output) / "last.pt").is_file():
        return f"continue with: dcanets train --resume {shlex.quote(str(output))}"
    return "no checkpoint was written, nothing to resume"


__all__ = ["LOCK", "RUN_FILES", "FolderLock", "RunFolderError", "claimed", "describe_run", "folder_of", "holds_output",
           "prepare_output", "refuse_earlier_run", "resume_hint", "resume_output", "unused"]
