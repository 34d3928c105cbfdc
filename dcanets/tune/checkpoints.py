"""Trial checkpoints in a search: Ray's checkpoint settings, and deleting the ones no longer needed.

Ray's settings (read against Ray 2.60's ``tune_controller.py`` and ``experiment_state.py``; the
reasons in docs/tuning.md, "Checkpoints at scale"):

- ``CheckpointConfig()`` without ``num_to_keep``. With ``num_to_keep=N`` Tune deletes a trial's
  older checkpoints itself and, to keep its experiment snapshot from naming a deleted one, forces
  a snapshot whenever a trial has registered N checkpoints since the last: with N=1, after every
  epoch of every trial. A snapshot writes every trial's state (~19 KB each) and uploads the whole
  driver folder (every trial's result files), waiting for the previous upload: work that grows
  with the trials, paid per epoch. Without it Tune snapshots on its own clock
  (``TUNE_GLOBAL_CHECKPOINT_S``, left at Ray's "auto": at least every 10 s, and 19x the time a
  snapshot takes, so at most ~5% of the driver's time).
- Each registered checkpoint keeps only its (absent) score metric in Ray's per-trial book, not
  the whole result (:func:`dcanets._compat.tune_keeps_only_checkpoint_score`, set by ``start_ray``).
- A checkpoint every epoch, as the trial reports it: what a retried or resumed trial continues
  from, and the final weights of a trial ASHA stopped. ``SyncConfig`` keeps Ray's defaults (trials
  write nothing but checkpoints and results; checkpoints go to the storage from the trial itself).

What Tune no longer deletes, :class:`CheckpointKeeper` (a Tune callback in the driver) does: a
running trial's older checkpoints, and the last checkpoint of an ended trial outside the best
``checkpoints.keep_best`` (:mod:`dcanets.tune.retention`). Never before the storage holds a
complete experiment snapshot that no longer names the folder: Ray uploads its snapshots in the
background, one upload at a time, and a ``--resume`` after the driver was killed continues from
the last one uploaded. Each snapshot carries a counter (``dcanets-snapshot.json``, written into
the folder Ray uploads); a checkpoint that became unneeded before snapshot ``c`` is deleted once
three uploads with counters ``c <= m1 < m2 < m3`` have been seen on the storage: a new upload starts
only after the previous one finished, so the one carrying ``m2`` (which started after snapshot
``m1`` was taken) is complete when ``m3`` appears. After ``Tuner.fit`` returns (its last snapshot
uploaded and waited for) the rest goes (:meth:`CheckpointKeeper.purge`).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import posixpath
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from dcanets.engine.atomic import write_text
from dcanets.tune import schema
from dcanets.tune.callbacks import SessionCallback
from dcanets.tune.retention import Ranking
from dcanets.tune.state import SearchState
from dcanets.tune.storage import Location

MARKER = "dcanets-snapshot.json"  # beside Ray's experiment state: which snapshot the storage holds
REPORTED = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY: a gang's reported checkpoint


def ray_checkpoint_config() -> Any:
    """``ray.tune.CheckpointConfig`` of a search: every checkpoint registered, none deleted by Tune."""
    from ray import tune

    return tune.CheckpointConfig()


class CheckpointKeeper(SessionCallback):
    """Deletes the checkpoints a search no longer needs (see the module docstring).

    Its bookkeeping (the ranking, each running trial's latest checkpoint, what waits to be deleted,
    the snapshot counter) is its Tune callback state, saved in every experiment snapshot and given
    back by ``--resume``; the storage it deletes from is the session's (:meth:`bind`).
    """

    def __init__(self, spec: schema.TuneSpec) -> None:
        self.ranking = Ranking(spec.metric, spec.mode, spec.checkpoints.keep_best)
        self.latest: Dict[str, str] = {}  # running trials: their latest registered checkpoint
        self.doomed: List[Tuple[int, str]] = []  # (first snapshot that no longer needs it, checkpoint path)
        self.taken = 0  # experiment snapshots taken so far (get_state calls)
        self._session()

    def _session(self) -> None:
        self.location: Optional[Location] = None
        self.staging: Optional[str] = None  # the driver folder Ray uploads with each snapshot
        self.seen: List[int] = []  # snapshot counters seen on the storage, increasing
        self.deleted: List[str] = []
        self._deleting: Optional[concurrent.futures.Future] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def __getstate__(self):  # pickled into tuner.pkl: the session's objects stay out
        return {k: v for k, v in self.__dict__.items()
                if k not in ("location", "staging", "seen", "deleted", "_deleting", "_pool")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._session()

    def bind(self, state: SearchState) -> None:
        self.location = state.location

    # -- Tune hooks (the driver's loop) ---------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.staging = getattr(getattr(trial, "storage", None), "experiment_driver_staging_path", self.staging)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.ranking.observe(trial.trial_id, result)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        previous, self.latest[trial.trial_id] = self.latest.get(trial.trial_id), checkpoint.path
        if previous and previous != checkpoint.path:
            self._doom([previous])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, errored=True)

    def _end(self, trials, trial, errored: bool) -> None:
        # a gang trial registers no Tune checkpoint: Ray Train keeps its newest one (num_to_keep=1)
        # under the search's storage, and its reports carry the path (TuneReportCallback)
        path = (self.latest.pop(trial.trial_id, None) or getattr(trial.checkpoint, "path", None)
                or (getattr(trial, "last_result", None) or {}).get(REPORTED))
        self._doom(self.ranking.end(trial.trial_id, path, _position(trials, trial), errored))

    def _doom(self, paths: List[str]) -> None:
        self.doomed += [(self.taken + 1, p) for p in paths]  # the next snapshot no longer names them

    # -- experiment snapshots ---------------------------------------------------------------------
    def get_state(self) -> Optional[Dict]:
        """Called by Tune as it takes an experiment snapshot: count it, mark it for the storage,
        and delete what the uploads seen so far make safe."""
        self.taken += 1
        self._observe_storage()
        self._write_marker()
        self._collect(self._durable())
        return {"ranking": self.ranking.state(), "latest": dict(self.latest), "doomed": list(self.doomed),
                "taken": self.taken}

    def set_state(self, state: Dict) -> None:
        """``--resume``: the bookkeeping of the interrupted session's last snapshot. What was still to
        be deleted waits for this session's own uploads (the interrupted one's are not known)."""
        self.ranking.restore(state["ranking"])
        self.latest, self.taken = dict(state["latest"]), int(state["taken"])
        self.doomed = [(self.taken + 1, path) for _, path in state["doomed"]]

    def purge(self) -> List[str]:
        """After ``Tuner.fit`` returned (its last snapshot uploaded and waited for): delete every
        checkpoint that snapshot no longer names. Returns the folders deleted in this session."""
        for _ in range(2):  # a batch still running, then everything that snapshot made safe
            if self._deleting is not None:
                self._finish(self._deleting)
            self._collect(self.taken)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return list(self.deleted)

    def _durable(self) -> int:
        """The newest snapshot the storage is known to hold whole (0: none yet)."""
        return self.seen[-3] if len(self.seen) >= 3 else 0

    def _observe_storage(self) -> None:
        if self.location is None:
            return
        try:
            with self.location.fs.open_input_stream(posixpath.join(self.location.path, MARKER)) as f:
                counter = int(json.loads(f.read()).get("snapshot", 0))
        except (OSError, ValueError, AttributeError):  # none uploaded yet (or unreadable): nothing learnt
            return
        if not self.seen or counter > self.seen[-1]:
            self.seen.append(counter)

    def _write_marker(self) -> None:
        if self.staging is None:
            return
        try:
            os.makedirs(self.staging, exist_ok=True)
            write_text(Path(self.staging) / MARKER, json.dumps({"snapshot": self.taken}))
        except OSError as exc:  # nothing is deleted without it; the search goes on
            print(f"dcanets tune: warning: {MARKER} not written ({exc}); checkpoints are kept", file=sys.stderr)
            self.staging = None

    def _collect(self, durable: int) -> None:
        """Start deleting (in the background, one batch at a time) what snapshot ``durable`` no longer names."""
        if self._deleting is not None:
            if not self._deleting.done():
                return
            self._finish(self._deleting)
        ready = [path for first, path in self.doomed if first <= durable]
        if not ready or self.location is None:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcanets-checkpoints")
        self._deleting = self._pool.submit(_delete, self.location, ready)

    def _finish(self, future: concurrent.futures.Future) -> None:
        self._deleting = None
        try:
            done: Dict[str, bool] = future.result()
        except Exception as exc:  # the storage refused: kept for the next round
            print(f"dcanets tune: warning: old checkpoints not deleted ({exc}); retried later", file=sys.stderr)
            return
        self.doomed = [d for d in self.doomed if d[1] not in done]
        self.deleted += sorted(path for path, deleted in done.items() if deleted)


def _position(trials: List[Any], trial: Any) -> int:
    """Where ``trial`` is in the search's list of trials (the report's order, which breaks ties)."""
    try:
        return trials.index(trial)
    except ValueError:
        return len(trials)


def _delete(location: Location, paths: List[str]) -> Dict[str, bool]:
    """Delete the checkpoint folders ``paths`` of the search at ``location``: whether each was."""
    from pyarrow.fs import FileType

    root = location.path.rstrip("/") + "/"
    done = {}
    for path in paths:
        # only Ray's checkpoint folders of this search, whatever a state file says
        ours = path.startswith(root) and posixpath.basename(path.rstrip("/")).startswith("checkpoint_")
        if ours and location.fs.get_file_info(path).type != FileType.NotFound:
            location.fs.delete_dir(path)
        done[path] = ours
    return done


__all__ = ["MARKER", "CheckpointKeeper", "ray_checkpoint_config"]
