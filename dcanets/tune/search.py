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

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from ray.tune import Callback

from dcanets.tune import schema as tune_config
from dcanets.tune.report import short_params

DEFAULT_OUTPUT = Path("runs") / "tune"
STATE = "search.json"  # run ids and the paths a resume needs, next to Ray's experiment state


def create_search_dir(spec: tune_config.TuneSpec, root: Path, tracking_uri: Optional[str] = None):
    """``<root>/<name>-<time>/`` with a copy of the YAML and ``search.json`` (what --resume reads);
    the MLflow store defaults to ``sqlite:///<root>/mlflow.db``, shared by the searches under root."""
    from dcanets.tune.tracking import absolute_uri, check_uri, default_uri

    root = Path(root).expanduser().resolve()
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    exp_dir = root / f"{spec.name}-{stamp}"
    while exp_dir.exists():  # two searches started within the same second
        n += 1
        exp_dir = root / f"{spec.name}-{stamp}-{n}"
    exp_dir.mkdir(parents=True)
    try:
        shutil.copy(spec.path, exp_dir / "config.yaml")
        uri = tracking_uri or spec.tracking["uri"]
        state = {"config_dir": str(spec.path.parent), "config_path": str(spec.path),
                 "tracking_uri": absolute_uri(uri) if uri else default_uri(root),
                 "experiment": spec.tracking["experiment"] or spec.name,
                 "num_samples": spec.tune_config["num_samples"], "trials": {}}
        if spec.tracking["enabled"]:
            check_uri(state["tracking_uri"])  # a store MLflow cannot use: one line, before Ray starts
        (exp_dir / STATE).write_text(json.dumps(state, indent=2))
    except BaseException:
        shutil.rmtree(exp_dir, ignore_errors=True)
        raise
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
    """Run (or resume) the search; MLflow runs are ended in every exit path.

    The status is FINISHED (the search ran to its end or its time budget), KILLED (a signal
    stopped it, or trials were left unfinished: ``--resume`` continues it) or FAILED (every
    trial crashed). Raises ValueError before any trial starts when no Ray node can run one.
    """
    import ray
    from ray import tune

    from dcanets.tune.tracking import SearchTracker

    timings: Dict[str, float] = {}
    tracker, status = None, "FAILED"
    stop = _Interruption()
    earlier = float(state.get("fit_seconds", 0.0))  # --resume: time spent by the earlier sessions
    t_fit = None
    with stop.catching():  # Ctrl-C / `kill` / batch schedulers: stop the Tune way, then report KILLED
        try:
            t0 = time.perf_counter()
            started_ray = _init_ray(address, num_cpus, worker_logs)
            stop.install()  # again: ray.init puts its own (fatal) SIGTERM handler in the driver
            timings["ray_init"] = time.perf_counter() - t0
            try:
                check_resources(spec.resources, address)
                if spec.tracking["enabled"]:
                    t0 = time.perf_counter()
                    tracker = SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE)
                    tracker.start(_flat_params(spec), exp_dir / "config.yaml",
                                  {"name": exp_dir.name, "config": str(spec.path), "ray_results": str(exp_dir)})
                    if resume:  # runs of trials created after Tune's last snapshot: Tune never restores them
                        tracker.drop_orphans(_restorable_trial_ids(exp_dir))
                    timings["mlflow_start"] = time.perf_counter() - t0
                trainable = tune.with_resources(tune.with_parameters(trial, base=spec.train),
                                                {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
                callbacks = [c for c in (tracker, None if quiet else ProgressLines(spec, earlier), Outcomes()) if c]
                Outcomes.ended = set(state.get("ended_trials", []))  # those of the earlier sessions too
                if resume:
                    tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True)
                else:
                    tuner = _new_tuner(spec, exp_dir, trainable, callbacks)
                ProgressLines.resumed_at = earlier  # the restored copy of the callback continues the clock
                t_fit = time.perf_counter()
                grid = tuner.fit()
                timings["fit"] = time.perf_counter() - t_fit
                trials = _collect(grid, spec, cut_by_stop=stop.received)
                interrupted = stop.received or any(t["status"] not in ("TERMINATED", "ERROR") for t in trials)
                n_ok = sum(t["status"] == "TERMINATED" for t in trials)
                status = "KILLED" if interrupted else ("FINISHED" if n_ok else "FAILED")
                return {"status": status, "trials": trials, "seconds": earlier + timings["fit"], "grid": grid,
                        "timings": timings, "signal": stop.name, "errors": _errors(grid) if n_ok == 0 else []}
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                t0 = time.perf_counter()
                if t_fit is not None:
                    _save_state(exp_dir, fit_seconds=earlier + (time.perf_counter() - t_fit), status=status,
                                ended_trials=sorted(Outcomes.ended))
                if tracker and tracker.parent_id:  # a fresh reader of search.json: Tune may hold a restored copy
                    SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE).close(status)
                if started_ray:
                    ray.shutdown()
                timings["teardown"] = time.perf_counter() - t0
        except KeyboardInterrupt:
            raise SearchInterrupted(stop.name or "SIGINT", started=(exp_dir / "tuner.pkl").exists()) from None


class SearchInterrupted(KeyboardInterrupt):
    """A second signal (or one before Tune took over): the search stopped without a final report."""

    def __init__(self, signal_name: str, started: bool) -> None:
        super().__init__(signal_name)
        self.signal_name, self.started = signal_name, started


class _Interruption:
    """SIGINT and SIGTERM during a search, both handled alike and remembered.

    The first signal asks Tune to stop (trials stopped, experiment state saved, ``fit`` returns)
    through Tune's SIGUSR1 handler, which ``tune.run`` installs next to its SIGINT one; Tune's own
    SIGINT handler is switched off with ``TUNE_DISABLE_SIGINT_HANDLER`` (a documented Tune
    variable) so that dcanets sees every signal: a search stopped by Ctrl-C must end KILLED even
    when its trials were marked TERMINATED by the stop, which ``fit``'s result alone cannot tell
    from a search that ran out of its time budget. A second signal, or one that arrives before
    Tune runs, raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.name: Optional[str] = None

    @property
    def received(self) -> bool:
        return self.name is not None

    @contextlib.contextmanager
    def catching(self):
        env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        self._usr1_before = before[signal.SIGUSR1]
        self.install()
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            if env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.name is None
        self.name = self.name or signal.Signals(signum).name
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if first and callable(tune_handler) and tune_handler is not self._usr1_before:
            tune_handler(signal.SIGUSR1, frame)  # logs "Stop signal received ..." and sets Tune's stop event
        else:
            raise KeyboardInterrupt


def check_resources(resources: Dict[str, float], address: Optional[str] = None) -> None:
    """One ValueError line when no alive Ray node offers what one trial asks for: such a search
    would wait for resources until its time budget (or forever), never starting a trial."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    want = {"cpu": float(resources.get("cpu", 1)), "gpu": float(resources.get("gpu", 0))}
    if any(all(node.get(k.upper(), 0.0) >= v for k, v in want.items()) for node in nodes):
        return
    lacking = next((k for k, v in want.items() if not any(node.get(k.upper(), 0.0) >= v for node in nodes)), "cpu")
    most = max((node.get(lacking.upper(), 0.0) for node in nodes), default=0.0)
    where = f"the Ray cluster at {address}" if address else "the local Ray"
    have = ("no node has a GPU" if lacking == "gpu" and most == 0 else
            f"its largest node has {most:g} {lacking.upper()}{'s' if most != 1 else ''}")
    raise ValueError(
        f"resources.{lacking}: each trial asks for {want[lacking]:g} {lacking.upper()}"
        f"{'s' if want[lacking] != 1 else ''}, but {where} has {len(nodes)} node(s) and {have}; "
        f"lower resources.{lacking}" + (" or pass --address of a cluster that has one" if lacking == "gpu"
                                        else " or join a bigger cluster with --address"))


def _restorable_trial_ids(exp_dir: Path) -> set:
    """The trials ``Tuner.restore`` brings back: those in Tune's last experiment snapshot."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(str(exp_dir)).trials}
    except Exception:  # no snapshot yet: Tuner.restore will say so
        return set()


def _errors(grid) -> List[str]:
    """The last line of each failed trial's error (``RuntimeError: ...``), for the one-line report."""
    out = []
    for res in grid:
        if res.error is not None:
            text = str(res.error).strip().splitlines()
            out.append(text[-1] if text else type(res.error).__name__)
    return out


def _save_state(exp_dir: Path, **values: Any) -> None:
    path = exp_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    state.update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


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


def _flat_params(spec: tune_config.TuneSpec) -> Dict[str, Any]:
    from dcanets.tune.tracking import _flatten

    return {**_flatten({"train": spec.train}), **_flatten({"tune_config": spec.tune_config}),
            **_flatten({"scheduler": spec.scheduler}), **_flatten({"search_alg": spec.search_alg}),
            **_flatten({"resources": spec.resources}), "space": json.dumps(spec.space)}


class ProgressLines(Callback):
    """One line per trial per epoch, in the driver (Ray's own table is switched off: verbose=0).

    The elapsed time counts search time only: after ``--resume`` it continues from where the
    interrupted session stopped (``resumed_at``), without the time the search was not running.
    ``Tuner.restore`` brings back a pickled copy of this callback, hence the class attribute.
    """

    resumed_at = 0.0

    def __init__(self, spec: tune_config.TuneSpec, earlier: float = 0.0) -> None:
        self.metric, self.epochs = spec.metric, int(spec.train["epochs"])
        self.t0 = time.time() - earlier

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "t0"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.t0 = None  # set by setup(): the resumed session's start, less the time already spent

    def setup(self, **info):
        if getattr(self, "t0", None) is None:
            self.t0 = time.time() - ProgressLines.resumed_at

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


class Outcomes(Callback):
    """The trials that ended on their own (completed, stopped by the scheduler, or crashed).

    When a signal stops a search, Tune marks the trials it cuts TERMINATED too; a trial not
    listed here was cut, and is reported INTERRUPTED. Class-level, because ``Tuner.restore``
    runs an unpickled copy of the callbacks.
    """

    ended: Set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        Outcomes.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        Outcomes.ended.add(trial.trial_id)


def _collect(grid, spec: tune_config.TuneSpec, cut_by_stop: bool = False) -> List[Dict[str, Any]]:
    """One dict per trial: id, status, params, the per-epoch history and the best metric value."""
    from dcanets import _compat

    out = []
    # statuses live on the Trial objects, which ResultGrid does not expose (see _compat)
    for res, trial in zip(grid, _compat.result_grid_trials(grid)):
        status = trial.status
        if cut_by_stop and status == "TERMINATED" and trial.trial_id not in Outcomes.ended:
            status = "INTERRUPTED"  # stopped by Ctrl-C/SIGTERM, resumable
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
