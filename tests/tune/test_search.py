"""``dcanets tune``: real searches (Ray trials, Optuna, MLflow SQLite): end to end, interrupted by
SIGINT, then resumed. The YAML schema has its own tests in ``test_schema.py``.

One local Ray instance is shared by the whole module (Ray takes seconds to start); the
interrupted search runs in a subprocess that joins it with ``--address``.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml


def runs_of(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# ------------------------------------------------------------------------------ real searches
@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow
def test_search_end_to_end_logs_finished_runs(ray_local, tmp_path, capsys, monkeypatch, write_config):
    from dcanets.cli import main
    from dcanets.engine import TrainConfig

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # artifacts must not land in the caller's directory

    # timm's sgd is Nesterov: momentum 0 makes a trial crash, which must end as a FAILED run
    # weight_decay = fraction * lr: the sampled fraction is logged too, under a name MLflow accepts
    space = {"momentum": {"type": "choice", "values": [0.0, 0.9]},
             "weight_decay": {"type": "loguniform", "low": 1e-3, "high": 1e-2, "times": "lr"}}
    cfg = write_config(tmp_path, space=space,
                       search_alg={"points_to_evaluate": [
                           {"lr": 0.05, "momentum": 0.0, "weight_decay:fraction": 0.01},
                           {"lr": 0.05, "momentum": 0.9, "weight_decay:fraction": 0.01}]})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "tiny: 3 trials" in out and "FAILED" in out
    (exp_dir,) = (tmp_path / "out").glob("tiny-*")
    best = yaml.safe_load((exp_dir / "best.yaml").read_text())
    assert TrainConfig.from_dict(best).lr == pytest.approx(best["lr"]) and "output" not in best
    assert (exp_dir / "curves.png").stat().st_size > 1000
    client, parents, children = runs_of(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3
    for c in children:
        assert c.info.status == ("FAILED" if float(c.data.params["momentum"]) == 0.0 else "FINISHED")
    assert "FAILED" in {c.info.status for c in children} and "FINISHED" in {c.info.status for c in children}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    ok = [c for c in children if c.info.status == "FINISHED"]
    assert all("lr" in c.data.params and "final_checkpoint" in c.data.tags for c in ok)
    for c in children:
        p = c.data.params
        assert float(p["weight_decay"]) == pytest.approx(float(p["weight_decay:fraction"]) * float(p["lr"]))
    history = client.get_metric_history(ok[0].info.run_id, "val_acc")
    assert [m.step for m in history][0] == 1  # per-epoch metrics, step = epoch
    assert "config.yaml" in [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    assert "best_val_acc" in parents[0].data.metrics
    assert parents[0].info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts").as_uri())
    assert not (tmp_path / "cwd" / "mlruns").exists()


@pytest.mark.slow
def test_trial_cut_by_the_time_budget_before_its_first_report_keeps_its_params(ray_local, tmp_path, capsys,
                                                                                write_config):
    from dcanets.cli import main

    # one epoch over all digits takes seconds: the 2 s budget ends the trial before it reports
    cfg = write_config(tmp_path, train={"limit": None, "epochs": 5},
                       tune_config={"num_samples": 1, "time_budget_s": 2, "max_concurrent_trials": None})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 0
    (exp_dir,) = (tmp_path / "out").glob("tiny-*")
    with (exp_dir / "trials.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["epochs"] == "0" and 0.01 <= float(row["lr"]) <= 0.2
    assert not (exp_dir / "best.yaml").exists()  # nothing finished: no best point is claimed


@pytest.mark.slow
def test_interrupted_search_ends_runs_and_resumes_without_losing_trials(ray_local, tmp_path, capsys, write_config):
    """SIGINT to a running `dcanets tune` (a subprocess joined to the shared Ray): no MLflow run
    stays RUNNING; `--resume` then finishes the search and keeps the completed trial."""
    from dcanets.cli import main

    cfg = write_config(tmp_path, scheduler={"type": "FIFOScheduler", "grace_period": None, "reduction_factor": None},
                       train={"epochs": 3},
                       tune_config={"num_samples": 3, "max_concurrent_trials": 1})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcanets.cli", "tune", str(cfg), "--output", str(out), "--address", ray_local],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, done_id, cut_id, deadline = [], None, None, time.monotonic() + 150
    for line in proc.stdout:  # wait for a completed trial, then the second trial's first epoch
        lines.append(line)
        if done_id is None and line.rstrip().endswith("] done"):
            done_id = line.split("]")[0].split("[")[-1]
        elif done_id and "epoch 2/3" in line and done_id not in line:
            cut_id = line.split("]")[0].split("[")[-1]
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "--resume" in rest
    (exp_dir,) = out.glob("tiny-*")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["KILLED"]
    status = {c.data.tags["trial_id"]: c.info.status for c in children}
    assert status[done_id] == "FINISHED" and "RUNNING" not in status.values()
    assert "KILLED" in status.values()

    assert main(["tune", "--resume", str(exp_dir)]) == 0
    text = capsys.readouterr().out
    assert "tiny: 3 trials" in text and "status FINISHED" in text
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert done_id in {c.data.tags["trial_id"] for c in children}
    rows = (exp_dir / "trials.csv").read_text().splitlines()
    done_row = next(r for r in rows if r.startswith(done_id))
    assert ",TERMINATED,3," in done_row  # the completed trial kept its 3 epochs, not re-run
    (progress,) = exp_dir.glob(f"trial_{cut_id}_*/progress.csv")
    epochs = [int(line.split(",")[0]) for line in progress.read_text().splitlines()[1:]]
    assert epochs.count(1) == 1 and epochs[-1] == 3, epochs  # resumed from its checkpoint
