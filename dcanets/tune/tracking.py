"""MLflow for ``dcanets tune``: one parent run per search, one nested run per trial, from the driver.

Why not Ray's ``MLflowLoggerCallback``: it ends a trial's run only when the trial ends, so a
killed driver leaves runs RUNNING. Here all logging happens in the driver (workers on other
nodes never need to reach the tracking store), every run id is kept in the search's state
(``search.json``, next to the Ray results), and :meth:`SearchTracker.close` (called from a
``finally``) ends whatever is still RUNNING as KILLED or FAILED. A resumed search re-opens the
same parent run.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from dcanets.engine import divergence
from dcanets.engine.atomic import DiskFull
from dcanets.engine.tracking import (  # noqa: F401  (re-exported: the store helpers' former home)
    EXPERIMENT_KIND,
    absolute_uri,
    artifact_location,
    check_uri,
    choose_uri,
    default_uri,
    experiment_id,
    experiment_url,
    flatten,
    log_params,
    logged_metrics,
    open_store,
)
from dcanets.engine.tracking import client as _client
from dcanets.engine.tracking import metric_objs as _metric_objs
from dcanets.tune.builders import short_params, trial_params
from dcanets.tune.callbacks import SessionCallback
from dcanets.tune.state import SearchState, TrialRecord
from dcanets.tune.storage import Location
from dcanets.tune.writer import Writer

METRICS_PER_BATCH = 1000  # MLflow's limit of one log_batch (mlflow.utils.validation.MAX_METRICS_PER_BATCH)
WHERE = ("node_id", "world_size", "nodes", "checkpoint_path")  # of a result, for its run's tags (_node_tag)
FAILED_WRITES = "dcanets.failed_writes"  # parent run tag: MLflow writes of the trials that failed
BEST_MODEL = "best_model"  # artifact folder of the parent run: the best trial's final weights


class SearchTracker(SessionCallback):
    """A Tune callback that mirrors trials into MLflow and records the run ids in the search's state.

    Every write of a trial's run (its creation and parameters, its metrics every epoch, its end)
    runs on a background thread, in order (:class:`dcanets.tune.writer.Writer`): a Tune function
    trial waits in ``tune.report`` until the driver has run every callback on its result, and
    each write to SQLite took 20-33 ms, paid by every trial. (MLflow's own
    ``log_batch(synchronous=False)`` stops its logging thread at every ``set_terminated``, 0.5-1 s
    per trial.) The writes in flight and the writer thread are this instance's: ``close`` waits
    for them and is called on the tracker Tune ran (after ``--resume``, the copy restored from
    ``tuner.pkl``, bound to this session by :meth:`bind`).
    """

    def __init__(self, state: SearchState, train: Optional[Dict[str, Any]] = None) -> None:
        self.state = state
        self.train = train  # the fixed train fields: each trial's run gets its whole TrainConfig
        self.uri, self.experiment = state.tracking_uri, state.experiment
        self._connect()

    def _connect(self) -> None:
        self.client = _client(self.uri)
        self.writer = Writer()  # the trials' runs are written on its thread, in order

    def __getstate__(self):  # Tune pickles callbacks into tuner.pkl; a client or a thread is not picklable
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "writer")}

    def __setstate__(self, state):  # Tuner.restore: reconnect (bind() then gives this session's state)
        self.__dict__.update(state)
        self._connect()

    def bind(self, state: SearchState) -> None:
        """Take this session's state: the search folder may have moved (a resume from the
        storage, elsewhere) and the run ids saved last are there, not in ``tuner.pkl``."""
        self.state = state

    @property
    def parent_id(self) -> Optional[str]:
        return self.state.parent_run_id

    # -- parent run -------------------------------------------------------------------------
    def start(self, params: Dict[str, Any], config_path: Path, tags: Dict[str, str]) -> str:
        exp_id = experiment_id(self.client, self.uri, self.experiment)
        parent_id = self.parent_id
        if parent_id:  # resumed search: same parent run, running again
            self.client.update_run(parent_id, status="RUNNING")
            self._close_stale_children()
        else:
            parent_id = self.client.create_run(exp_id, run_name=tags.get("name"), tags=tags).info.run_id
            self._log_params(parent_id, params)
            self.client.log_artifact(parent_id, str(config_path))
        self.state.parent_run_id, self.state.experiment_id, self.state.tracking_uri = parent_id, exp_id, self.uri
        self.state.save()
        return parent_id

    def close(self, status: str) -> None:
        """End every run of this search that is still RUNNING (children KILLED unless FINISHED)."""
        if not self.parent_id:
            return
        child_status = "FINISHED" if status == "FINISHED" else ("FAILED" if status == "FAILED" else "KILLED")
        self.flush()  # a write that failed is a warning: this runs in a finally, the runs are ended all the same
        self.writer.shutdown()
        self.state.share()  # the trial records the writer saved last
        self._report_failed_writes()
        for run_id in self._running_children():
            self.client.set_terminated(run_id, child_status)
        self.client.set_terminated(self.parent_id, status)

    def _report_failed_writes(self) -> None:
        """Writes of this session that failed: one line, and a tag on the parent run (a search whose
        MLflow runs miss something does not look complete there)."""
        if not self.writer.failures:
            return
        line = f"{self.writer.failures} MLflow write(s) failed, the first: {self.writer.first_failure}"
        print(f"dcanets tune: warning: {line}; the search's own files (search folder) are complete", file=sys.stderr)
        self.client.set_tag(self.parent_id, FAILED_WRITES, line[:5000])

    def drop_orphans(self, restorable: set) -> None:
        """Delete the runs of trials ``Tuner.restore`` will not bring back.

        A driver killed (SIGKILL, power loss) after a trial started but before Tune's next
        experiment snapshot leaves a run for a trial id that the restored search never sees: the
        searcher samples that slot again under a new id. Without this, such a search would list
        one trial run more than it has trials. The run is deleted (MLflow's soft delete:
        ``mlflow gc`` removes it for good, ``restore_run`` brings it back).
        """
        if not restorable:
            return
        for trial_id in [t for t in self.state.trials if t not in restorable]:
            record = self.state.trials.pop(trial_id)
            try:
                self.client.delete_run(record.run_id)
            except Exception:  # already deleted by hand
                pass
        self.state.save()

    def summarize(self, metrics: Dict[str, float], tags: Dict[str, str], artifacts) -> None:
        """The search's outcome on the parent run (best value, best trial, best.yaml, curves)."""
        if not self.parent_id:
            return
        objs = _metric_objs(metrics, 0)
        for i in range(0, len(objs), METRICS_PER_BATCH):  # one per trial: thousands in a large search
            self.client.log_batch(self.parent_id, metrics=objs[i:i + METRICS_PER_BATCH])
        for k, v in tags.items():
            self.client.set_tag(self.parent_id, k, v)
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(self.parent_id, str(path))
        if tags.get("best_trial"):
            self._log_best_model(tags["best_trial"])

    def _log_best_model(self, trial_id: str) -> None:
        """The best trial's final weights as artifact ``best_model/`` of the parent run, so that
        ``dcanets.load_model("runs:/<parent run id>/best_model")`` works wherever the tracking
        store is reachable (the trial's checkpoint stays in the search folder or its storage).
        A checkpoint that cannot be read is one warning line: the search's outcome stands."""
        from dcanets.engine.export import export_model

        record = self.state.trials.get(trial_id)
        run_id = record.run_id if record else None
        path = self.client.get_run(run_id).data.tags.get("final_checkpoint") if run_id else None
        if not path:
            return
        try:
            with (_checkpoint_folder(path, self.state.location) as ckpt,
                  tempfile.TemporaryDirectory(prefix="dcanets-best-model-") as tmp):
                export_model(ckpt / "last.pt", tmp, trial_id=trial_id, run_id=run_id)
                self.client.log_artifacts(str(self.parent_id), tmp, artifact_path=BEST_MODEL)
        except (OSError, ValueError) as exc:
            print(f"dcanets tune: warning: the best model was not logged to MLflow: {exc}", file=sys.stderr)
            return
        self.client.set_tag(self.parent_id, BEST_MODEL, f"runs:/{self.parent_id}/{BEST_MODEL}")

    def flush(self) -> None:
        """Wait for the writes of this tracker's runs submitted so far (the writer's thread)."""
        self.writer.drain()

    # -- Tune callback hooks (called in the driver; the writes run on the writer's thread) -----
    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.submit(f"the start of trial {trial.trial_id}", self._open_run, trial.trial_id, str(trial),
                           dict(trial.config))

    def _open_run(self, trial_id: str, name: str, params: Dict[str, Any]) -> None:
        record = self.state.trials.get(trial_id)
        if record:  # restarted after an interruption: reopen the same run
            self.client.update_run(record.run_id, status="RUNNING")
            return
        run = self.client.create_run(self.state.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent_id, "trial_id": trial_id, "sampled": short_params(params)})
        with _disk_full_stops_the_search(self.state):
            self.state.add_trial(trial_id, run.info.run_id)
        self.state.share()  # with a storage: the run id there too, for a resume from the storage alone
        self._log_params(run.info.run_id, trial_params(getattr(self, "train", None) or {}, params))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.writer.submit(f"epoch {step} of trial {trial.trial_id}", self._log_result, trial.trial_id, step,
                           logged_metrics(result), {k: result[k] for k in WHERE if k in result})

    def _log_result(self, trial_id: str, step: int, metrics: Dict[str, float], where: Dict[str, Any]) -> None:
        record = self.state.trials.get(trial_id)
        if not record:  # its run could not be created (a warning said so)
            return
        self.client.log_batch(record.run_id, metrics=_metric_objs(metrics, step), tags=_node_tag(record, where))
        if where.get("checkpoint_path"):
            record.checkpoint = where["checkpoint_path"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if divergence.diverged(result):  # stopped by the engine: a failure, with the reason as tags
            self._end(trial, "FAILED", divergence.tags(result))
        else:
            self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    # -- helpers ----------------------------------------------------------------------------
    def _end(self, trial, status: str, tags: Optional[Dict[str, str]] = None) -> None:
        # the checkpoint Tune registered last (Trial.checkpoint), else the last one reported
        self.writer.submit(f"the end of trial {trial.trial_id}", self._close_run, trial.trial_id, status,
                           tags or {}, getattr(trial.checkpoint, "path", None))

    def _close_run(self, trial_id: str, status: str, tags: Dict[str, str], checkpoint: Optional[str]) -> None:
        record = self.state.trials.get(trial_id)
        if not record:
            return
        ckpt = checkpoint or record.checkpoint
        tags = {**tags, "final_checkpoint": ckpt} if ckpt else tags
        if tags:
            from mlflow.entities import RunTag

            self.client.log_batch(record.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(record.run_id, status)
        record.status = status
        with _disk_full_stops_the_search(self.state):
            self.state.save_trial(trial_id)
        self.state.share()

    def _running_children(self):
        runs = self.client.search_runs(
            [self.state.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'")
        return [r.info.run_id for r in runs]

    def _close_stale_children(self) -> None:
        # a driver killed by SIGKILL could not close them; the resumed search reopens as needed
        for run_id in self._running_children():
            self.client.set_terminated(run_id, "KILLED")

    def _log_params(self, run_id: str, params: Dict[str, Any]) -> None:
        log_params(self.client, run_id, params)


def _node_tag(record: TrialRecord, result: Dict[str, Any]) -> List[Any]:
    """The ``node_id`` tag when a trial reports from a node it was not on before (its first result,
    or a retry elsewhere): one write per node, not one per epoch. With it, ``world_size`` (the
    trial's processes) and, for a gang (dcanets.tune.gang), ``nodes``: every node of its workers."""
    from mlflow.entities import RunTag

    node = result.get("node_id")
    if not node or node == record.node_id:
        return []
    record.node_id = str(node)
    return [RunTag("node_id", str(node))] + [RunTag(k, str(result[k])) for k in ("world_size", "nodes") if k in result]


@contextlib.contextmanager
def _disk_full_stops_the_search(state: SearchState) -> Iterator[None]:
    """A full disk while a Tune callback writes ``search.json`` stops the search, as SIGUSR1 does.

    Tune blames an exception of a callback on the trial it was called for (ERROR, and a resumed
    search never runs it again), and the search would go on filling the disk. Instead the error is
    kept in ``state.write_error``, which the session raises once ``Tuner.fit`` has returned, and
    Tune is asked to stop through the SIGUSR1 handler it installs for that (Tune's documented way
    to end a run gracefully: trials stopped, its experiment state saved for ``--resume``).
    """
    import signal

    try:
        yield
    except DiskFull as exc:
        state.write_error = exc
        stop = signal.getsignal(signal.SIGUSR1)
        if callable(stop):
            stop(signal.SIGUSR1, None)


@contextlib.contextmanager
def _checkpoint_folder(path: str, location: Location) -> Iterator[Path]:
    """A trial checkpoint as a local folder: itself, or a download from the search's storage
    (``storage:``, where Ray keeps checkpoints as paths on the storage's filesystem)."""
    from ray.tune import Checkpoint

    with Checkpoint(path, filesystem=location.ray_filesystem).as_directory() as folder:
        yield Path(folder)


__all__ = ["BEST_MODEL", "EXPERIMENT_KIND", "FAILED_WRITES", "SearchTracker", "absolute_uri", "artifact_location",
           "check_uri", "choose_uri", "default_uri", "experiment_url", "flatten", "logged_metrics", "open_store"]
