"""MLflow for ``dcanets tune``: one parent run per search, one nested run per trial, from the driver.

Why not Ray's ``MLflowLoggerCallback``: it ends a trial's run only when the trial ends, so a
killed driver leaves runs RUNNING. Here all logging happens in the driver (workers on other
nodes never need to reach the tracking store), every run id is kept in ``search.json`` next to
the Ray results, and :meth:`SearchTracker.close` (called from a ``finally``) ends whatever is
still RUNNING as KILLED or FAILED. A resumed search re-opens the same parent run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ray.tune import Callback

NUMERIC = (int, float)


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


def check_uri(uri: str) -> None:
    """One ValueError line when the MLflow store at ``uri`` cannot be used, before any Ray start
    (a SQLite store is created here, as the search would create it)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        folder = Path(uri[len(prefix):]).parent
        if not folder.is_dir():
            raise ValueError(f"tracking uri {uri}: folder {folder} does not exist (create it, or give another "
                             "--tracking-uri / tracking.uri)")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"tracking uri {uri}: folder {folder} is not writable (give another --tracking-uri "
                             "/ tracking.uri, or --output a writable folder)")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, SQLAlchemy and connection errors alike
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        raise ValueError(f"tracking uri {uri}: MLflow cannot use it: {reason[:300]}") from None


# The MLflow 3 UI opens an experiment on its GenAI overview unless the experiment says it holds
# model training runs; this is the tag (and value) the UI reads for that.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class SearchTracker(Callback):
    """A Tune callback that mirrors trials into MLflow and records the run ids in ``state_path``."""

    def __init__(self, uri: str, experiment: str, state_path: Path) -> None:
        self.uri, self.experiment, self.state_path = uri, experiment, Path(state_path)
        self.client = _client(uri)
        self.state: Dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.state.setdefault("trials", {})
        self.parent_id: Optional[str] = self.state.get("parent_run_id")

    def __getstate__(self):  # Tune pickles callbacks into tuner.pkl; a client is not picklable
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state):  # Tuner.restore: reconnect and take the ids saved last
        self.__dict__.update(state)
        self.client = _client(self.uri)
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        self.parent_id = self.state.get("parent_run_id")

    # -- parent run -------------------------------------------------------------------------
    def start(self, params: Dict[str, Any], config_path: Path, tags: Dict[str, str]) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri))
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:  # a kind set by the user is kept
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        if self.parent_id:  # resumed search: same parent run, running again
            self.client.update_run(self.parent_id, status="RUNNING")
            self._close_stale_children()
        else:
            run = self.client.create_run(exp_id, run_name=tags.get("name"), tags=tags)
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)
            self.client.log_artifact(self.parent_id, str(config_path))
        self.state.update(parent_run_id=self.parent_id, experiment_id=exp_id, tracking_uri=self.uri)
        self._save()
        return self.parent_id

    def close(self, status: str) -> None:
        """End every run of this search that is still RUNNING (children KILLED unless FINISHED)."""
        if not self.parent_id:
            return
        child_status = "FINISHED" if status == "FINISHED" else ("FAILED" if status == "FAILED" else "KILLED")
        for run_id in self._running_children():
            self.client.set_terminated(run_id, child_status)
        self.client.set_terminated(self.parent_id, status)
        self._save()

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
        for trial_id in [t for t in self.state["trials"] if t not in restorable]:
            entry = self.state["trials"].pop(trial_id)
            try:
                self.client.delete_run(entry["run_id"])
            except Exception:  # already deleted by hand
                pass
        self._save()

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

    # -- Tune callback hooks (called in the driver) -------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        entry = self.state["trials"].get(trial.trial_id)
        if entry:  # restarted after an interruption: reopen the same run
            self.client.update_run(entry["run_id"], status="RUNNING")
            return
        exp_id = self.state["experiment_id"]
        run = self.client.create_run(exp_id, run_name=str(trial), tags={
            "mlflow.parentRunId": self.parent_id, "trial_id": trial.trial_id})
        self.state["trials"][trial.trial_id] = {"run_id": run.info.run_id}
        self._log_params(run.info.run_id, trial.config)
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self.state["trials"].get(trial.trial_id)
        if not entry:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = logged_metrics(result)
        self.client.log_batch(entry["run_id"], metrics=_metric_objs(metrics, step))
        if result.get("checkpoint_path"):
            entry["checkpoint"] = result["checkpoint_path"]
        if result.get("node_id"):
            self.client.set_tag(entry["run_id"], "node_id", result["node_id"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    # -- helpers ----------------------------------------------------------------------------
    def _end(self, trial, status: str) -> None:
        entry = self.state["trials"].get(trial.trial_id)
        if not entry:
            return
        ckpt = _final_checkpoint(trial) or entry.get("checkpoint")
        if ckpt:
            self.client.set_tag(entry["run_id"], "final_checkpoint", ckpt)
        self.client.set_terminated(entry["run_id"], status)
        entry["status"] = status
        self._save()

    def _running_children(self):
        runs = self.client.search_runs(
            [self.state["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'")
        return [r.info.run_id for r in runs]

    def _close_stale_children(self) -> None:
        # a driver killed by SIGKILL could not close them; the resumed search reopens as needed
        for run_id in self._running_children():
            self.client.set_terminated(run_id, "KILLED")

    def _log_params(self, run_id: str, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_path)


_LOGGED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s",
           "data_seconds", "fidelity_cos", "fidelity_sgd_cos")
_LOGGED_PREFIXES = ("fidelity_cos_",)  # the per-stage direction fidelity (TrainConfig.fidelity_every)


def logged_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """The numeric metrics of a trial's result that go to MLflow: the fixed ``_LOGGED`` names and
    the per-stage ``fidelity_cos_<stage>`` ones (``train: {fidelity_every: N}``); bools and
    non-numbers (the ``fidelity`` list) are left out."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, NUMERIC) and not isinstance(v, bool) and (k in _LOGGED or k.startswith(_LOGGED_PREFIXES))}


def _metric_objs(metrics: Dict[str, float], step: int):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in metrics.items()]


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _final_checkpoint(trial) -> Optional[str]:
    ckpt = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
    latest = getattr(ckpt, "latest_checkpoint_result", None) if ckpt else None
    return getattr(getattr(latest, "checkpoint", None), "path", None)
