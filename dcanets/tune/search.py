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
import dataclasses
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

from dcanets import _compat
from dcanets.engine.atomic import DiskFull, no_space
from dcanets.tune import builders, gang, schema
from dcanets.tune import storage as search_storage
from dcanets.tune.callbacks import Outcomes, ProgressLines, StateCopies, bind_session
from dcanets.tune.checkpoints import CheckpointKeeper, ray_checkpoint_config
from dcanets.tune.state import (
    STATE_FILES,
    SearchResult,
    SearchState,
    TrialResult,
    is_finite,
    session_status,
    trial_status,
)
from dcanets.tune.storage import Location
from dcanets.tune.tracking import SearchTracker, check_uri, choose_uri, flatten, open_store
from dcanets.tune.watch import LOST_AFTER_S, watch_cluster


def create_search_dir(spec: schema.TuneSpec, root: Path, tracking_uri: Optional[str] = None,
                      storage: Optional[str] = None) -> SearchState:
    """``<root>/<name>-<time>/`` with a copy of the YAML and ``search.json`` (what --resume reads).

    The MLflow store is the first given of ``tracking_uri`` (``--tracking-uri``), the YAML's
    ``tracking.uri`` and ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``, shared by
    the searches under root (``dcanets.tune.tracking.choose_uri``).

    With ``storage`` (a URI or an absolute path; default ``spec.storage``) Ray keeps the search in
    ``<storage>/<name>-<time>/``: both files are copied there at once, which also checks, before
    Ray starts, that the storage can be reached and written (one ValueError line otherwise).
    """
    root = Path(root).expanduser().resolve()
    exp_dir = _new_folder(root, spec.name)
    try:
        shutil.copy(spec.path, exp_dir / "config.yaml")
        uri, origin = choose_uri(tracking_uri, spec.tracking.uri, root)
        if spec.tracking.enabled:
            check_uri(uri, origin)  # a store MLflow cannot use: one line, before Ray starts
        state = SearchState.create(
            exp_dir, config_dir=str(spec.path.parent), config_path=str(spec.path), tracking_uri=uri,
            experiment=spec.tracking.experiment or spec.name, num_samples=spec.tune_config.num_samples,
            storage=search_storage.normalize(storage) if storage else spec.storage)
        if state.storage:
            Location.open(state.storage)  # a URI pyarrow cannot open: named as given
        _claim(state.location, exp_dir)
    except BaseException:
        shutil.rmtree(exp_dir, ignore_errors=True)
        raise
    return state


def _new_folder(root: Path, name: str) -> Path:
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    exp_dir = root / f"{name}-{stamp}"
    while exp_dir.exists():  # two searches started within the same second
        n += 1
        exp_dir = root / f"{name}-{stamp}-{n}"
    exp_dir.mkdir(parents=True)
    return exp_dir


def _claim(location: Location, exp_dir: Path) -> None:
    """Copy config.yaml and search.json to a shared location that holds no search yet."""
    if not location.shared:
        return
    if location.exists(search_storage.TUNER_STATE):
        raise ValueError(f"storage {location.uri}: holds a search already; start again (the folder name "
                         "has the time) or give another storage")
    location.put(exp_dir, STATE_FILES)


# ---------------------------------------------------------------------------------------- trial
def trial(params: Dict[str, Any], base: Dict[str, Any]) -> None:
    """One Ray Tune trial = one engine run. Runs in a Ray worker process."""
    import ray
    from ray import tune

    import dcanets  # noqa: F401  (plugin models/decompositions into this worker's timm registries)
    from dcanets.engine import TrainConfig, train

    cfg = builders.trial_train_config(base, params)
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
def run_search(spec: schema.TuneSpec, state: SearchState, *, address: Optional[str] = None,
               num_cpus: Optional[int] = None, resume: bool = False, quiet: bool = False,
               worker_logs: bool = False) -> SearchResult:
    """Run (or resume) the search of ``state``; MLflow runs are ended in every exit path.

    The result's status is FINISHED, KILLED or FAILED (:class:`SearchResult`). Raises ValueError
    before any trial starts when no Ray node can run one, and :class:`SearchInterrupted` on a
    second signal (or one before Tune took over).
    """
    session = _Session(spec, state, resume=resume, quiet=quiet)
    with session.stop.catching():  # Ctrl-C / `kill` / batch schedulers: stop the Tune way, then report KILLED
        try:
            return session.run(address, num_cpus, worker_logs)
        except KeyboardInterrupt:
            raise SearchInterrupted(session.stop.name or "SIGINT", started=session.location.started()) from None


class _Session:
    """One session of a search (its start, or one ``--resume``): Ray up, MLflow runs open, Tune's
    fit, then everything closed again whatever happened; ``timings`` says where the time went."""

    def __init__(self, spec: schema.TuneSpec, state: SearchState, resume: bool, quiet: bool) -> None:
        self.spec, self.state, self.resume, self.quiet = spec, state, resume, quiet
        self.location = state.location
        self.earlier = state.fit_seconds  # --resume: time spent by the earlier sessions
        self.stop = _Interruption()
        self.timings: Dict[str, float] = {}
        self.status = "FAILED"
        self.tracker: Optional[SearchTracker] = None  # opens the parent run; Tune may run a restored copy
        self.live: List[Callback] = []  # the callbacks Tune runs (after Tuner.restore: the restored copies)
        self.t_fit: Optional[float] = None

    def run(self, address: Optional[str], num_cpus: Optional[int], worker_logs: bool) -> SearchResult:
        t0 = time.perf_counter()
        store = _open_store_meanwhile(self.state.tracking_uri) if self.spec.tracking.enabled else None
        with self.stop.deferred(), _compat.ray_init_keeps_sigterm_handler():  # Ray's start cannot be cut safely
            started_ray = start_ray(address, num_cpus, worker_logs)
        self.stop.install()
        self.timings["ray_init"] = time.perf_counter() - t0
        watch = watch_cluster(address, lambda gcs: self._lost(str(address), gcs))  # --address: it may go away
        try:
            if self.stop.received:  # a signal while Ray started: stop as before Tune runs (Ray stopped below)
                raise KeyboardInterrupt
            check_resources(self.spec.resources, address)
            if store is not None:
                self._start_tracking(store)
            result = self._fit(self._tuner())
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        except Exception as exc:
            full = no_space(exc)
            if full is None:
                raise
            self.status = "KILLED"  # resumable once there is space: the runs end KILLED, not FAILED
            raise DiskFull(full) from None
        finally:
            self.stop.deferring = True  # the teardown ends the runs and stops Ray: a first signal waits for it
            if watch is not None:
                watch.stop()
            self._end(started_ray)
        return dataclasses.replace(result, timings=dict(self.timings))  # with the teardown's time

    def _lost(self, address: str, gcs: str) -> None:
        """The joined cluster went away (``dcanets.tune.watch``): the runs end KILLED, one line says
        so with the resume command, and the driver exits with status 1, as Ray would end it anyway."""
        import sys

        self.status = "KILLED"
        try:
            self._end(started_ray=False)  # no ray.shutdown(): it waits for a cluster that is gone
        finally:
            sys.stdout.flush()
            print(f"dcanets tune: error: the Ray cluster at {address} went away mid-search (its head {gcs} has not "
                  f"answered for {LOST_AFTER_S:.0f} s); the search is KILLED: continue with  "
                  f"{self.location.resume_command()}", file=sys.stderr, flush=True)
            os._exit(1)

    def _start_tracking(self, store: concurrent.futures.Future) -> None:
        t0 = time.perf_counter()
        store.result()  # a new SQLite store: MLflow's migrations, run while Ray started
        self.tracker = SearchTracker(self.state, train=self.spec.train)
        self.tracker.start(_parent_params(self.spec), self.state.folder / "config.yaml",
                           {"name": self.state.folder.name, "config": str(self.spec.path),
                            "ray_results": self.location.uri})
        if self.resume:  # runs of trials created after Tune's last snapshot: Tune never restores them
            self.tracker.drop_orphans(_restorable_trial_ids(self.location))
        self.timings["mlflow_start"] = time.perf_counter() - t0

    def _tuner(self) -> Any:
        """A new Tuner, or the restored one, with the callbacks it will run bound to this session."""
        from ray import tune

        if self.spec.resources.workers > 1:  # a Ray Train gang per trial, launched from the trial
            run = tune.with_parameters(gang.gang_trial, base=self.spec.train,
                                       gang=gang.gang_config(self.spec, self.location))
        else:
            run = tune.with_parameters(trial, base=self.spec.train)
        trainable = tune.with_resources(run, builders.trial_resources(self.spec))
        if self.resume:
            tuner = tune.Tuner.restore(self.location.path, trainable=trainable, resume_unfinished=True,
                                       storage_filesystem=self.location.ray_filesystem)
            self.live = _compat.tuner_callbacks(tuner)
        else:
            self.live = [c for c in (self.tracker, None if self.quiet else ProgressLines(self.spec), Outcomes(),
                                     StateCopies() if self.location.shared else None,
                                     gang.GangCleanup() if self.spec.resources.workers > 1 else None,
                                     CheckpointKeeper(self.spec)) if c]
            tuner = _new_tuner(self.spec, self.location, trainable, self.live)
        bind_session(self.live, self.state)
        return tuner

    def _fit(self, tuner: Any) -> SearchResult:
        self.t_fit = time.perf_counter()
        grid = tuner.fit()
        self.stop.deferring = True  # from here on a first signal does not cut the session's bookkeeping
        self._live(CheckpointKeeper, CheckpointKeeper(self.spec)).purge()  # Tune's last snapshot is uploaded
        if self.state.write_error is not None:  # a full disk stopped the search (tracking: SearchTracker)
            raise self.state.write_error
        self.timings["fit"] = time.perf_counter() - self.t_fit
        trials = _collect(grid, self.spec, ended=self._outcomes().ended if self.stop.received else None)
        self.status = session_status(trials, self.stop.received, self.state.num_samples)
        return SearchResult(status=self.status, trials=tuple(trials), seconds=self.earlier + self.timings["fit"],
                            location=self.location, signal=self.stop.name, errors=tuple(_errors(grid)), grid=grid)

    def _end(self, started_ray: bool) -> None:
        """Save what the next ``--resume`` needs, end the MLflow runs, stop the Ray this session started."""
        import ray

        t0 = time.perf_counter()
        try:
            if self.tracker and self.tracker.parent_id:  # the trials' runs written before the search's status
                self._live(SearchTracker, self.tracker).flush()
            if self.t_fit is not None:
                try:
                    self.state.finish_session(self.earlier + (time.perf_counter() - self.t_fit), self.status,
                                              sorted(self._outcomes().ended))
                    self.state.share()
                except OSError as exc:  # a full disk: the runs are still ended and Ray still stopped
                    print(f"dcanets tune: warning: {exc}", file=sys.stderr)
            if self.tracker and self.tracker.parent_id:
                self._live(SearchTracker, self.tracker).close(self.status)
        finally:
            if started_ray:
                ray.shutdown()
        self.timings["teardown"] = time.perf_counter() - t0

    def _outcomes(self) -> Outcomes:
        fallback = Outcomes()  # none in reach (Ray Client runs them on the cluster): the earlier sessions'
        fallback.bind(self.state)
        return self._live(Outcomes, fallback)

    def _live(self, kind: type, fallback: Any) -> Any:
        """The callback of ``kind`` that Tune runs, else ``fallback``."""
        return next((c for c in self.live if isinstance(c, kind)), fallback)


def _open_store_meanwhile(uri: str) -> concurrent.futures.Future:
    """Open (for a new SQLite file: create) the MLflow store in a thread while Ray starts.

    Creating a SQLite store runs MLflow's schema migrations, 2-7 s of the driver's time on 2 cores,
    and ``ray.init`` spends most of its 3-7 s waiting for Ray's own processes to come up: done
    one after the other they were the largest fixed cost of a search after Ray itself. The future
    raises open_store's one-line ValueError.
    """
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
    Tune runs, raises KeyboardInterrupt. Where that would leave things half done (``ray.init``,
    whose processes would be orphaned; the teardown, which ends the MLflow runs) a first signal is
    only recorded (``deferring``): after Ray's start it stops the search as one before Tune would.
    """

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self.deferring = False  # a first signal is only recorded (Ray starting, the session's teardown)

    @property
    def received(self) -> bool:
        return self.name is not None

    @contextlib.contextmanager
    def deferred(self):
        """A first signal inside the block is recorded, and acted on after it (``received``)."""
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False

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
        if first and self.deferring:
            return
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if first and callable(tune_handler) and tune_handler is not self._usr1_before:
            tune_handler(signal.SIGUSR1, frame)  # logs "Stop signal received ..." and sets Tune's stop event
        else:
            raise KeyboardInterrupt


def check_resources(resources: schema.Resources, address: Optional[str] = None) -> None:
    """One ValueError line when no alive Ray node offers what one trial (or one worker of a gang)
    asks for, or the cluster cannot place a whole gang: such a search would wait for resources
    until its time budget (or forever), never starting a trial."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    want = {"cpu": float(resources.cpu), "gpu": float(resources.gpu)}
    if any(all(node.get(k.upper(), 0.0) >= v for k, v in want.items()) for node in nodes):
        if resources.workers > 1:
            check_gang(resources, nodes, address)
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


def check_gang(resources: schema.Resources, nodes: List[Dict[str, float]], address: Optional[str]) -> None:
    """A gang's workers need whole GPUs (NCCL joins no two ranks on one GPU), and the cluster must
    hold all of them at once (Ray Train places a gang whole or not at all)."""
    workers, cpu, gpu = int(resources.workers), float(resources.cpu), float(resources.gpu)
    if 0 < gpu < 1:
        raise ValueError(f"resources.gpu: the {workers} workers of a gang need a GPU each (NCCL joins no two ranks "
                         f"on one GPU); use gpu: 1 (or more), not {gpu:g}")
    fits = sum(min([int(node.get("CPU", 0.0) // cpu)] + ([int(node.get("GPU", 0.0) // gpu)] if gpu else []))
               for node in nodes)
    if fits < workers:
        where = f"the Ray cluster at {address}" if address else "the local Ray"
        each = f"{cpu:g} CPU" + (f" and {gpu:g} GPU" if gpu else "")
        raise ValueError(f"resources.workers: each trial is a gang of {workers} workers of {each} each, but {where} "
                         f"can place at most {fits} at once; lower resources.workers, or join a bigger cluster "
                         "with --address")


def _restorable_trial_ids(location: Location) -> set:
    """The trials ``Tuner.restore`` brings back: those in Tune's last experiment snapshot."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(location.path, storage_filesystem=location.ray_filesystem)
        return {t.trial_id for t in analysis.trials}
    except Exception:  # no snapshot yet: Tuner.restore will say so
        return set()


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


def _new_tuner(spec: schema.TuneSpec, location: Location, trainable: Any, callbacks: List[Callback]) -> Any:
    from ray import tune

    return tune.Tuner(
        trainable, tune_config=builders.build_tune_config(spec),
        run_config=tune.RunConfig(
            name=location.name, storage_path=location.ray_storage_path,
            storage_filesystem=location.ray_filesystem, callbacks=callbacks, verbose=0,
            checkpoint_config=ray_checkpoint_config(),
            failure_config=builders.build_failure_config(spec)))


def start_ray(address: Optional[str], num_cpus: Optional[int], worker_logs: bool) -> bool:
    """Join ``address`` or start a local Ray; False when Ray was already up (tests, notebooks)."""
    import ray

    _compat.quiet_tune_output()  # dcanets prints its own progress lines
    _compat.tune_keeps_only_checkpoint_score()  # every checkpoint is registered (dcanets.tune.checkpoints)
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


def _parent_params(spec: schema.TuneSpec) -> Dict[str, Any]:
    """The parent run's MLflow params: the sections as Ray gets them, the space as JSON."""
    sections = {"train": spec.train, "tune_config": builders.plain(spec.tune_config),
                "scheduler": builders.plain(spec.scheduler), "search_alg": builders.plain(spec.search_alg),
                "resources": builders.plain(spec.resources)}
    return {**flatten(sections), "space": json.dumps(builders.plain_space(spec.space))}


def _collect(grid, spec: schema.TuneSpec, ended: Optional[Set[str]] = None) -> List[TrialResult]:
    """One record per trial: id, status, params, the per-epoch history and the best metric value.
    ``ended``: when a signal stopped the search, the trials that ended on their own (Outcomes);
    Tune marks the others TERMINATED too, they are reported INTERRUPTED (resumable); a trial whose
    train loss became NaN/inf is DIVERGED (state.trial_status)."""
    out = []
    # statuses live on the Trial objects, which ResultGrid does not expose (see _compat)
    for res, trial in zip(grid, _compat.result_grid_trials(grid)):
        df = res.metrics_dataframe
        # an epoch re-run after an interruption appears twice in Tune's log: keep the last one
        hist = tuple({h.get("epoch"): h for h in (df.to_dict("records") if df is not None else [])}.values())
        status = trial_status(trial.status, ended is None or trial.trial_id in ended, hist)
        vals = [h[spec.metric] for h in hist if is_finite(h.get(spec.metric))]
        best = (max(vals) if spec.mode == "max" else min(vals)) if vals else float("nan")
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name
        # a trial stopped by time_budget_s before its first report has no result: take its
        # sampled config from the Trial itself
        out.append(TrialResult(trial_id=trial_id, status=status, params=res.config or trial.config, history=hist,
                               best=best, node_id=(res.metrics or {}).get("node_id"),
                               checkpoint=res.checkpoint.path if res.checkpoint else
                               (res.metrics or {}).get("checkpoint_path")))  # a gang's: Ray Train's storage
    return out


__all__ = ["SearchInterrupted", "check_resources", "create_search_dir", "run_search", "start_ray", "trial"]
