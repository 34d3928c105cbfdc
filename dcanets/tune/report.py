"""What a finished search leaves behind: the table of best trials, best.yaml, trials.csv and curves.png."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from dcanets.tune import schema
from dcanets.tune.builders import short_params, trial_train_config
from dcanets.tune.curves import plot_curves
from dcanets.tune.state import DIVERGED, SearchResult, SearchState, TrialResult, is_finite
from dcanets.tune.storage import RESULT_FILES, join


def report(result: SearchResult, spec: schema.TuneSpec, state: SearchState, top: int = 5) -> None:
    """The table of the best ``top`` trials, the output files, and one stderr line when the search
    was interrupted (with its resume command) or every trial failed."""
    exp_dir, trials = state.folder, result.trials
    ranked = result.ranked(spec.mode)
    print(f"\n{spec.name}: {len(trials)} trials in {result.seconds:.1f}s, status {result.status}")
    print(f"{'trial':14s} {'status':11s} {'epochs':>6s} {spec.metric:>9s}  params")
    for t in ranked[:top] + [t for t in trials if t.status == DIVERGED]:  # diverged: shown, never ranked
        print(f"{t.trial_id:14s} {t.status:11s} {t.epochs:6d} {t.best:9.4f}  {short_params(t.params)}")
    _write_trials_csv(trials, exp_dir / "trials.csv")
    if ranked:
        _write_best_yaml(ranked[0], spec, exp_dir)
        plot_curves(trials, spec, exp_dir / "curves.png")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    written = [name for name in RESULT_FILES if (exp_dir / name).exists()]
    location = result.location
    stored = f"copied to the storage {location.uri}; " if location.shared else ""
    print(f"outputs: {exp_dir}  ({', '.join(written) + '; ' if written else ''}{stored}MLflow: {_uri(state)})")
    if spec.tracking.enabled:
        _print_ui_command(state)
    if result.status == "KILLED":
        why = f"{result.signal} received" if result.signal else "trials left unfinished"
        print(f"dcanets tune: interrupted ({why}): continue with  {location.resume_command()}",
              file=sys.stderr)
    elif result.status == "FAILED":
        first = f"; first error: {result.errors[0]}" if result.errors else ""
        diverged = sum(t.status == DIVERGED for t in trials)
        first += f"; {diverged} diverged" if diverged else ""
        print(f"dcanets tune: error: all {len(trials)} trial(s) failed{first} "
              f"(each trial's traceback: {join(location.uri, 'trial_*/error.txt')})", file=sys.stderr)


def _write_best_yaml(best: TrialResult, spec: schema.TuneSpec, exp_dir: Path) -> None:
    """The best trial's full train config, for ``dcanets train --config``."""
    import yaml

    cfg = trial_train_config(spec.train, dict(best.params))
    cfg.pop("output", None)
    (exp_dir / "best.yaml").write_text(
        f"# best trial {best.trial_id}: {spec.metric}={best.best:.4f} "
        f"({spec.mode}) of search {exp_dir.name}\n# dcanets train --config {exp_dir / 'best.yaml'}\n"
        + yaml.safe_dump(cfg, sort_keys=False))


def summarize(result: SearchResult, spec: schema.TuneSpec, state: SearchState) -> None:
    """The search's outcome on its MLflow parent run: best value, best trial and model, outputs."""
    from dcanets.tune.tracking import SearchTracker

    best = result.best(spec.mode)
    if not spec.tracking.enabled or best is None:
        return
    exp_dir = state.folder
    SearchTracker(state).summarize(
        {f"best_{spec.metric}": best.best, "num_trials": len(result.trials),
         **{f"seconds_{k}": v for k, v in result.timings.items()},
         # each trial's best value on the parent: one chart of the search in MLflow's UI
         **{f"{spec.metric}/{t.trial_id}": t.best for t in result.trials if is_finite(t.best)}},
        {"best_trial": best.trial_id},
        [exp_dir / "best.yaml", exp_dir / "curves.png", exp_dir / "trials.csv"])


def _print_ui_command(state: SearchState) -> None:
    """For a SQLite store, the command that opens it and the page of this search's runs."""
    from dcanets.engine.tracking import ui_command

    command = ui_command(state.tracking_uri)
    if command and state.experiment_id:
        print(f"MLflow UI: {command}  then open http://127.0.0.1:5000/#/experiments/{state.experiment_id}"
              "/runs?workflowType=machine_learning")


def _uri(state: SearchState) -> str:
    """The tracking URI, or for a server the link that opens the experiment on its runs."""
    from dcanets.tune.tracking import experiment_url

    return experiment_url(state.tracking_uri, state.experiment_id) or state.tracking_uri


def _write_trials_csv(trials: Sequence[TrialResult], path: Path) -> None:
    import csv

    keys = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "epochs", "best", "node_id", *keys])
        for t in trials:
            w.writerow([t.trial_id, t.status, t.epochs, t.best, t.node_id, *[t.params.get(k) for k in keys]])


__all__ = ["plot_curves", "report", "summarize"]
