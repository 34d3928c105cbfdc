"""MLflow for the engine's runs, and the store helpers ``dcanets tune`` shares.

The store: which tracking URI (:func:`choose_uri`: the command's flag, the file's ``tracking.uri``,
``MLFLOW_TRACKING_URI``, else SQLite under the output root), checked before anything starts
(:func:`check_uri`: one line for a store MLflow cannot use), artifacts of a SQLite store beside it.
:class:`RunTracker` is ``dcanets train`` in MLflow: one run with the full ``TrainConfig`` as
params, the engine's metrics per epoch (step = epoch), the run's metrics.json and config, the
trained network as artifact ``model/`` (``dcanets.load_model("runs:/<run_id>/model")``), and a
status that says how the run ended (FINISHED; FAILED on an error or a diverged loss; KILLED on
Ctrl-C). ``dcanets.tune.tracking`` logs searches with the same helpers from Ray's driver. Nothing
here imports MLflow until a store is used, and nothing imports Ray.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

NUMERIC = (int, float)
URI_VARIABLE = "MLFLOW_TRACKING_URI"  # MLflow's own variable: every MLflow client follows it


def choose_uri(flag: Optional[str], configured: Optional[str], root: Path) -> Tuple[str, Optional[str]]:
    """The tracking URI of a new search or training run, and where it came from when that is not in
    the command or the file (``MLFLOW_TRACKING_URI``, for messages), first given first:
    ``--tracking-uri``, ``tracking.uri``, ``$MLFLOW_TRACKING_URI``, else SQLite under ``root``.

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


def client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new store
    # MLflow prints "View run ... at" / "View experiment at" links for a server's runs, which open its
    # GenAI views (experiment_url gives the one that opens the runs): its documented switch, unless set
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
    ValueError line when MLflow cannot use it.

    A SQLite store is opened under a lock beside it (``mlflow.db.lock``): MLflow creates the
    tables of a new file without one, and two searches started at once on a fresh ``--output``
    both ran the migrations, one failing ("table tags already exists", "Circular dependency
    detected"). The second now waits for the first's migrations, then finds the tables made.
    """
    with _creation_lock(uri, origin):
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:  # MlflowException, SQLAlchemy and connection errors alike
            raise ValueError(f"{_named(uri, origin)}: {_problem(uri, exc)}") from None


STORE_LOCK_WAIT_S = 600.0  # MLflow's migrations of a new store take seconds; minutes on a loaded machine


@contextlib.contextmanager
def _creation_lock(uri: str, origin: Optional[str]) -> Iterator[None]:
    """An exclusive lock on ``<store>.lock`` for a SQLite store; nothing for a server."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    from dcanets.engine.rundir import FolderLock

    path = Path(uri[len(prefix):])
    lock = FolderLock(path.with_name(path.name + ".lock"))
    try:
        acquired = lock.acquire(wait=STORE_LOCK_WAIT_S)
    except OSError as exc:
        raise ValueError(f"{_named(uri, origin)}: cannot lock it for its creation ({exc.strerror or exc})") from None
    if not acquired:
        raise ValueError(f"{_named(uri, origin)}: {lock.holder()} has held it for {STORE_LOCK_WAIT_S:.0f} s while "
                         "creating it; stop that process or give another --tracking-uri")
    try:
        lock.record_holder()
        yield
    finally:
        lock.release()


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


def experiment_url(uri: str, experiment_id: Optional[str]) -> Optional[str]:
    """The link that opens the experiment on its runs in a tracking server's UI (MLflow 3.17 opens
    an experiment on its GenAI views unless the link says ``workflowType=machine_learning``);
    None for a store without a UI address (SQLite: ``mlflow ui`` chooses the port)."""
    if not experiment_id or not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


_LOGGED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s",
           "data_seconds", "fidelity_cos", "fidelity_sgd_cos",
           "val_acc5", "val_loss_ema", "val_acc_ema", "val_acc5_ema")  # top-5 and model_ema (engine/recipe.py)
# the per-stage direction fidelity (TrainConfig.fidelity_every), what a decomposition measured for ρ (dca_rho, ...)
_LOGGED_PREFIXES = ("fidelity_cos_", "dca_")


def logged_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """The numeric metrics of an epoch's result that go to MLflow: the fixed ``_LOGGED`` names, the
    per-stage ``fidelity_cos_<stage>`` ones (``fidelity_every: N``) and the ``dca_*`` curvature
    measurements; bools and non-numbers (the ``fidelity`` list) are left out."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, NUMERIC) and not isinstance(v, bool) and (k in _LOGGED or k.startswith(_LOGGED_PREFIXES))}


def metric_objs(metrics: Dict[str, float], step: int):
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


def log_params(mlflow_client: Any, run_id: str, params: Dict[str, Any]) -> None:
    """``params`` (nested mappings flattened to dotted keys) as the run's MLflow params, 100 per call."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i:i + 100])


def ui_command(uri: str) -> Optional[str]:
    """``mlflow ui --backend-store-uri sqlite:///...`` for a SQLite store (a server has its own UI
    address, :func:`experiment_url`); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def experiment_id(mlflow_client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a SQLite store, the "Machine
    learning" kind) when it does not exist yet."""
    exp = mlflow_client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment(
        name, artifact_location=artifact_location(uri))
    if exp is None or EXPERIMENT_KIND[0] not in exp.tags:  # a kind set by the user is kept
        mlflow_client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    return exp_id


RUN_FILE = "mlflow_run.json"  # in a training run's output folder: the run a --resume continues
MODEL = "model"  # artifact folder of a training run: its final network (engine/export.py)
SUMMARY = ("best_val_acc", "wall_seconds", "eval_loss", "eval_acc")  # logged once, at the last epoch's step


class RunTracker:
    """One ``dcanets train`` run in MLflow (see the module docstring).

    ``start`` opens the run (or, when ``output`` holds the record of an earlier session of the same
    run, reopens it: a ``--resume`` continues one run), ``on_epoch`` wraps the engine's callback,
    ``finish`` logs what the run left (final metrics, metrics.json, the model) and ends it. Used as
    a context manager, the run is ended whatever happens: KILLED on KeyboardInterrupt, FAILED on
    any other exception.
    """

    def __init__(self, uri: str, experiment: str, output: Path, origin: Optional[str] = None) -> None:
        self.uri, self.experiment, self.output, self.origin = uri, experiment, Path(output), origin
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.status: Optional[str] = None
        self.world_size: Optional[int] = None  # the tag of this session's processes, once written

    @classmethod
    def resumed(cls, output: Path) -> Optional["RunTracker"]:
        """The tracker of the run recorded in ``output`` (a run started with tracking), else None."""
        record = Path(output) / RUN_FILE
        if not record.is_file():
            return None
        saved = json.loads(record.read_text())
        tracker = cls(saved["tracking_uri"], saved["experiment"], Path(output))
        tracker.run_id = saved["run_id"]
        return tracker

    def start(self, config: Dict[str, Any], run_name: str) -> str:
        """Open the run: the full config as params (a new run), or RUNNING again (a resumed one)."""
        check_uri(self.uri, self.origin)
        self.client = client(self.uri)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id
        exp_id = experiment_id(self.client, self.uri, self.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={
            "output": str(self.output.resolve()), "model": str(config.get("model"))}).info.run_id
        log_params(self.client, self.run_id, config)
        return self.run_id

    def on_epoch(self, callback: Optional[Callable[[Dict[str, Any]], None]]) -> Callable[[Dict[str, Any]], None]:
        """``callback`` (may be None) after the epoch's metrics are logged (step = epoch); the first
        epoch also records the run in the output folder, for ``--resume`` (with the checkpoint), and
        tags the run with ``world_size`` (its processes, as a search's trial runs are tagged)."""
        def logged(metrics: Dict[str, Any]) -> None:
            assert self.run_id is not None  # start() ran
            self.client.log_batch(self.run_id, metrics=metric_objs(logged_metrics(metrics), int(metrics["epoch"])))
            if metrics.get("world_size", 1) != self.world_size:
                self.world_size = int(metrics.get("world_size", 1))
                self.client.set_tag(self.run_id, "world_size", str(self.world_size))
            record = self.output / RUN_FILE
            if not record.is_file():
                record.write_text(json.dumps({"tracking_uri": self.uri, "experiment": self.experiment,
                                              "run_id": self.run_id}, indent=2))
            if callback is not None:
                callback(metrics)
        return logged

    def finish(self, final: Dict[str, Any]) -> None:
        """The run's summary metrics, metrics.json and the model (from the output's last.pt); then
        FINISHED, or FAILED with tag ``diverged`` when the loss became non-finite."""
        assert self.run_id is not None  # start() ran
        summary = {k: float(final[k]) for k in SUMMARY if isinstance(final.get(k), (int, float))}
        self.client.log_batch(self.run_id, metrics=metric_objs(summary, int(final.get("epoch", 0))))
        if (self.output / "metrics.json").is_file():
            self.client.log_artifact(self.run_id, str(self.output / "metrics.json"))
        self._log_model()
        diverged = bool(final.get("diverged"))
        if diverged:
            self.client.set_tag(self.run_id, "diverged", "true")
        self._end("FAILED" if diverged else "FINISHED")

    def _log_model(self) -> None:
        from dcanets.engine.export import export_model

        checkpoint = self.output / "last.pt"
        if not checkpoint.is_file():
            return
        with tempfile.TemporaryDirectory(prefix="dcanets-model-") as tmp:
            export_model(checkpoint, tmp, run_id=self.run_id)
            self.client.log_artifacts(self.run_id, tmp, artifact_path=MODEL)
        self.client.set_tag(self.run_id, "model_uri", f"runs:/{self.run_id}/{MODEL}")

    def _end(self, status: str) -> None:
        if self.run_id is not None and self.client is not None and self.status is None:
            self.client.set_terminated(self.run_id, status)
            self.status = status

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None:
            self._end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
        else:
            self._end("FINISHED")

    def summary_line(self) -> str:
        """Where the run is, and how to look at it."""
        where = experiment_url(self.uri, None) or self.uri
        ui = ui_command(self.uri)
        return (f"MLflow run {self.run_id} ({self.status}) in {where}; model: runs:/{self.run_id}/{MODEL}"
                + (f"; view it with: {ui}" if ui else ""))


__all__ = ["EXPERIMENT_KIND", "MODEL", "RUN_FILE", "RunTracker", "URI_VARIABLE", "absolute_uri", "artifact_location",
           "check_uri", "choose_uri", "client", "default_uri", "experiment_id", "experiment_url", "flatten",
           "log_params", "logged_metrics", "metric_objs", "open_store", "ui_command"]
