"""MLflow for ``dcanets tune``: one parent run per search, one nested run per trial, from the driver.

Why not Ray's ``MLflowLoggerCallback``: it ends a trial's run only when the trial ends, so a
killed driver leaves runs RUNNING. Here all logging happens in the driver (workers on other
nodes never need to reach the tracking store), every run id is kept in the search's state
(``search.json``, next to the Ray results), and :meth:`SearchTracker.close` (called from a
``finally``) ends whatever is still RUNNING as KILLED or FAILED. A resumed search re-opens the
same parent run.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from dcanets.tune.callbacks import SessionCallback
from dcanets.tune.state import SearchState, TrialRecord
from dcanets.tune.storage import Location

NUMERIC = (int, float)
URI_VARIABLE = "MLFLOW_TRACKING_URI"  # MLflow's own variable: every MLflow client follows it


def choose_uri(flag: Optional[str], configured: Optional[str], root: Path) -> Tuple[str, Optional[str]]:
    """The tracking URI of a new search, and where it came from when that is not in the command or
    the file (``MLFLOW_TRACKING_URI``, for messages), first given first: ``--tracking-uri``,
    ``tracking.uri``, ``$MLFLOW_TRACKING_URI``, else SQLite under ``--output``.

    Why the variable: a user of MLflow sets it once for every tool (``mlflow``, ``load_model``);
    the explicit choices of the command and of the file still come before it.
    """
    if flag or configured:
        return absolute_uri(str(flag or configured)), None
    variable = os.environ.get(URI_VARIABLE, "").strip()
    if variable:
        return absolute_uri(variable), URI_VARIABLE
    return default_uri(root), None


def default_uri(root: Path) -> str:
    """SQLite under the output folder (MLflow 3 refuses the old ./mlruns file store). Absolute,
    because Tune changes each trial's working directory."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """``sqlite:///relative.db`` -> absolute; servers and other schemes pass through."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    if "://" not in uri:  # a bare path to a .db file
        return prefix + str(Path(uri).resolve())
    return uri


def artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a SQLite store go beside the database; MLflow's default would be ``./mlruns``
    under whatever directory the search was started from. Servers choose their own."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlartifacts").as_uri()
    return None


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new store
    return MlflowClient(tracking_uri=uri)


def check_uri(uri: str, origin: Optional[str] = None) -> None:
    """One ValueError line when the MLflow store at ``uri`` cannot be used, before any Ray start;
    ``origin`` (``MLFLOW_TRACKING_URI``) is named in it, as the user may not see the URI anywhere.

    A SQLite file that does not exist yet is checked by its folder only: creating it runs MLflow's
    schema migrations (2-7 s on 2 cores), which :func:`open_store` does while Ray starts.
    """
    name = _named(uri, origin)
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if not path.parent.is_dir():
            raise ValueError(f"{name}: folder {path.parent} does not exist (create it, or give another "
                             "--tracking-uri / tracking.uri)")
        if not os.access(path.parent, os.W_OK):
            raise ValueError(f"{name}: folder {path.parent} is not writable (give another --tracking-uri "
                             "/ tracking.uri, or --output a writable folder)")
        if not path.exists():
            return
    with _one_try():
        open_store(uri, origin)


def open_store(uri: str, origin: Optional[str] = None) -> None:
    """Reach the MLflow store at ``uri`` (a SQLite file that does not exist yet is created); one
    ValueError line when MLflow cannot use it."""
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, SQLAlchemy and connection errors alike
        raise ValueError(f"{_named(uri, origin)}: {_problem(uri, exc)}") from None


def _named(uri: str, origin: Optional[str]) -> str:
    return f"tracking uri {uri}" + (f" (from {origin})" if origin else "")


# urllib3's "[Errno 111] Connection refused", "[Errno -2] Name or service not known", ...
_CONNECTION_ERROR = re.compile(r"\[Errno -?\d+\] ([^\"')(]+)")


def _problem(uri: str, exc: Exception) -> str:
    """The first line of MLflow's error; for a server that cannot be reached, what to do instead
    of the chain of urllib3 exceptions MLflow reports."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    refused = _CONNECTION_ERROR.search(lines[0]) if lines and uri.startswith(("http://", "https://")) else None
    if refused:
        return (f"no MLflow server answers there ({refused.group(1).strip()}); start it (mlflow server ...) or "
                "give another --tracking-uri / tracking.uri")
    return f"MLflow cannot use it: {(lines[0] if lines else type(exc).__name__)[:300]}"


@contextlib.contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's HTTP client retries a failed request 7 times with growing pauses: a server that is
    down took about 4 minutes to be reported. The check asks once, with a 10 s timeout (MLflow's
    documented variables, set only for the check); the search keeps MLflow's retries."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# What the experiment holds, in MLflow's words: the tag and value MLflow's UI itself writes when a
# user marks an experiment "Machine learning" (as opposed to "GenAI apps & agents"), and reads to
# open it on its training runs instead of the GenAI overview while its workflow switch is off.
# MLflow 3.17's UI has the switch on: the view then follows the URL's ?workflowType=... (else the
# last choice, kept in the browser; GenAI at first), hence the link of `experiment_url`.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
BEST_MODEL = "best_model"  # artifact folder of the parent run: the best trial's final weights


def experiment_url(uri: str, experiment_id: Optional[str]) -> Optional[str]:
    """The link that opens the experiment on its runs in a tracking server's UI (MLflow 3.17 opens
    an experiment on its GenAI views unless the link says ``workflowType=machine_learning``);
    None for a store without a UI address (SQLite: ``mlflow ui`` chooses the port)."""
    if not experiment_id or not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class SearchTracker(SessionCallback):
    """A Tune callback that mirrors trials into MLflow and records the run ids in the search's state.

    Per-epoch metrics are written by a background thread: a Tune function trial waits in
    ``tune.report`` until the driver has run every callback on its result, and one ``log_batch``
    to SQLite took 33 ms, paid by every epoch of every trial. The writes of a run are waited for
    before the run is ended. (MLflow's own ``log_batch(synchronous=False)`` stops its logging
    thread at every ``set_terminated``, 0.5-1 s per trial.) The writes in flight and the writer
    thread are this instance's: ``close`` is called on the tracker Tune ran (after ``--resume``,
    the copy restored from ``tuner.pkl``, bound to this session by :meth:`bind`).
    """

    def __init__(self, state: SearchState) -> None:
        self.state = state
        self.uri, self.experiment = state.tracking_uri, state.experiment
        self._connect()

    def _connect(self) -> None:
        self.client = _client(self.uri)
        self.in_flight: Dict[str, List[concurrent.futures.Future]] = {}  # metric writes, per run id
        self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None  # one thread: writes in order

    def __getstate__(self):  # Tune pickles callbacks into tuner.pkl; a client or a thread is not picklable
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "in_flight", "_writer")}

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
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri))
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:  # a kind set by the user is kept
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
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
        for run_id in list(self.in_flight):
            try:
                self._settle(run_id)
            except Exception as exc:  # this runs in a finally: the runs are ended all the same
                print(f"dcanets tune: warning: metrics of MLflow run {run_id} were not all logged: {exc}",
                      file=sys.stderr)
        if self._writer is not None:
            self._writer.shutdown(wait=False)
            self._writer = None
        for run_id in self._running_children():
            self.client.set_terminated(run_id, child_status)
        self.client.set_terminated(self.parent_id, status)

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
        self.client.log_batch(self.parent_id, metrics=_metric_objs(metrics, 0))
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

    # -- Tune callback hooks (called in the driver) -------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        record = self.state.trials.get(trial.trial_id)
        if record:  # restarted after an interruption: reopen the same run
            self.client.update_run(record.run_id, status="RUNNING")
            return
        run = self.client.create_run(self.state.experiment_id, run_name=str(trial), tags={
            "mlflow.parentRunId": self.parent_id, "trial_id": trial.trial_id})
        self.state.add_trial(trial.trial_id, run.info.run_id)
        self._log_params(run.info.run_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        record = self.state.trials.get(trial.trial_id)
        if not record:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = logged_metrics(result)
        write = self._in_background(self.client.log_batch, record.run_id, metrics=_metric_objs(metrics, step),
                                    tags=_node_tag(record, result))
        self.in_flight.setdefault(record.run_id, []).append(write)
        if result.get("checkpoint_path"):
            record.checkpoint = result["checkpoint_path"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    # -- helpers ----------------------------------------------------------------------------
    def _end(self, trial, status: str) -> None:
        record = self.state.trials.get(trial.trial_id)
        if not record:
            return
        self._settle(record.run_id)
        # the checkpoint Tune registered last (Trial.checkpoint), else the last one reported
        ckpt = getattr(trial.checkpoint, "path", None) or record.checkpoint
        if ckpt:
            self.client.set_tag(record.run_id, "final_checkpoint", ckpt)
        self.client.set_terminated(record.run_id, status)
        record.status = status
        self.state.save_trial(trial.trial_id)

    def _in_background(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """``write(*args, **kwargs)`` on this tracker's writer thread (started at the first write)."""
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcanets-mlflow")
        return self._writer.submit(write, *args, **kwargs)

    def _settle(self, run_id: str) -> None:
        """Wait for the metric writes of ``run_id`` still in flight (MLflow's error if one failed)."""
        for write in self.in_flight.pop(run_id, []):
            write.result()

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
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


_LOGGED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s",
           "data_seconds", "fidelity_cos", "fidelity_sgd_cos")
_LOGGED_PREFIXES = ("fidelity_cos_",)  # the per-stage direction fidelity (TrainConfig.fidelity_every)


def logged_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """The numeric metrics of a trial's result that go to MLflow: the fixed ``_LOGGED`` names and
    the per-stage ``fidelity_cos_<stage>`` ones (``train: {fidelity_every: N}``); bools and
    non-numbers (the ``fidelity`` list) are left out."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, NUMERIC) and not isinstance(v, bool) and (k in _LOGGED or k.startswith(_LOGGED_PREFIXES))}


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


def _metric_objs(metrics: Dict[str, float], step: int):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in metrics.items()]


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``): MLflow params."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def _checkpoint_folder(path: str, location: Location) -> Iterator[Path]:
    """A trial checkpoint as a local folder: itself, or a download from the search's storage
    (``storage:``, where Ray keeps checkpoints as paths on the storage's filesystem)."""
    from ray.tune import Checkpoint

    with Checkpoint(path, filesystem=location.ray_filesystem).as_directory() as folder:
        yield Path(folder)


__all__ = ["BEST_MODEL", "EXPERIMENT_KIND", "SearchTracker", "absolute_uri", "artifact_location", "check_uri",
           "choose_uri", "default_uri", "experiment_url", "flatten", "logged_metrics", "open_store"]
