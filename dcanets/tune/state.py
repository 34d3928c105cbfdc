"""A search's own state: ``search.json`` (owned by :class:`SearchState`) and its frozen results.

Why one owner: ``search.json`` holds what ``--resume`` needs (the config's folder, the MLflow
store and run ids, the storage, the time already spent) and is written as the search runs, by the
MLflow tracker as trials start and end, and at the end of each session. Every read and write goes
through :class:`SearchState` (``load``, ``save``, atomic: a driver killed mid-write leaves the
previous file), so the file has one format and one writer, and all parts of one session share one
in-memory copy: nothing written by one part is overwritten by another's stale copy.

A search's outcome is data: :class:`SearchResult` and its :class:`TrialResult` records are
frozen and read by attribute (compare optuna's ``FrozenTrial``), the same for every reader
(the table, ``trials.csv``, ``best.yaml``, MLflow's summary). Importing this module does not
import Ray.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dcanets.engine.atomic import write_text
from dcanets.engine.divergence import first_diverged
from dcanets.tune.storage import Location, copy_files, join
from dcanets.validation import is_number

STATE = "search.json"  # in the search folder, beside Ray's experiment state
STATE_FILES = ("config.yaml", STATE)  # what --resume reads
DIVERGED = "DIVERGED"  # a trial whose train loss became NaN/inf: ended on its own, failed, never ranked
ENDED = ("TERMINATED", "ERROR", DIVERGED)  # the statuses of trials that ended on their own


def is_finite(x: Any) -> bool:
    """A number that is neither NaN nor infinite (a diverged trial's metric is not ranked)."""
    return is_number(x) and math.isfinite(x)


class TrialRecord(BaseModel):
    """What ``search.json`` keeps of one trial: its MLflow run and how it last ended.

    One record per trial, changed only through :meth:`SearchState.save_trial`: each trial's
    bookkeeping stands on its own, so that the file could be written one record at a time.
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

    @classmethod
    def create(cls, folder: Path, **values: Any) -> "SearchState":
        """The state of a new search, written to ``folder/search.json``."""
        state = cls(folder=folder, **values)
        state.save()
        return state

    @classmethod
    def load(cls, folder: Path) -> "SearchState":
        """``folder/search.json``; FileNotFoundError when it is missing, one ValueError line (what
        is wrong) when it is not a search's state."""
        path = Path(folder) / STATE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(data, dict):
            raise ValueError(f"a JSON object was expected, got {type(data).__name__}")
        try:
            return cls.model_validate({**data, "folder": Path(folder)})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc'])) or STATE}: {first['msg']}") from None

    @property
    def path(self) -> Path:
        return self.folder / STATE

    @property
    def location(self) -> Location:
        """Where Ray keeps this search: the search folder, or ``<storage>/<folder name>``."""
        return Location.open(join(self.storage, self.folder.name)) if self.storage else Location.local(self.folder)

    def save(self) -> None:
        """Write the whole file atomically (a new file moved over the old one; on a full disk the old
        one stays and :class:`~dcanets.engine.atomic.DiskFull` names it)."""
        write_text(self.path, json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2))

    def save_trial(self, trial_id: str) -> None:
        """Save after the record of ``trial_id`` changed (today: the whole file)."""
        self.save()

    def add_trial(self, trial_id: str, run_id: str) -> TrialRecord:
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
        """Copy ``search.json`` to the storage (when the search is kept there), for a resume from
        the storage alone; a failure is one warning line (the file stays in the search folder)."""
        copy_files(self.location, self.folder, [STATE])


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
        return sorted((t for t in self.trials if is_finite(t.best) and t.status != DIVERGED), key=lambda t: t.best,
                      reverse=mode == "max")

    def best(self, mode: str) -> Optional[TrialResult]:
        ranked = self.ranked(mode)
        return ranked[0] if ranked else None


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


__all__ = ["DIVERGED", "ENDED", "STATE", "STATE_FILES", "SearchResult", "SearchState", "TrialRecord", "TrialResult",
           "is_finite", "session_status", "trial_status"]
