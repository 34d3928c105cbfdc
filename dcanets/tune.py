"""``dcanets tune CONFIG.yaml``: a Ray Tune + Optuna search whose every trial is one engine run.

The driver validates the YAML (every problem with its path) and the plugin names before Ray
starts, then runs ``tune.Tuner`` with ``OptunaSearch`` (define-by-run space, so ``when:`` and
``times:`` conditions work) and the declared scheduler. Each trial is ``dcanets.train.train`` in
a Ray worker that imports dcanets itself (plugin registration happens per process), reports
every epoch with a checkpoint, and resumes from it after ``--resume``. MLflow logging lives in
the driver (``dcanets.tracking``). Outputs: one progress line per trial epoch, a table of the
best trials, ``best.yaml`` for ``dcanets train --config``, ``curves.png`` and ``trials.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ray.tune import Callback

from dcanets import tune_config

DEFAULT_OUTPUT = Path("runs") / "tune"
STATE = "search.json"  # run ids and the paths a resume needs, next to Ray's experiment state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, help="search YAML (see tune_configs/)")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue an interrupted search from its output folder (Tuner.restore)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or 'ray://host:10001'")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"root folder of searches and of the default MLflow store (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db)")
    parser.add_argument("--num-samples", type=int, help="override tune_config.num_samples")
    parser.add_argument("--top", type=int, default=5, help="rows in the final table")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    parser.add_argument("--worker-logs", action="store_true", help="forward trial stdout/stderr to the driver")


def run(args: argparse.Namespace) -> int:
    if args.resume is None and args.config is None:
        raise ValueError("give a search config (e.g. tune_configs/quickstart.yaml) or --resume DIR")
    exp_dir, spec, state = _prepare(args)
    result = run_search(spec, exp_dir, state, address=args.address, num_cpus=args.num_cpus,
                        resume=args.resume is not None, quiet=args.quiet, worker_logs=args.worker_logs)
    report(result, spec, exp_dir, top=args.top)
    _summarize(result, spec, exp_dir, state)
    return 130 if result["status"] == "KILLED" else 0


def _prepare(args: argparse.Namespace):
    """The experiment folder, the validated spec and the saved state (resume) or new ones."""
    if args.resume is not None:
        exp_dir = args.resume.expanduser().resolve()
        state_file = exp_dir / STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{exp_dir} is not a dcanets tune output folder (no {STATE})")
        state = json.loads(state_file.read_text())
        spec = tune_config.load(exp_dir / "config.yaml", base=Path(state["config_dir"]))
        tune_config.check_registries(spec)
        return exp_dir, spec, state
    spec = tune_config.load(args.config)
    tune_config.check_registries(spec)  # unknown model/optimizer: one error, before any output or Ray
    if args.num_samples is not None:
        spec.tune_config["num_samples"] = args.num_samples
    exp_dir, state = create_search_dir(spec, args.output, args.tracking_uri)
    return exp_dir, spec, state


def create_search_dir(spec: tune_config.TuneSpec, root: Path, tracking_uri: Optional[str] = None):
    """``<root>/<name>-<time>/`` with a copy of the YAML and ``search.json`` (what --resume reads);
    the MLflow store defaults to ``sqlite:///<root>/mlflow.db``, shared by the searches under root."""
    from dcanets.tracking import absolute_uri, default_uri

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
    from dcanets.train import TrainConfig, train

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
        m.update(node_id=node, pid=os.getpid())
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

    from dcanets.tracking import SearchTracker

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
    from dcanets.tracking import _flatten

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
                         f"{_short(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, f"FAILED: see {trial.local_path}/error.txt")


def _short(config: Dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in config.items() if tune_config.DERIVED not in k)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------- outputs
def _collect(grid, spec: tune_config.TuneSpec) -> List[Dict[str, Any]]:
    """One dict per trial: id, status, params, the per-epoch history and the best metric value."""
    out = []
    # statuses live on the Trial objects; ResultGrid lists results in the same order
    trials = grid._experiment_analysis.trials
    for res, trial in zip(grid, trials):
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


def report(result: Dict[str, Any], spec: tune_config.TuneSpec, exp_dir: Path, top: int = 5) -> None:
    trials = result["trials"]
    ranked = sorted((t for t in trials if tune_config.is_finite(t["best"])), key=lambda t: t["best"],
                    reverse=spec.mode == "max")
    print(f"\n{spec.name}: {len(trials)} trials in {result['seconds']:.1f}s, status {result['status']}")
    print(f"{'trial':14s} {'status':11s} {'epochs':>6s} {spec.metric:>9s}  params")
    for t in ranked[:top]:
        print(f"{t['trial_id']:14s} {t['status']:11s} {t['epochs']:6d} {t['best']:9.4f}  {_short(t['params'])}")
    _write_trials_csv(trials, exp_dir / "trials.csv")
    if ranked:
        best = tune_config.trial_train_config(spec.train, ranked[0]["params"])
        best.pop("output", None)
        import yaml

        (exp_dir / "best.yaml").write_text(
            f"# best trial {ranked[0]['trial_id']}: {spec.metric}={ranked[0]['best']:.4f} "
            f"({spec.mode}) of search {exp_dir.name}\n# dcanets train --config {exp_dir / 'best.yaml'}\n"
            + yaml.safe_dump(best, sort_keys=False))
        plot_curves(trials, spec, exp_dir / "curves.png")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.get("timings", {}).items()))
    print(f"outputs: {exp_dir}  (best.yaml, curves.png, trials.csv; MLflow: {_uri(exp_dir)})")
    if result["status"] == "KILLED":
        print(f"interrupted: continue with  dcanets tune --resume {exp_dir}", file=sys.stderr)


def _summarize(result: Dict[str, Any], spec, exp_dir: Path, state: Dict[str, Any]) -> None:
    from dcanets.tracking import SearchTracker

    if not spec.tracking["enabled"]:
        return
    ranked = [t for t in result["trials"] if tune_config.is_finite(t["best"])]
    if not ranked:
        return
    best = (max if spec.mode == "max" else min)(ranked, key=lambda t: t["best"])
    SearchTracker(state["tracking_uri"], state["experiment"], exp_dir / STATE).summarize(
        {f"best_{spec.metric}": best["best"], "num_trials": len(result["trials"]),
         **{f"seconds_{k}": v for k, v in result["timings"].items()}},
        {"best_trial": best["trial_id"]},
        [exp_dir / "best.yaml", exp_dir / "curves.png", exp_dir / "trials.csv"])


def _uri(exp_dir: Path) -> str:
    try:
        return json.loads((exp_dir / STATE).read_text())["tracking_uri"]
    except (OSError, KeyError, ValueError):
        return "?"


def _write_trials_csv(trials: List[Dict[str, Any]], path: Path) -> None:
    import csv

    keys = sorted({k for t in trials for k in t["params"]})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "epochs", "best", "node_id", *keys])
        for t in trials:
            w.writerow([t["trial_id"], t["status"], t["epochs"], t["best"], t["node_id"],
                        *[t["params"].get(k) for k in keys]])


def plot_curves(trials: List[Dict[str, Any]], spec: tune_config.TuneSpec, path: Path) -> None:
    """Learning curves of every trial: the search metric and train loss against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for t in trials:
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(t["history"])]
        for ax, key in zip(axes, (spec.metric, "train_loss")):
            ax.plot(epochs, [h.get(key) for h in t["history"]], marker="o", ms=3, label=t["trial_id"])
    for ax, key in zip(axes, (spec.metric, "train_loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{spec.name}: {len(trials)} trials")
    if len(trials) <= 12:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
