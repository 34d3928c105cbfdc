"""Where Ray Tune keeps a search: the search folder itself, or storage that every node reaches.

Why: Ray Tune writes each trial's checkpoints from the node that runs the trial, and its
experiment state from the driver, under ``RunConfig(storage_path)``. The search folder on the
driver's disk (``<output>/<name>-<time>/``, the default) serves one machine; on a cluster the
checkpoints written on another node never reach it, and ``--resume`` cannot continue those
trials. ``storage:`` (or ``--storage``) names a place every node reaches: a folder on a shared
filesystem, or a URI that pyarrow resolves (``s3://bucket/prefix``; an S3-compatible server
through pyarrow's ``?endpoint_override=http://host:port`` or the ``AWS_ENDPOINT_URL_S3``
variable). Ray then keeps the search in ``<storage>/<name>-<time>/``, through the ``pyarrow.fs``
filesystem resolved here on the driver (``RunConfig(storage_filesystem=...)``; it travels to the
workers pickled, endpoint included, credentials not), and dcanets copies its own files there
(``config.yaml`` and ``search.json`` when the search starts and as trials start, ``best.yaml``,
``trials.csv``, ``curves.png`` at the end): that folder alone resumes the search on any machine.
Credentials come from the standard AWS variables or files of each machine, never from the
config, which is saved with the search.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import re
import shlex
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple

RESULT_FILES = ("best.yaml", "curves.png", "trials.csv")
TUNER_STATE = "tuner.pkl"  # Ray's: present once Tune has started the search
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(text: str) -> bool:
    """``s3://...``, ``file://...``: a URI for pyarrow; anything else is a path on this machine."""
    return bool(_SCHEME.match(text))


def form_problem(text: str) -> Optional[str]:
    """What is wrong with a ``storage`` value before anything is contacted, or None.

    Credentials in the URI (``s3://key:secret@bucket``, which pyarrow would accept) are refused:
    the value is saved in config.yaml, search.json and Ray's tuner.pkl, beside the search.
    """
    if not text.strip():
        return "must be a folder on a shared filesystem or a URI such as s3://bucket/prefix, got ''"
    if is_uri(text) and "@" in urllib.parse.urlsplit(text).netloc:
        return ("credentials in the URI are refused (the URI is saved with the search); "
                "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials) on every machine")
    return None


def parse_into(raw: Any, base: Path, problems: Any) -> Optional[str]:
    """The form of the search file's ``storage:`` (reachability: before Ray starts), relative to the
    YAML's folder as data paths are; None when absent, or wrong: then its problem is added to
    ``problems`` (``dcanets.tune.schema``'s list, every problem of the file reported together)."""
    try:
        return None if raw is None else parse(raw, base)
    except ValueError as exc:
        problems.add("storage", str(exc))
        return None


def parse(value: Any, base: Optional[Path] = None) -> str:
    """A ``storage`` value (the YAML's ``storage:`` or ``--storage``) checked and normalized; one
    ValueError line that says what is wrong with it."""
    if not isinstance(value, str):
        raise ValueError("must be a folder on a shared filesystem or a URI such as s3://bucket/prefix, "
                         f"got {type(value).__name__}")
    problem = form_problem(value)
    if problem:
        raise ValueError(problem)
    return normalize(value, base)


def normalize(text: str, base: Optional[Path] = None) -> str:
    """A URI as given; a path made absolute (against ``base``, else the current directory), because
    it is saved in search.json and handed to Ray, whose trials run in other directories."""
    if is_uri(text):
        return text
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else ((base or Path.cwd()) / path).resolve())


def join(root: str, name: str) -> str:
    """``root/name`` for a path or a URI; a URI keeps its query (``?endpoint_override=...``)."""
    if not is_uri(root):
        return str(Path(root) / name)
    parts = urllib.parse.urlsplit(root)
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", name)))


def split(uri: str) -> Tuple[str, str]:
    """``(parent, name)`` of a search's location, for a path or a URI (query kept on the parent)."""
    if not is_uri(uri):
        return str(Path(uri).parent), Path(uri).name
    parts = urllib.parse.urlsplit(uri)
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(path))), posixpath.basename(path)


@dataclasses.dataclass(frozen=True)
class Location:
    """A search's folder where Ray Tune keeps it: ``uri`` for people (``--resume``), ``fs`` and
    ``path`` for pyarrow; ``shared`` when it is not the local search folder itself."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    path: str
    shared: bool = True

    @classmethod
    def local(cls, folder: Path) -> "Location":
        """The search folder on the driver's disk: Ray writes there as it always did."""
        from pyarrow.fs import LocalFileSystem

        return cls(str(folder), LocalFileSystem(), str(folder), shared=False)

    @classmethod
    def open(cls, uri: str) -> "Location":
        """Resolve a path or URI with pyarrow (a bad scheme or query is one ValueError line)."""
        fs, path = _resolve(uri)
        return cls(uri, fs, path)

    def resume_command(self) -> str:
        """The command that continues this search, quoted for a shell: with its storage URI when it
        has one (which works from any machine), else with its search folder."""
        return f"dcanets tune --resume {shlex.quote(self.uri)}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    # What Ray is given: a local path as a plain string (Ray resolves it as it always did), a URI
    # as the filesystem resolved here and the path on it.
    @property
    def ray_filesystem(self) -> Any:
        return self.fs if is_uri(self.uri) else None

    @property
    def ray_storage_path(self) -> str:
        return posixpath.dirname(self.path.rstrip("/"))

    def exists(self, name: str) -> bool:
        from pyarrow.fs import FileType

        return self._io("read", lambda: self.fs.get_file_info(self._at(name)).type != FileType.NotFound)

    def started(self) -> bool:
        """Whether Tune wrote its state here (there is something to resume); True when the storage
        cannot tell, so that nothing is deleted and the resume command is still printed."""
        try:
            return self.exists(TUNER_STATE)
        except ValueError:
            return True

    def put(self, folder: Path, names: Iterable[str]) -> None:
        """Copy ``folder/<name>`` (those that exist) into this location; nothing when it is the
        folder itself."""
        if not self.shared or self._is_folder(folder):
            return
        files = [n for n in names if (folder / n).is_file()]
        self._io("write", lambda: self._put(folder, files))

    def get(self, names: Iterable[str], folder: Path) -> None:
        """Copy ``<location>/<name>`` into ``folder`` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            data = self._io("read", lambda n=n: self._read(n))
            (folder / n).write_bytes(data)

    def get_folder(self, name: str, folder: Path) -> None:
        """Copy the files of ``<location>/<name>/`` (none: nothing) into ``folder`` (created)."""
        from pyarrow.fs import FileSelector, FileType

        infos = self._io("read", lambda: self.fs.get_file_info(FileSelector(self._at(name), allow_not_found=True)))
        folder.mkdir(parents=True, exist_ok=True)
        for info in infos:
            if info.type == FileType.File:
                base = posixpath.basename(info.path)
                (folder / base).write_bytes(self._io("read", lambda b=base: self._read(posixpath.join(name, b))))

    def remove(self) -> None:
        """Delete this location (a search that never started leaves nothing behind)."""
        if self.shared:
            try:
                self.fs.delete_dir(self.path)
            except OSError:
                pass

    def _put(self, folder: Path, files: Iterable[str]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        for n in files:
            if "/" in n:  # a file in a subfolder (the trial records)
                self.fs.create_dir(posixpath.dirname(self._at(n)), recursive=True)
            with self.fs.open_output_stream(self._at(n)) as out:
                out.write((folder / n).read_bytes())

    def _read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._at(name)) as f:
            return f.read()

    def _at(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def _is_folder(self, folder: Path) -> bool:
        return not is_uri(self.uri) and os.path.realpath(self.path) == os.path.realpath(folder)

    def _io(self, what: str, action: Any) -> Any:
        try:
            return action()
        except OSError as exc:  # pyarrow's network, bucket and permission errors alike
            raise ValueError(f"storage {self.uri}: cannot {what} there ({_reason(exc)})") from None


def copy_files(location: Location, folder: Path, names: Iterable[str]) -> bool:
    """Copy files of the search folder to shared storage; a failure is one warning line, not an
    exception: this runs in ``finally`` blocks and after the search, where raising would hide
    the outcome (the files stay in the search folder). Whether they were copied."""
    names = list(names)
    try:
        location.put(folder, names)
    except ValueError as exc:
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(f"dcanets tune: warning: {exc}; {listed} stay in {folder} only", file=sys.stderr)
        return False
    return True


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@functools.lru_cache(maxsize=16)
def _resolve(uri: str) -> tuple:
    """pyarrow's filesystem and path for ``uri`` (cached: an ``s3://`` URI without an endpoint
    asks AWS for the bucket's region)."""
    import pyarrow
    from pyarrow.fs import FileSystem, LocalFileSystem

    if not is_uri(uri):
        return LocalFileSystem(), normalize(uri)
    try:
        return FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise ValueError(f"storage {uri}: pyarrow cannot open it ({_reason(exc)})") from None


__all__ = ["RESULT_FILES", "TUNER_STATE", "Location", "copy_files", "form_problem", "is_uri", "join", "normalize",
           "parse", "parse_into", "split"]
