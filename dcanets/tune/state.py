"""A search's own state: ``search.json`` (owned by :class:`SearchState`) and its frozen results.

Why one owner: ``search.json`` holds what ``--resume`` needs (the config's folder, the MLflow
store and run ids, the storage, the time already spent) and is written as the search runs, by the
MLflow tracker as trials start and end, and at the end of each session. Every read and write goes
through :class:`SearchState` (``load``, ``save``, atomic: a driver killed mid-write leaves the
previous file), so the file has one format and one writer, and all parts of one session share one
in-memory copy: nothing written by one part is overwritten by another's stale copy.

Why one file per trial: the search's own fields stay in ``search.json``, each trial's record
(its MLflow run, how it ended) in ``search-trials/<trial id>.json``, so that a trial starting or
ending writes (and copies to the storage) its own small file: the whole file rewritten at every
trial start and end cost time growing with the trials, O(n²) over a search. A ``search.json``
of an earlier version, with the records inside, is read as before and split at its next save.

A search's outcome is data: :class:`SearchResult` and its :class:`TrialResult` records are
frozen and read by attribute (compare optuna's ``FrozenTrial``), the same for every reader
(the table, ``trials.csv``, ``best.yaml``, MLflow's summary). Importing this module does not
import Ray.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from dcanets.engine.atomic import write_text
from dcanets.engine.divergence import first_diverged
from dcanets.tune.storage import Location, copy_files, join
from dcanets.validation import is_number

STATE = "search.json"  # in the search folder, beside Ray's experiment state
TRIALS = "search-trials"  # beside it: one <trial id>.json per trial record
STATE_FILES = ("config.yaml", STATE)  # what --resume reads (with the records in TRIALS)
_TRIAL_ID = re.compile(r"[A-Za-z0-9_.-]+")  # Tune's trial ids: a file name of their own
DIVERGED = "DIVERGED"  # a trial whose train loss became NaN/inf: ended on its own, failed, never ranked
ENDED = ("TERMINATED", "ERROR", DIVERGED)  # the statuses of trials that ended on their own


def is_finite(x: Any) -> bool:
    """A number that is neither NaN nor infinite (a diverged trial's metric is not ranked)."""
    return is_number(x) and math.isfinite(x)


class TrialRecord(BaseModel):
    """What ``search.json`` keeps of one trial: its MLflow run and how it last ended.

    One record per trial, changed only through :meth:`SearchState.save_trial`: each trial's
    bookkeeping stands on its own, in a file of its own (``search-trials/<trial id>.json``).
    """

    model_config = ConfigDict(extra="allow")  # keys of another dcanets version are kept
    run_id: str
    checkpoint: Optional[str] = None  # the last checkpoint reported (Ray's path on the storage)
    node_id: Optional[str] = None  # the node it last reported from
    status: Optional[str] = None  # FINISHED or FAILED once its run is ended


class SearchState(BaseModel):
    """``search.json`` of the search folder ``folder``: the one reader and writer of that file.

    Created with the folder (:meth:`create`), read by ``--resume`` (:meth:`load`), changed by
    setting attributes and saved (:meth:`save`, or :meth:`save_trial` after one trial's record
    changed). One session of a search (its start, or a ``--resume``) holds one instance, shared
    by the driver and the Tune callbacks of that session.
    """

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)  # write_error: an OSError
    folder: Path = Field(exclude=True)  # where the file is; not in it (the folder may move)
    config_dir: str  # relative data paths of the config resolve against it
    config_path: str
    tracking_uri: str
    experiment: str
    num_samples: int
    trials: Dict[str, TrialRecord] = Field(default_factory=dict)  # by Tune trial id
    storage: Optional[str] = None  # where Ray keeps the search (a URI or shared folder), None: the folder
    parent_run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    fit_seconds: float = 0.0  # search time of the sessions that ended, for the progress clock
    status: Optional[str] = None  # FINISHED, KILLED or FAILED after a session ended
    ended_trials: List[str] = Field(default_factory=list)  # trials that ended on their own
    # a write that failed in a Tune callback (a full disk), raised by the session once Tune stopped
    write_error: Optional[OSError] = Field(default=None, exclude=True)
    _written: Dict[str, str] = PrivateAttr(default_factory=dict)  # trial id -> its file's text
    _unshared: set = PrivateAttr(default_factory=set)  # trial records not yet copied to the storage
    _changed: bool = PrivateAttr(default=True)  # search.json not yet copied to the storage
    _lock: Any = PrivateAttr(default_factory=threading.RLock)  # the MLflow tracker writes records from its thread

    def __getstate__(self) -> Dict[Any, Any]:  # Tune pickles its callbacks, and some hold the state
        state = super().__getstate__()
        private = {k: v for k, v in (state.get("__pydantic_private__") or {}).items() if k != "_lock"}
        return {**state, "__pydantic_private__": private}

    def __setstate__(self, state: Dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    @classmethod
    def create(cls, folder: Path, **values: Any) -> "SearchState":
        """The state of a new search, written to ``folder/search.json``."""
        state = cls(folder=folder, **values)
        state.save()
        return state

    @classmethod
    def load(cls, folder: Path) -> "SearchState":
        """``folder/search.json`` and the trial records beside it; FileNotFoundError when it is
        missing, one ValueError line (what is wrong) when it is not a search's state. The records
        of an earlier version's file (inside it) count, a record file overriding its copy there."""
        data = _read_object(Path(folder) / STATE)
        records, written = dict(data.get("trials") or {}), {}
        for path in sorted((Path(folder) / TRIALS).glob("*.json")):
            try:
                records[path.stem] = _read_object(path)
            except FileNotFoundError:
                continue
            except ValueError as exc:
                raise ValueError(f"{TRIALS}/{path.name}: {exc}") from None
            written[path.stem] = path.read_text()
        try:
            state = cls.model_validate({**data, "trials": records, "folder": Path(folder)})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc'])) or STATE}: {first['msg']}") from None
        state._written = written  # records of the earlier format are written at the next save
        return state

    @property
    def path(self) -> Path:
        return self.folder / STATE

    @property
    def location(self) -> Location:
        """Where Ray keeps this search: the search folder, or ``<storage>/<folder name>``."""
        return Location.open(join(self.storage, self.folder.name)) if self.storage else Location.local(self.folder)

    def save(self) -> None:
        """Write ``search.json`` atomically (a new file moved over the old one; on a full disk the
        old one stays and :class:`~dcanets.engine.atomic.DiskFull` names it), with every trial
        record that changed since it was written and without those of trials dropped."""
        with self._lock:
            for trial_id in list(self.trials):
                self.save_trial(trial_id)
            for trial_id in set(self._written) - set(self.trials):
                (self.folder / TRIALS / f"{trial_id}.json").unlink(missing_ok=True)
                del self._written[trial_id]
            write_text(self.path, json.dumps(self.model_dump(mode="json", exclude_none=True, exclude={"trials"}),
                                             indent=2))
            self._changed = True

    def save_trial(self, trial_id: str) -> None:
        """Save after the record of ``trial_id`` changed: its own file, O(1) whatever the trials."""
        if not _TRIAL_ID.fullmatch(trial_id):
            raise ValueError(f"trial id {trial_id!r}: not a file name")
        with self._lock:
            text = json.dumps(self.trials[trial_id].model_dump(mode="json", exclude_none=True))
            if self._written.get(trial_id) == text:
                return
            (self.folder / TRIALS).mkdir(exist_ok=True)
            write_text(self.folder / TRIALS / f"{trial_id}.json", text)
            self._written[trial_id] = text
            self._unshared.add(trial_id)

    def add_trial(self, trial_id: str, run_id: str) -> TrialRecord:
        with self._lock:
            record = self.trials[trial_id] = TrialRecord(run_id=run_id)
            self.save_trial(trial_id)
        return record

    def move_storage(self, root: str) -> None:
        """The storage is reached at ``root`` from this machine (a resume from the storage itself)."""
        if self.storage != root:
            self.storage = root
            self.save()

    def finish_session(self, fit_seconds: float, status: str, ended_trials: List[str]) -> None:
        """What the next ``--resume`` needs of the session that ends: time spent, status, ended trials."""
        self.fit_seconds, self.status, self.ended_trials = fit_seconds, status, ended_trials
        self.save()

    def share(self) -> None:
        """Copy ``search.json`` and the trial records written since the last copy to the storage
        (when the search is kept there), for a resume from the storage alone; a failure is one
        warning line (the files stay in the search folder, and are copied at the next share).
        Nothing changed since the last copy: nothing to do."""
        with self._lock:
            records = sorted(self._unshared)
            if not (records or self._changed):
                return
            if copy_files(self.location, self.folder, [STATE, *(f"{TRIALS}/{t}.json" for t in records)]):
                self._unshared.difference_update(records)
                self._changed = False


def _read_object(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path``: FileNotFoundError, or one ValueError line."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object was expected, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One trial as the search left it: Tune's status (``INTERRUPTED``: cut by a signal, resumable),
    its sampled parameters, the per-epoch history and the best value of the search metric."""

    trial_id: str
    status: str
    params: Mapping[str, Any]
    history: Tuple[Mapping[str, Any], ...]
    best: float = float("nan")
    node_id: Optional[str] = None
    checkpoint: Optional[str] = None

    @property
    def epochs(self) -> int:
        return len(self.history)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """A session's outcome. ``status``: FINISHED (ran to its end or its time budget), KILLED (a
    signal stopped it, or trials were left unfinished: ``--resume`` continues it) or FAILED (every
    trial crashed); ``seconds`` counts the earlier sessions too; ``errors``: the last line of each
    failed trial's error; ``grid``: Ray's ``ResultGrid``."""

    status: str
    trials: Tuple[TrialResult, ...]
    seconds: float
    location: Location
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    signal: Optional[str] = None
    errors: Tuple[str, ...] = ()
    grid: Any = dataclasses.field(default=None, repr=False, compare=False)

    def ranked(self, mode: str) -> List[TrialResult]:
        """The trials with a finite best value, best first (``mode``: max or min); a diverged trial
        is never ranked (its weights are NaN, its config diverges)."""
        return rank(self.trials, mode)

    def best(self, mode: str) -> Optional[TrialResult]:
        ranked = self.ranked(mode)
        return ranked[0] if ranked else None


def rank(trials: Sequence[TrialResult], mode: str) -> List[TrialResult]:
    """``trials`` with a finite best value and not diverged, best first (ties: in their order)."""
    return sorted((t for t in trials if is_finite(t.best) and t.status != DIVERGED), key=lambda t: t.best,
                  reverse=mode == "max")


def trial_status(tune_status: str, ended_on_its_own: bool, history: Sequence[Mapping[str, Any]]) -> str:
    """A trial's status as dcanets reports it: Tune's, except INTERRUPTED for a trial a signal cut
    (Tune marks it TERMINATED too; ``ended_on_its_own`` is False) and DIVERGED for one whose train
    loss became NaN/inf (the engine stopped it; Tune saw a trial that ended well)."""
    if tune_status == "TERMINATED" and not ended_on_its_own:
        return "INTERRUPTED"  # stopped by Ctrl-C/SIGTERM, resumable
    if tune_status == "TERMINATED" and first_diverged(history) is not None:
        return DIVERGED
    return tune_status


def session_status(trials: Sequence[TrialResult], signal_received: bool, num_samples: int) -> str:
    """FINISHED (a trial ended well), FAILED (every trial crashed or diverged) or KILLED: a trial
    was cut, or a signal came before every sample was tried. A signal that arrives once every
    trial has ended does not make a finished search KILLED."""
    if any(t.status not in ENDED for t in trials) or (signal_received and len(trials) < num_samples):
        return "KILLED"
    return "FINISHED" if any(t.status == "TERMINATED" for t in trials) else "FAILED"


__all__ = ["DIVERGED", "ENDED", "STATE", "STATE_FILES", "TRIALS", "SearchResult", "SearchState", "TrialRecord",
           "TrialResult", "is_finite", "rank", "session_status", "trial_status"]
