"""What a finished search leaves behind: the table of best trials, best.yaml, trials.csv and curves.png."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from dcanets.tune import schema as tune_config
from dcanets.tune.storage import RESULT_FILES, Location, join


def short_params(config: Dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in config.items() if tune_config.DERIVED not in k)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------- outputs


def report(result: Dict[str, Any], spec: tune_config.TuneSpec, exp_dir: Path, top: int = 5) -> None:
    trials = result["trials"]
    ranked = sorted((t for t in trials if tune_config.is_finite(t["best"])), key=lambda t: t["best"],
                    reverse=spec.mode == "max")
    print(f"\n{spec.name}: {len(trials)} trials in {result['seconds']:.1f}s, status {result['status']}")
    print(f"{'trial':14s} {'status':11s} {'epochs':>6s} {spec.metric:>9s}  params")
    for t in ranked[:top]:
        print(f"{t['trial_id']:14s} {t['status']:11s} {t['epochs']:6d} {t['best']:9.4f}  {short_params(t['params'])}")
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
    written = [name for name in RESULT_FILES if (exp_dir / name).exists()]
    location = result.get("location") or Location.local(exp_dir)
    stored = f"copied to the storage {location.uri}; " if location.shared else ""
    print(f"outputs: {exp_dir}  ({', '.join(written) + '; ' if written else ''}{stored}MLflow: {_uri(exp_dir)})")
    if result["status"] == "KILLED":
        why = f"{result['signal']} received" if result.get("signal") else "trials left unfinished"
        print(f"dcanets tune: interrupted ({why}): continue with  {location.resume_command()}",
              file=sys.stderr)
    elif result["status"] == "FAILED":
        errors = result.get("errors") or []
        first = f"; first error: {errors[0]}" if errors else ""
        print(f"dcanets tune: error: all {len(trials)} trial(s) failed{first} "
              f"(each trial's traceback: {join(location.uri, 'trial_*/error.txt')})", file=sys.stderr)


def summarize(result: Dict[str, Any], spec, exp_dir: Path, state: Dict[str, Any]) -> None:
    from dcanets.tune.search import STATE
    from dcanets.tune.tracking import SearchTracker

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
    """The tracking URI, or for a server the link that opens the experiment on its runs."""
    from dcanets.tune.search import STATE
    from dcanets.tune.tracking import experiment_url

    try:
        state = json.loads((exp_dir / STATE).read_text())
        return experiment_url(state["tracking_uri"], state.get("experiment_id")) or state["tracking_uri"]
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
    keys = (spec.metric, "train_loss")
    for t in trials:
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(t["history"])]
        for ax, key in zip(axes, keys):
            values = [h.get(key) if tune_config.is_finite(h.get(key)) else float("nan") for h in t["history"]]
            ax.plot(epochs, values, marker="o", ms=3, label=t["trial_id"])
    for ax, key in zip(axes, keys):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            _loss_axis(ax, [h.get(key) for t in trials for h in t["history"]])
    axes[0].set_title(f"{spec.name}: {len(trials)} trials")
    if len(trials) <= 12:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_axis(ax, values: List[Any]) -> None:
    """A log axis, clipped at 100x the median loss: one diverged trial (loss 1e6, or inf) stays
    visible at the top edge instead of flattening every other curve against zero."""
    import statistics

    finite = sorted(v for v in values if tune_config.is_finite(v) and v > 0)
    if not finite:
        return
    ax.set_yscale("log")
    top = min(finite[-1] * 1.5, statistics.median(finite) * 100)
    ax.set_ylim(finite[0] / 1.5, top)
