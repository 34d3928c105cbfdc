"""``dcanets tune CONFIG.yaml``: a Ray Tune + Optuna search whose every trial is one engine run.

The driver validates the YAML (every problem with its path) and the plugin names before Ray
starts, then runs ``tune.Tuner`` with ``OptunaSearch`` (define-by-run space, so ``when:`` and
``times:`` conditions work) and the declared scheduler. Each trial is ``dcanets.engine.train`` in
a Ray worker that imports dcanets itself (plugin registration happens per process), reports
every epoch with a checkpoint, and resumes from it after ``--resume``. MLflow logging lives in
the driver (``dcanets.tune.tracking``). Outputs: one progress line per trial epoch, a table of the
best trials, ``best.yaml`` for ``dcanets train --config``, ``curves.png`` and ``trials.csv``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ray.tune import Callback

from dcanets.tune import schema as tune_config
from dcanets.tune.report import short_params

DEFAULT_OUTPUT = Path("runs") / "tune"
STATE = "search.json"  # run ids and the paths a resume needs, next to Ray's experiment state


def create_search_dir(spec: tune_config.TuneSpec, root: Path, tracking_uri: Optional[str] = None):
    """``<root>/<name>-<time>/`` with a copy of the YAML and ``search.json`` (what --resume reads);
    the MLflow store defaults to ``sqlite:///<root>/mlflow.db``, shared by the searches under root."""
    from dcanets.tune.tracking import absolute_uri, default_uri

    root = Path(root).expanduser().resolve()
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    exp_dir = root / f"{spec.name}-{stamp}"
    while exp_dir.exists():  # two searches started within the same second
        n += 1
        exp_dir = root / f"{spec.name}-{stamp}-{n}"
    exp_dir.mkdir(parents=True)
    shutil.copy(spec.path, exp_dir / "config.yaml")
    uri = tracking_uri or spec.tracking["uri"]
    state = {"config_dir": str(spec.path.parent), "config_path": str(spec.path),
             "tracking_uri": absolute_uri(uri) if uri else default_uri(root),
             "experiment": spec.tracking["experiment"] or spec.name,
             "num_samples": spec.tune_config["num_samples"], "trials": {}}
    (exp_dir / STATE).write_text(json.dumps(state, indent=2))
    return exp_dir, state


# ---------------------------------------------------------------------------------------- trial
def trial(params: Dict[str, Any], base: Dict[str, Any]) -> None:
    """One Ray Tune trial = one engine run. Runs in a Ray worker process."""
    import ray
    from ray import tune

    import dcanets  # noqa: F401  (plugin models/decompositions into this worker's timm registries)
    from dcanets.engine import TrainConfig, train

    cfg = tune_config.trial_train_config(base, params)
    # the engine writes last.pt here each epoch and the folder is reported as the checkpoint
    # (Tune copies it into the trial folder); kept outside the trial folder, which Ray syncs
    out = Path(tempfile.mkdtemp(prefix="dcanets-trial-"))
    cfg["output"] = str(out)
    node = ray.get_runtime_context().get_node_id()
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # --resume or a retried trial: continue from the last reported epoch
        with ckpt.as_directory() as d:
            shutil.copy(Path(d) / "last.pt", out / "last.pt")
        resume = out / "last.pt"

    def on_epoch(m: Dict[str, Any]) -> None:
        path = m.pop("checkpoint", None)
        m.update(node_id=node, pid=os.getpid(), gpu_ids=",".join(map(str, ray.get_gpu_ids())))
        tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(out)) if path else None)

    try:
        train(TrainConfig.from_dict(cfg), on_epoch=on_epoch, resume=resume)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------- search
def run_search(spec: tune_config.TuneSpec, exp_dir: Path, state: Dict[str, Any], *, address: Optional[str] = None,
               num_cpus: Optional[int] = None, resume: bool = False, quiet: bool = False,
               worker_logs: bool = False) -> Dict[str, Any]:
    """Run (or resume) the search; MLflow runs are ended in every exit path."""
    import ray
    from ray import tune

    from dcanets.tune.tracking import SearchTracker

    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    started_ray = _init_ray(address, num_cpus, worker_logs)
    timings["ray_init"] = time.perf_counter() - t0
    tracker, status, previous_term = None, "FAILED", signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)  # `kill`, batch schedulers: stop like Ctrl-C
    try:
        if spec.tracking["enabled"]:
            t0 = time.perf_counter()
            tracker = SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE)
            tracker.start(_flat_params(spec), exp_dir / "config.yaml",
                          {"name": exp_dir.name, "config": str(spec.path), "ray_results": str(exp_dir)})
            timings["mlflow_start"] = time.perf_counter() - t0
        trainable = tune.with_resources(tune.with_parameters(trial, base=spec.train),
                                        {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
        callbacks = [c for c in (tracker, None if quiet else ProgressLines(spec)) if c]
        if resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True)
        else:
            tuner = _new_tuner(spec, exp_dir, trainable, callbacks)
        t0 = time.perf_counter()
        grid = tuner.fit()
        seconds = timings["fit"] = time.perf_counter() - t0
        trials = _collect(grid, spec)
        interrupted = any(t["status"] not in ("TERMINATED", "ERROR") for t in trials) or \
            len(trials) < state.get("num_samples", 0) and spec.tune_config.get("time_budget_s") is None
        n_ok = sum(t["status"] == "TERMINATED" for t in trials)
        status = "KILLED" if interrupted else ("FINISHED" if n_ok else "FAILED")
        return {"status": status, "trials": trials, "seconds": seconds, "grid": grid, "timings": timings}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        t0 = time.perf_counter()
        if tracker and tracker.parent_id:  # a fresh reader of search.json: Tune may hold a restored copy
            SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE).close(status)
        if started_ray:
            ray.shutdown()
        timings["teardown"] = time.perf_counter() - t0


def _new_tuner(spec, exp_dir: Path, trainable, callbacks):
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=tune_config.build_search_alg(spec),
                                    scheduler=tune_config.build_scheduler(spec), **spec.tune_config),
        run_config=tune.RunConfig(
            name=exp_dir.name, storage_path=str(exp_dir.parent), callbacks=callbacks, verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=0)))


def _init_ray(address: Optional[str], num_cpus: Optional[int], worker_logs: bool) -> bool:
    """Join ``address`` or start a local Ray; False when Ray was already up (tests, notebooks)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # one checkpoint per epoch is the design; Tune's "snapshotting too often" warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=worker_logs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=worker_logs)
    return True


def _sigterm_as_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _sigterm_as_sigint:
        handler(signal.SIGINT, frame)  # Tune's handler: stop trials, save state, return
    else:
        raise KeyboardInterrupt


def _flat_params(spec: tune_config.TuneSpec) -> Dict[str, Any]:
    from dcanets.tune.tracking import _flatten

    return {**_flatten({"train": spec.train}), **_flatten({"tune_config": spec.tune_config}),
            **_flatten({"scheduler": spec.scheduler}), **_flatten({"search_alg": spec.search_alg}),
            **_flatten({"resources": spec.resources}), "space": json.dumps(spec.space)}


class ProgressLines(Callback):
    """One line per trial per epoch, in the driver (Ray's own table is switched off: verbose=0)."""

    def __init__(self, spec: tune_config.TuneSpec) -> None:
        self.metric, self.epochs, self.t0 = spec.metric, int(spec.train["epochs"]), time.time()

    def _say(self, trial, text: str) -> None:
        print(f"{time.time() - self.t0:6.1f}s [{trial.trial_id}] {text}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._say(trial, f"epoch {result.get('epoch', '?')}/{self.epochs}  "
                         f"{self.metric}={result.get(self.metric, float('nan')):.4f}  "
                         f"train_loss={result.get('train_loss', float('nan')):.4f}  lr={result.get('lr', 0):.3g}  "
                         f"{result.get('epoch_seconds', 0):.1f}s  node={str(result.get('node_id', '?'))[:8]}  "
                         f"{short_params(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, f"FAILED: see {trial.local_path}/error.txt")


def _collect(grid, spec: tune_config.TuneSpec) -> List[Dict[str, Any]]:
    """One dict per trial: id, status, params, the per-epoch history and the best metric value."""
    from dcanets import _compat

    out = []
    # statuses live on the Trial objects, which ResultGrid does not expose (see _compat)
    for res, trial in zip(grid, _compat.result_grid_trials(grid)):
        status = trial.status
        df = res.metrics_dataframe
        # an epoch re-run after an interruption appears twice in Tune's log: keep the last one
        hist = list({h.get("epoch"): h for h in (df.to_dict("records") if df is not None else [])}.values())
        vals = [h[spec.metric] for h in hist if tune_config.is_finite(h.get(spec.metric))]
        best = (max(vals) if spec.mode == "max" else min(vals)) if vals else float("nan")
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name
        # a trial stopped by time_budget_s before its first report has no result: take its
        # sampled config from the Trial itself
        out.append({"trial_id": trial_id, "status": status, "params": res.config or trial.config, "best": best,
                    "epochs": len(hist), "history": hist, "node_id": (res.metrics or {}).get("node_id"),
                    "checkpoint": res.checkpoint.path if res.checkpoint else None})
    return out
