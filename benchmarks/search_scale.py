"""How ``dcanets tune`` scales with the number of trials: driver time, driver memory, folder size.

The same search at 100, 300 and 1,000 trials (``--full``; ``--quick``: 12 trials, for CI): a tiny
model (``multibranch_mlp_1h``, 1 epoch on 64 digits images, tens of milliseconds), learning rates
from Optuna's ``RandomSampler`` (TPE's own cost grows with the trials it models: that is the
sampler's, not the framework's), FIFO, one trial at a time on 1 CPU, MLflow on (SQLite), as the
command runs it: search folder, Ray, ``Tuner.fit``, report, MLflow summary with the best model.
Each size runs in a fresh Python process (its own driver) and its result is written as soon as
it finishes.

Measured per size:

- **driver per-trial overhead**: ``Tuner.fit`` wall time minus the sum of the trials' own time
  (Ray's ``time_total_s`` of each trial's result: from the trial function's start to its
  report), per trial; and per trial, the gap from one trial's start to the next one's (MLflow's
  run start times, written by the driver as Tune starts a trial) minus the first trial's own
  time: its median over the first and the last tenth of the trials says whether it grows.
- **driver RSS** (the process that runs the search), sampled every 0.25 s against the number of
  trials started: the slope of a least-squares line over the trials after the first 20%.
- **search folder bytes per trial beyond the kept checkpoints** (Ray's ``checkpoint_*`` folders),
  and how many checkpoints are kept.
- **where the driver's memory goes** (``--full``, or ``--heap N``): one more search of N trials
  under ``tracemalloc``, the Python heap's growth from 30% to 95% of the trials started, per
  trial, by the package that allocated it (timings of that run are not used: tracing slows it).

Goals (issue 23): overhead <= 0.2 s per trial and flat (the 1,000-trial median within 1.2x of the
100-trial median); driver RSS grows <= 2 KB per trial; folder <= 1 MB per trial beyond the kept
checkpoints.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import yaml

from common import figure_path, parse_args, progress, write_result

GOAL = {"overhead_s": 0.2, "flat_ratio": 1.2, "rss_kb_per_trial": 2.0, "folder_mb_per_trial": 1.0}
TRAIN = {"model": "multibranch_mlp_1h", "data": "digits", "limit": 64, "epochs": 1, "batch_size": 64,
         "sched": "none", "seed": 0}


def sizes(quick: bool) -> List[int]:
    return [12] if quick else [100, 300, 1000]


def _extra(parser) -> None:
    parser.add_argument("--sizes", help="comma-separated trial counts (default: 12 quick, 100,300,1000 full)")
    parser.add_argument("--heap", type=int, help="trials of the traced search (default: 300 full, none quick)")
    parser.add_argument("--one", type=int, help=argparse_suppress())
    parser.add_argument("--part", type=Path, help=argparse_suppress())
    parser.add_argument("--traced", action="store_true", help=argparse_suppress())


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


# ------------------------------------------------------------------------------ one size
def write_spec(tmp: Path, trials: int):
    from dcanets.tune import schema

    doc = {"name": f"scale{trials}", "train": TRAIN,
           "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.5}},
           "search_alg": {"sampler": {"type": "RandomSampler", "seed": 0}},
           "scheduler": {"type": "FIFOScheduler"},
           "tune_config": {"num_samples": trials, "max_concurrent_trials": 1},
           "resources": {"cpu": 1}}
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return schema.load(path)


class RssSampler:
    """The driver's resident memory every ``period`` seconds, with the trials started by then."""

    def __init__(self, count, period: float = 0.25) -> None:
        self.count, self.period = count, period
        self.samples: List[List[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append([self.count(), self.rss()])
            except RuntimeError:  # the trials' dict changed while it was counted
                pass

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def slope(points: List[List[float]]) -> float:
    """Least-squares slope of y against x."""
    if len(points) < 2 or len({p[0] for p in points}) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    return (sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points))


def folder_bytes(folder: Path) -> Dict[str, Any]:
    """Bytes of the search folder, and of the trial checkpoints Ray keeps in it."""
    total = ckpt = 0
    kept = 0
    for root, dirs, files in os.walk(folder):
        inside = "/checkpoint_" in root + "/"
        kept += sum(d.startswith("checkpoint_") for d in dirs)
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            total += size
            ckpt += size if inside or Path(root).name.startswith("checkpoint_") else 0
    return {"bytes": total, "checkpoint_bytes": ckpt, "checkpoints_kept": kept}


def run_one(trials: int, tmp: Path) -> Dict[str, Any]:
    from dcanets.tune import report as tune_report
    from dcanets.tune import search as tune

    spec = write_spec(tmp, trials)
    t0 = time.perf_counter()
    state = tune.create_search_dir(spec, tmp / "runs")
    with RssSampler(lambda: len(state.trials)) as rss:
        result = tune.run_search(spec, state, num_cpus=2, quiet=True)
    t_report = time.perf_counter()
    tune_report.report(result, spec, state, top=3)
    tune_report.summarize(result, spec, state)
    done = time.perf_counter()
    own = {t.trial_id: float(t.history[-1].get("time_total_s", 0.0)) for t in result.trials if t.history}
    fit = result.timings["fit"]
    gaps = _gaps(state, own)
    tenth = max(1, len(gaps) // 10)
    after = [p for p in rss.samples if p[0] >= 0.2 * trials]
    disk = folder_bytes(state.folder)
    beyond = disk["bytes"] - disk["checkpoint_bytes"]
    return {
        "trials": trials, "status": result.status, "ended": sum(t.status == "TERMINATED" for t in result.trials),
        "fit_seconds": round(fit, 2), "trial_seconds": round(sum(own.values()), 2),
        "overhead_per_trial_s": round((fit - sum(own.values())) / trials, 4),
        "gap_median_s": round(statistics.median(gaps), 4) if gaps else None,
        "gap_median_first_tenth_s": round(statistics.median(gaps[:tenth]), 4) if gaps else None,
        "gap_median_last_tenth_s": round(statistics.median(gaps[-tenth:]), 4) if gaps else None,
        "gaps_s": [round(g, 4) for g in gaps],
        "rss_mb_start": round(rss.samples[0][1] / 2 ** 20, 1) if rss.samples else None,
        "rss_mb_end": round(rss.samples[-1][1] / 2 ** 20, 1) if rss.samples else None,
        "rss_kb_per_trial": round(slope(after) / 1024, 2),
        "rss_samples": [[int(c), round(b / 2 ** 20, 2)] for c, b in rss.samples[:: max(1, len(rss.samples) // 400)]],
        "folder_bytes": disk["bytes"], "checkpoint_bytes": disk["checkpoint_bytes"],
        "checkpoints_kept": disk["checkpoints_kept"],
        "folder_mb_per_trial_beyond_checkpoints": round(beyond / trials / 2 ** 20, 4),
        "search_json_bytes": (state.folder / "search.json").stat().st_size,
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
        "report_seconds": round(done - t_report, 2), "total_seconds": round(done - t0, 2),
    }


PACKAGES = ("dcanets", "ray/tune", "ray", "optuna", "mlflow", "sqlalchemy", "pydantic")


def _package(files: List[str]) -> str:
    """The package of the innermost frame (the allocation's) that is one of ``PACKAGES``; else other."""
    for name in reversed(files):  # tracemalloc: oldest frame first
        for package in PACKAGES:
            if f"/{package}/" in name:
                return package
    return "other"


def run_traced(trials: int, tmp: Path) -> Dict[str, Any]:
    """The Python heap's growth per trial between 30% and 95% of the trials started, by package."""
    import tracemalloc

    from dcanets.tune import search as tune

    spec = write_spec(tmp, trials)
    state = tune.create_search_dir(spec, tmp / "runs")
    snaps: List[Any] = []
    marks = [int(0.3 * trials), int(0.95 * trials)]

    def watch(stop: threading.Event) -> None:
        while marks and not stop.wait(0.1):
            if len(state.trials) >= marks[0]:
                snaps.append((len(state.trials), tracemalloc.take_snapshot()))
                marks.pop(0)

    tracemalloc.start(12)
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(stop,), daemon=True)
    thread.start()
    tune.run_search(spec, state, num_cpus=2, quiet=True)
    stop.set()
    thread.join()
    (n0, first), (n1, last) = snaps
    by: Dict[str, float] = {}
    ours: Dict[str, float] = {}  # dcanets' own lines
    for stat in last.compare_to(first, "traceback"):
        package = _package([f.filename for f in stat.traceback])
        by[package] = by.get(package, 0.0) + stat.size_diff
        if package == "dcanets":
            frame = next(f for f in reversed(stat.traceback) if "/dcanets/" in f.filename)
            where = f"{frame.filename.split('/dcanets/')[-1]}:{frame.lineno}"
            ours[where] = ours.get(where, 0.0) + stat.size_diff
    return {"trials": trials, "between": [n0, n1],
            "kb_per_trial": {k: round(v / 1024 / (n1 - n0), 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            "total_kb_per_trial": round(sum(by.values()) / 1024 / (n1 - n0), 2),
            "dcanets_lines_kb_per_trial": {k: round(v / 1024 / (n1 - n0), 2)
                                           for k, v in sorted(ours.items(), key=lambda kv: -kv[1])[:6]}}


def _gaps(state, own: Dict[str, float]) -> List[float]:
    """Per trial in start order: the time to the next trial's start minus the trial's own time."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state.tracking_uri)
    runs, token = [], None
    while True:
        page = client.search_runs([state.experiment_id], f"tags.mlflow.parentRunId = '{state.parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    starts = sorted((r.info.start_time / 1000.0, r.data.tags["trial_id"]) for r in runs)
    return [b[0] - a[0] - own.get(a[1], 0.0) for a, b in zip(starts, starts[1:]) if a[1] in own]


# ------------------------------------------------------------------------------ all sizes
def run_size(trials: int, quick: bool, traced: bool = False) -> Dict[str, Any]:
    """One size in a fresh Python process: its own driver, memory and Ray."""
    with tempfile.TemporaryDirectory(prefix="dcanets-scale-") as d:
        part = Path(d) / "part.json"
        cmd = [sys.executable, __file__, "--quick" if quick else "--full", "--one", str(trials), "--part", str(part),
               *(["--traced"] if traced else [])]
        code = subprocess.run(cmd, cwd=Path(__file__).parent).returncode
        if code:
            raise SystemExit(f"search_scale: the {trials}-trial search failed (exit {code})")
        return json.loads(part.read_text())


def verdict(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    first, last = results[0], results[-1]
    ratio = (last["gap_median_s"] / first["gap_median_s"]) if first["gap_median_s"] else float("nan")
    worst_overhead = max(r["overhead_per_trial_s"] for r in results)
    worst_rss = max(r["rss_kb_per_trial"] for r in results if r["trials"] >= 100) if any(
        r["trials"] >= 100 for r in results) else last["rss_kb_per_trial"]
    worst_folder = max(r["folder_mb_per_trial_beyond_checkpoints"] for r in results)
    return {
        "overhead_s_worst": worst_overhead, "overhead_met": worst_overhead <= GOAL["overhead_s"],
        "median_ratio_largest_to_smallest": round(ratio, 3), "flat_met": ratio <= GOAL["flat_ratio"],
        "rss_kb_per_trial_worst": worst_rss, "rss_met": worst_rss <= GOAL["rss_kb_per_trial"],
        "folder_mb_per_trial_worst": worst_folder, "folder_met": worst_folder <= GOAL["folder_mb_per_trial"],
    }


def rss_miss(heap: Dict[str, Any]) -> str:
    """Why the driver's memory grows per trial, from the traced run."""
    kb = heap["kb_per_trial"]
    return (f"the driver's Python heap grows {heap['total_kb_per_trial']:.0f} KB per trial ({heap['trials']} trials "
            f"under tracemalloc): {kb.get('ray/tune', 0):.0f} KB allocated by Ray Tune (each Trial keeps its metric "
            f"analysis of every reported number, its last result and cached state for the whole search), "
            f"{kb.get('ray', 0):.0f} KB by Ray's core, {kb.get('optuna', 0):.1f} KB by Optuna, "
            f"{kb.get('dcanets', 0) + kb.get('pydantic', 0):.1f} KB by dcanets (the trial's record)")


def plot(results: List[Dict[str, Any]], quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in results:
        gaps = r["gaps_s"]
        axes[0].plot(range(1, len(gaps) + 1), gaps, lw=0.6, alpha=0.7, label=f"{r['trials']} trials")
        counts, mb = zip(*r["rss_samples"]) if r["rss_samples"] else ((), ())
        axes[1].plot(counts, mb, label=f"{r['trials']} trials: {r['rss_kb_per_trial']:.1f} KB/trial")
    axes[0].axhline(GOAL["overhead_s"], color="k", ls="--", lw=0.8, label="goal")
    axes[0].set(xlabel="trial (start order)", ylabel="seconds between trials, beyond the trial",
                title="driver overhead per trial", yscale="log")
    axes[1].set(xlabel="trials started", ylabel="driver RSS (MB)", title="driver memory")
    n = [r["trials"] for r in results]
    axes[2].plot(n, [r["folder_mb_per_trial_beyond_checkpoints"] * 1024 for r in results], "o-",
                 label="folder beyond checkpoints")
    axes[2].plot(n, [r["checkpoint_bytes"] / r["trials"] / 1024 for r in results], "s-",
                 label="kept checkpoints (per trial)")
    axes[2].set(xlabel="trials", ylabel="KB per trial", title="search folder", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = figure_path("search_scale", quick)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.one:
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        with tempfile.TemporaryDirectory(prefix="dcanets-scale-") as d:
            args.part.write_text(json.dumps((run_traced if args.traced else run_one)(args.one, Path(d))))
        return
    wanted = [int(x) for x in args.sizes.split(",")] if args.sizes else sizes(args.quick)
    results: List[Dict[str, Any]] = []
    budget = {"sizes": wanted, "train": TRAIN, "sampler": "RandomSampler", "scheduler": "FIFOScheduler",
              "max_concurrent_trials": 1, "resources_per_trial": {"cpu": 1}, "ray_cpus": 2, "mlflow": "sqlite"}
    heap = args.heap if args.heap is not None else (None if args.quick else 300)
    payload: Dict[str, Any] = {"budget": budget, "goal": GOAL}
    for n in wanted:
        progress(f"{n} trials ...")
        results.append(run_size(n, args.quick))
        _print(results[-1])
        payload.update(results=results, complete=len(results) == len(wanted))
        if payload["complete"]:
            payload["verdict"] = verdict(results)
            payload["figure"] = plot(results, args.quick).name
        write_result("search_scale", args.quick, payload, args.out)
    print(f"verdict: {json.dumps(verdict(results))}")
    if heap:
        progress(f"{heap} trials under tracemalloc ...")
        payload["driver_heap"] = run_size(heap, args.quick, traced=True)
        print(f"driver heap growth per trial, by package: {json.dumps(payload['driver_heap'])}")
        if payload.get("verdict") and not payload["verdict"]["rss_met"]:
            payload["verdict"]["rss_miss"] = rss_miss(payload["driver_heap"])
        write_result("search_scale", args.quick, payload, args.out)


def _print(r: Dict[str, Any]) -> None:
    print(f"{r['trials']} trials ({r['status']}): fit {r['fit_seconds']:.1f}s, trials' own {r['trial_seconds']:.1f}s, "
          f"overhead {r['overhead_per_trial_s']:.3f}s/trial (gap median {r['gap_median_s']:.3f}s: first tenth "
          f"{r['gap_median_first_tenth_s']:.3f}s, last {r['gap_median_last_tenth_s']:.3f}s); driver RSS "
          f"{r['rss_mb_start']}->{r['rss_mb_end']} MB, {r['rss_kb_per_trial']:.1f} KB/trial; folder "
          f"{r['folder_mb_per_trial_beyond_checkpoints'] * 1024:.1f} KB/trial beyond {r['checkpoints_kept']} "
          f"checkpoints ({r['checkpoint_bytes'] / 2 ** 20:.1f} MB); search.json {r['search_json_bytes']} B", flush=True)


if __name__ == "__main__":
    main()
