"""``dcanets tune``: schema errors with YAML paths, the define-by-run space, and real searches
(Ray trials, Optuna, MLflow SQLite): end to end, interrupted by SIGINT, then resumed.

One local Ray instance is shared by the whole module (Ray takes seconds to start); the
interrupted search runs in a subprocess that joins it with ``--address``.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from dcanets.tune import schema as tune_config

TINY = {
    "name": "tiny",
    "train": {"data": "digits", "limit": 300, "epochs": 2, "batch_size": 64, "model": "cifar_resnet20",
              "sched": "none"},
    "space": {"lr": {"type": "loguniform", "low": 0.01, "high": 0.2}},
    "search_alg": {"sampler": {"type": "TPESampler", "seed": 0, "n_startup_trials": 2}},
    "scheduler": {"type": "ASHAScheduler", "grace_period": 1, "reduction_factor": 2},
    "tune_config": {"metric": "val_acc", "mode": "max", "num_samples": 3, "max_concurrent_trials": 2},
    "resources": {"cpu": 1},
}


def write_config(tmp_path: Path, **overrides) -> Path:
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        if isinstance(value, dict):  # None removes a key
            doc[key] = {k: v for k, v in doc[key].items() if v is not None}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def runs_of(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# ------------------------------------------------------------------------------ schema
def test_every_problem_is_reported_with_its_yaml_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        train: {data: missing/cifar.tar, epochs: 0, modle: x, opt_kwargs: {rho: -1}}
        space:
          lr: {type: loguniform, low: 0, high: 0.1}
          opt_kwargs.rho: {type: uniform, low: 0.1, high: 0.9, times: opt_kwargs.lam}
          opt_kwargs.lam: {type: uniform, low: -1.0, high: 2.0}
          momentum: {type: gaussian}
        scheduler: {type: ASHAScheduler, grace_perod: 1, metric: val_acc}
        tune_config: {metric: accuracy, num_samples: 0}
        resources: {cpu: 0, gpus: 1}
        trackin: {}
    """))
    with pytest.raises(ValueError) as info:
        tune_config.load(path)
    msg = str(info.value)
    expected = [
        "space.lr.low: must be > 0 for loguniform",
        "space.opt_kwargs.rho.times: must name a parameter declared above it",
        "space.momentum.type: must be one of",
        "train.epochs: must be an integer >= 1",
        "train.modle: not a TrainConfig field",
        "train.opt_kwargs.rho: must be >= 0, got -1",
        "space.opt_kwargs.lam.low: must be > 0",
        "train.data: data path not found",
        "scheduler.grace_perod: not an argument of ASHAScheduler",
        "scheduler.metric: set it in tune_config",
        "tune_config.metric: must be one of",
        "tune_config.num_samples: must be an integer >= 1",
        "resources.cpu: must be > 0",
        "resources.gpus: unknown key",
        "trackin: unknown key",
    ]
    for line in expected:
        assert line in msg, f"missing {line!r} in:\n{msg}"
    assert "15 problem(s)" in msg


def test_unknown_model_and_optimizer_are_named_before_ray_starts(tmp_path):
    path = write_config(tmp_path, train={"opt": "sgdd", "model": None},
                        space={"model": {"type": "choice", "values": ["cifar_resnet20", "cifar_negnet2O"]}})
    spec = tune_config.load(path)
    with pytest.raises(ValueError) as info:
        tune_config.check_registries(spec)
    msg = str(info.value)
    assert "space.model.values[1]: unknown model 'cifar_negnet2O'" in msg and "cifar_negnet20" in msg
    assert "train.opt: unknown opt 'sgdd'" in msg


def test_relative_data_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "set.tar").write_bytes(b"")
    (tmp_path / "cfg").mkdir()
    spec = tune_config.load(write_config(tmp_path / "cfg", train={"data": "../data/set.tar"}))
    assert spec.train["data"] == str((tmp_path / "data" / "set.tar").resolve())


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[2] / "tune_configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"quickstart.yaml", "negnet_vs_resnet_cifar10.yaml", "dca_rho_lambda.yaml",
            "double_resnet_mnist.yaml"} <= set(names)
    for name in names:
        try:
            spec = tune_config.load(root / name)
        except ValueError as exc:  # a machine without ../shared/data: only the data paths may fail
            problems = str(exc).splitlines()[1:]
            assert problems and all("data path not found" in p for p in problems), str(exc)
            continue
        assert spec.space and spec.train["epochs"] >= 1
        tune_config.check_registries(spec)


def test_define_by_run_conditions_and_fractions():
    import optuna

    space = {
        "opt": {"type": "choice", "values": ["sgd", "dcacounter"]},
        "opt_kwargs.lam": {"type": "loguniform", "low": 1.0, "high": 10.0, "when": {"opt": "dcacounter"}},
        "opt_kwargs.rho": {"type": "uniform", "low": 0.1, "high": 0.5, "times": "opt_kwargs.lam",
                           "when": {"opt": "dcacounter"}},
    }
    fn = tune_config.DefineByRun(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        values = fn(study.ask())
        seen.add(values["opt"])
        if values["opt"] == "sgd":
            assert set(values) == {"opt"}
        else:
            lam, rho = values["opt_kwargs.lam"], values["opt_kwargs.rho"]
            assert 0.1 * lam <= rho <= 0.5 * lam  # rho as a fraction of lam
    assert seen == {"sgd", "dcacounter"}
    cfg = tune_config.trial_train_config({"opt_kwargs": {"eps": 1}}, {"opt_kwargs.rho:fraction": 0.2,
                                                                      "opt_kwargs.rho": 0.5, "lr": 0.1})
    assert cfg == {"opt_kwargs": {"eps": 1, "rho": 0.5}, "lr": 0.1}


# ------------------------------------------------------------------------------ real searches
@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow
def test_search_end_to_end_logs_finished_runs(ray_local, tmp_path, capsys, monkeypatch):
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
def test_trial_cut_by_the_time_budget_before_its_first_report_keeps_its_params(ray_local, tmp_path, capsys):
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
def test_interrupted_search_ends_runs_and_resumes_without_losing_trials(ray_local, tmp_path, capsys):
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
