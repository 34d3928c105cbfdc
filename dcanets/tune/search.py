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

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from ray.tune import Callback

from dcanets.tune import schema as tune_config
from dcanets.tune import storage as search_storage
from dcanets.tune.report import short_params

DEFAULT_OUTPUT = Path("runs") / "tune"
STATE = search_storage.STATE  # run ids and the paths a resume needs, next to Ray's experiment state


def create_search_dir(spec: tune_config.TuneSpec, root: Path, tracking_uri: Optional[str] = None,
                      storage: Optional[str] = None):
    """``<root>/<name>-<time>/`` with a copy of the YAML and ``search.json`` (what --resume reads).

    The MLflow store is the first given of ``tracking_uri`` (``--tracking-uri``), the YAML's
    ``tracking.uri`` and ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``, shared by
    the searches under root (``dcanets.tune.tracking.choose_uri``).

    With ``storage`` (a URI or an absolute path; default ``spec.storage``) Ray keeps the search in
    ``<storage>/<name>-<time>/``: both files are copied there at once, which also checks, before
    Ray starts, that the storage can be reached and written (one ValueError line otherwise).
    """
    from dcanets.tune.tracking import check_uri, choose_uri

    root = Path(root).expanduser().resolve()
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    exp_dir = root / f"{spec.name}-{stamp}"
    while exp_dir.exists():  # two searches started within the same second
        n += 1
        exp_dir = root / f"{spec.name}-{stamp}-{n}"
    exp_dir.mkdir(parents=True)
    try:
        shutil.copy(spec.path, exp_dir / "config.yaml")
        uri, origin = choose_uri(tracking_uri, spec.tracking["uri"], root)
        state = {"config_dir": str(spec.path.parent), "config_path": str(spec.path), "tracking_uri": uri,
                 "experiment": spec.tracking["experiment"] or spec.name,
                 "num_samples": spec.tune_config["num_samples"], "trials": {}}
        if storage or spec.storage:
            state["storage"] = search_storage.normalize(storage) if storage else spec.storage
        if spec.tracking["enabled"]:
            check_uri(uri, origin)  # a store MLflow cannot use: one line, before Ray starts
        (exp_dir / STATE).write_text(json.dumps(state, indent=2))
        if state.get("storage"):
            search_storage.Location.open(state["storage"])  # a URI pyarrow cannot open: named as given
        _claim(search_storage.search_location(state, exp_dir), exp_dir)
    except BaseException:
        shutil.rmtree(exp_dir, ignore_errors=True)
        raise
    return exp_dir, state


def _claim(location: search_storage.Location, exp_dir: Path) -> None:
    """Copy config.yaml and search.json to a shared location that holds no search yet."""
    if not location.shared:
        return
    if location.exists(search_storage.TUNER_STATE):
        raise ValueError(f"storage {location.uri}: holds a search already; start again (the folder name "
                         "has the time) or give another storage")
    location.put(exp_dir, search_storage.STATE_FILES)


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
    location = search_storage.search_location(state, exp_dir)
    stop = _Interruption()
    earlier = float(state.get("fit_seconds", 0.0))  # --resume: time spent by the earlier sessions
    t_fit = None
    with stop.catching():  # Ctrl-C / `kill` / batch schedulers: stop the Tune way, then report KILLED
        try:
            t0 = time.perf_counter()
            store = _open_store_meanwhile(state["tracking_uri"]) if spec.tracking["enabled"] else None
            started_ray = _init_ray(address, num_cpus, worker_logs)
            stop.install()  # again: ray.init puts its own (fatal) SIGTERM handler in the driver
            timings["ray_init"] = time.perf_counter() - t0
            try:
                check_resources(spec.resources, address)
                if store is not None:
                    t0 = time.perf_counter()
                    store.result()  # a new SQLite store: MLflow's migrations, run while Ray started
                    tracker = SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE)
                    tracker.start(_flat_params(spec), exp_dir / "config.yaml",
                                  {"name": exp_dir.name, "config": str(spec.path), "ray_results": location.uri})
                    if resume:  # runs of trials created after Tune's last snapshot: Tune never restores them
                        tracker.drop_orphans(_restorable_trial_ids(location))
                    timings["mlflow_start"] = time.perf_counter() - t0
                trainable = tune.with_resources(tune.with_parameters(trial, base=spec.train),
                                                {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
                callbacks = [c for c in (tracker, None if quiet else ProgressLines(spec, earlier), Outcomes(),
                                         StateCopies() if location.shared else None) if c]
                Outcomes.ended = set(state.get("ended_trials", []))  # those of the earlier sessions too
                StateCopies.target = (exp_dir, location)
                if resume:
                    tuner = tune.Tuner.restore(location.path, trainable=trainable, resume_unfinished=True,
                                               storage_filesystem=location.ray_filesystem)
                    _follow_this_folder(tuner, exp_dir / STATE)
                else:
                    tuner = _new_tuner(spec, location, trainable, callbacks)
                ProgressLines.resumed_at = earlier  # the restored copy of the callback continues the clock
                t_fit = time.perf_counter()
                grid = tuner.fit()
                timings["fit"] = time.perf_counter() - t_fit
                trials = _collect(grid, spec, cut_by_stop=stop.received)
                interrupted = stop.received or any(t["status"] not in ("TERMINATED", "ERROR") for t in trials)
                n_ok = sum(t["status"] == "TERMINATED" for t in trials)
                status = "KILLED" if interrupted else ("FINISHED" if n_ok else "FAILED")
                return {"status": status, "trials": trials, "seconds": earlier + timings["fit"], "grid": grid,
                        "timings": timings, "signal": stop.name, "errors": _errors(grid),
                        "location": location}
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                t0 = time.perf_counter()
                if t_fit is not None:
                    _save_state(exp_dir, fit_seconds=earlier + (time.perf_counter() - t_fit), status=status,
                                ended_trials=sorted(Outcomes.ended))
                    copy_files(location, exp_dir, [STATE])
                if tracker and tracker.parent_id:  # a fresh reader of search.json: Tune may hold a restored copy
                    SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE).close(status)
                if started_ray:
                    ray.shutdown()
                timings["teardown"] = time.perf_counter() - t0
        except KeyboardInterrupt:
            raise SearchInterrupted(stop.name or "SIGINT", started=location.started()) from None


def _open_store_meanwhile(uri: str) -> concurrent.futures.Future:
    """Open (for a new SQLite file: create) the MLflow store in a thread while Ray starts.

    Creating a SQLite store runs MLflow's schema migrations, 2-7 s of the driver's time on 2 cores,
    and ``ray.init`` spends most of its 3-7 s waiting for Ray's own processes to come up: done
    one after the other they were the largest fixed cost of a search after Ray itself. The future
    raises open_store's one-line ValueError.
    """
    from dcanets.tune.tracking import open_store

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcanets-mlflow-store")
    try:
        return pool.submit(open_store, uri)
    finally:
        pool.shutdown(wait=False)


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


def _restorable_trial_ids(location: search_storage.Location) -> set:
    """The trials ``Tuner.restore`` brings back: those in Tune's last experiment snapshot."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(location.path, storage_filesystem=location.ray_filesystem)
        return {t.trial_id for t in analysis.trials}
    except Exception:  # no snapshot yet: Tuner.restore will say so
        return set()


def copy_files(location: search_storage.Location, exp_dir: Path, names: List[str]) -> None:
    """Copy files of the search folder to shared storage; a failure is one warning line, not an
    exception: this runs in ``finally`` blocks and after the search, where raising would hide
    the outcome (the files stay in the search folder)."""
    try:
        location.put(exp_dir, names)
    except ValueError as exc:
        print(f"dcanets tune: warning: {exc}; {', '.join(names)} stay in {exp_dir} only", file=sys.stderr)


def _follow_this_folder(tuner, state_path: Path) -> None:
    """Point the MLflow tracker restored from tuner.pkl at this session's ``search.json``.

    ``Tuner.restore`` runs the callbacks pickled when the search started, and the tracker among
    them keeps the path of the search folder it was created with. A search resumed from its
    storage on another machine (or into another ``--output``) has its folder elsewhere; the
    tracker's own unpickling reconnects and re-reads the run ids, so it is run again on the
    new path.
    """
    from dcanets import _compat
    from dcanets.tune.tracking import SearchTracker

    for callback in _compat.tuner_callbacks(tuner):
        if isinstance(callback, SearchTracker) and Path(callback.state_path) != state_path:
            callback.__setstate__({**callback.__getstate__(), "state_path": state_path})


def _errors(grid) -> List[str]:
    """The last line of each failed trial's error (``RuntimeError: ...``), for the one-line report.

    A trial's own exception ends its traceback with its class; Ray's errors for a lost process or
    node (``ActorUnavailableError``) are a bare sentence, so their class is put in front.
    """
    import re

    out = []
    for res in grid:
        if res.error is not None:
            text = str(res.error).strip().splitlines()
            line = text[-1] if text else ""
            if not re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", line):
                line = f"{type(res.error).__name__}: {line}".rstrip(": ")
            out.append(line)
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


def _new_tuner(spec, location: search_storage.Location, trainable, callbacks):
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=tune_config.build_search_alg(spec),
                                    scheduler=tune_config.build_scheduler(spec), **spec.tune_config),
        run_config=tune.RunConfig(
            name=location.name, storage_path=location.ray_storage_path,
            storage_filesystem=location.ray_filesystem, callbacks=callbacks, verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(**spec.failure_config)))


def _init_ray(address: Optional[str], num_cpus: Optional[int], worker_logs: bool) -> bool:
    """Join ``address`` or start a local Ray; False when Ray was already up (tests, notebooks)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # one checkpoint per epoch is the design; Tune's "snapshotting too often" warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=worker_logs)
        except ConnectionError as exc:  # after Ray's ~30 s of retries: say what to check
            raise ConnectionError(f"--address {address}: {exc}; {_connect_hint()}") from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=worker_logs)
    return True


def _connect_hint() -> str:
    """Why a running cluster may refuse this driver: Ray 2.60 clusters use token authentication
    by default, and a driver given an explicit address sends its token only when told to (Ray's
    rule: a token is not offered to an address nobody vouched for)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ("is the head up (ray start --head)? A cluster with token authentication (Ray's default) "
                "also needs RAY_AUTH_MODE=token here, with the head's token in ~/.ray/auth_token, "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return ("is the head up (ray start --head), and is the token here (~/.ray/auth_token, RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH) the head's?")


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
        error = _error_name(trial)
        hint = ("; failure_config: {max_failures: N} retries a trial from its last checkpoint"
                if error in LOST and trial.max_failures == 0 else "")
        self._say(trial, f"FAILED ({error}{_on_node(trial)}): see {trial.path}/error.txt{hint}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that ``failure_config.max_failures`` retries: the line says from where.

        The retry restores the last checkpoint Tune *registered*, which need not be the one of the
        last epoch reported: Tune registers a reported checkpoint in a second round trip to the
        trial's process (its ``save`` task), which a node that dies right after the report never
        answers. The epoch is read from that checkpoint's own result, not from the last result.
        """
        registered = getattr(trial, "latest_checkpoint_result", None)
        epoch = (getattr(registered, "metrics", None) or {}).get("epoch")
        budget = "unlimited" if trial.max_failures < 0 else trial.max_failures
        self._say(trial, f"failed ({_error_name(trial)}{_on_node(trial)}): retry {trial.num_failures} of {budget}, "
                         + (f"from its epoch {epoch} checkpoint" if epoch else "from the start")
                         + " on a node with room")


# the errors of a trial whose process or node went away (not of its own code): what retries are for
LOST = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "NodeDiedError", "WorkerCrashedError")


def _error_name(trial) -> str:
    """The class of a trial's last error (``ActorDiedError``: its node or process went away), read
    back from the ``error.pkl`` Tune writes beside ``error.txt``; ``error`` when there is none."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            exc = cloudpickle.load(f)
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        return type(cause).__name__.replace("RayTaskError(", "").rstrip(")")
    except Exception:  # no pickled error (e.g. a TuneError), or one that does not unpickle here
        return "error"


def _on_node(trial) -> str:
    node = (trial.last_result or {}).get("node_id")
    return f" on node {str(node)[:8]}" if node else ""


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


class StateCopies(Callback):
    """Keeps the storage's copy of ``search.json`` current as trials start and end (the MLflow
    tracker, earlier in the callback list, writes their run ids there), so that a search resumed
    from its storage after the driver died knows the runs to close. Class-level target, because
    ``Tuner.restore`` runs an unpickled copy of the callbacks: the folder is this session's."""

    target: Optional[tuple] = None  # (search folder, Location)

    def _copy(self) -> None:
        if StateCopies.target is not None:
            exp_dir, location = StateCopies.target
            copy_files(location, exp_dir, [STATE])

    def on_trial_start(self, iteration, trials, trial, **info):
        self._copy()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._copy()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._copy()


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
