"""``dcanets tune``: real searches (Ray trials, Optuna, MLflow SQLite): end to end, interrupted by
SIGINT, then resumed. The YAML schema has its own tests in ``test_schema.py``; the same searches
logged to an MLflow tracking server run in ``test_mlflow_server.py``.

One local Ray instance is shared by the whole module (Ray takes seconds to start); the
interrupted search runs in a subprocess that joins it with ``--address``.
"""
from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml
from tune_files import FIFO, runs_of, start_search, trial_of

from dcanets.tune.state import STATE, TRIALS


# ------------------------------------------------------------------------------ real searches
@pytest.mark.slow
def test_search_end_to_end_logs_finished_runs(ray_local, tmp_path, capsys, monkeypatch, write_config):
    search_end_to_end(tmp_path, capsys, monkeypatch, write_config)


def search_end_to_end(tmp_path, capsys, monkeypatch, write_config, server: Optional[str] = None):
    """A search with a trial that crashes, logged to the default SQLite store or to the tracking
    ``server`` (test_mlflow_server.py): the same runs, statuses, metrics and artifacts either way.
    Returns the parent run."""
    from dcanets.cli import main
    from dcanets.engine import TrainConfig

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # artifacts must not land in the caller's directory

    # the CIFAR nets refuse shortcut_type 'bogus' when built: that trial crashes, which must end
    # as a FAILED run; weight_decay = fraction * lr: the sampled fraction is logged too, under a
    # name MLflow accepts
    space = {"model_kwargs.shortcut_type": {"type": "choice", "values": ["bogus", "pad"]},
             "weight_decay": {"type": "loguniform", "low": 1e-3, "high": 1e-2, "times": "lr"}}
    cfg = write_config(tmp_path, space=space,
                       search_alg={"points_to_evaluate": [
                           {"lr": 0.05, "model_kwargs.shortcut_type": "bogus", "weight_decay:fraction": 0.01},
                           {"lr": 0.05, "model_kwargs.shortcut_type": "pad", "weight_decay:fraction": 0.01},
                           {"lr": 0.15, "model_kwargs.shortcut_type": "pad", "weight_decay:fraction": 0.001}]},
                       tracking={"uri": server, "experiment": tmp_path.name} if server else {},
                       checkpoints={"keep_best": 1})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "tiny: 3 trials" in out and "FAILED" in out
    (exp_dir,) = (tmp_path / "out").glob("tiny-*")
    best = yaml.safe_load((exp_dir / "best.yaml").read_text())
    assert TrainConfig.from_dict(best).lr == pytest.approx(best["lr"]) and "output" not in best
    assert (exp_dir / "curves.png").stat().st_size > 1000
    uri = server or f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client, parents, children = runs_of(uri, tmp_path.name if server else None)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3
    for c in children:
        failed = c.data.params["model_kwargs.shortcut_type"] == "bogus"
        assert c.info.status == ("FAILED" if failed else "FINISHED")
    assert "FAILED" in {c.info.status for c in children} and "FINISHED" in {c.info.status for c in children}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    ok = [c for c in children if c.info.status == "FINISHED"]
    assert all("lr" in c.data.params and "final_checkpoint" in c.data.tags for c in ok)
    for c in children:
        p = c.data.params
        assert float(p["weight_decay"]) == pytest.approx(float(p["weight_decay:fraction"]) * float(p["lr"]))
    # every trial run holds its whole TrainConfig (fixed, sampled, defaults), so params filter trials
    fields = set(TrainConfig.model_fields) - {"output", "opt_kwargs", "model_kwargs"}
    assert all(fields <= set(c.data.params) and c.data.params["epochs"] == "2" for c in children)
    found = client.search_runs([parents[0].info.experiment_id],
                               "params.model = 'cifar_resnet20' and params.opt = 'sgd'")
    assert {r.info.run_id for r in found} == {c.info.run_id for c in children}
    assert all("model_kwargs.shortcut_type=" in c.data.tags["sampled"] for c in children)
    # the parent charts every trial's metric, and the console says how to open a SQLite store
    assert {f"val_acc/{c.data.tags['trial_id']}" for c in ok} <= set(parents[0].data.metrics)
    assert ("MLflow UI: mlflow ui --backend-store-uri" in out) is (server is None)
    assert "View experiment at" not in out and "View run" not in out
    history = client.get_metric_history(ok[0].info.run_id, "val_acc")
    assert [m.step for m in history][0] == 1  # per-epoch metrics, step = epoch
    assert "best_val_acc" in parents[0].data.metrics
    assert {"config.yaml", "best.yaml", "curves.png", "trials.csv", "best_model"} <= {
        a.path for a in client.list_artifacts(parents[0].info.run_id)}
    # artifacts beside the SQLite file, or through the server's proxy (never ./mlruns)
    root = "mlflow-artifacts:/" if server else (tmp_path / "out" / "mlartifacts").as_uri()
    assert parents[0].info.artifact_uri.startswith(root)
    assert not (tmp_path / "cwd" / "mlruns").exists()
    # the experiment is marked as holding training runs ("Machine learning" in MLflow's UI); MLflow
    # 3.17's UI follows the link's workflowType instead, so the outputs line gives a server's link
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"{server}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"MLflow: {link if server else uri})" in out, out
    check_best_model(uri, parents[0], children)
    check_search_folder(exp_dir, parents[0], ok)
    return parents[0]


def check_search_folder(exp_dir, parent, finished) -> None:
    """What a search leaves on disk: one record file per trial beside search.json (which holds none),
    and, with ``checkpoints: {keep_best: 1}``, the best trial's last checkpoint only."""
    assert "trials" not in json.loads((exp_dir / STATE).read_text())
    assert len(list((exp_dir / TRIALS).glob("*.json"))) == 3
    kept = [str(p.parent) for p in exp_dir.glob("*/checkpoint_*/last.pt")]
    (best,) = [c for c in finished if c.data.tags["trial_id"] == parent.data.tags["best_trial"]]
    assert kept == [best.data.tags["final_checkpoint"]]
    others = [c for c in finished if c is not best]
    assert others and not any(Path(c.data.tags["final_checkpoint"]).exists() for c in others)


def check_best_model(uri: str, parent, children) -> None:
    """The line of docs/tuning.md loads the best trial's final weights, into a network that
    computes what the engine's own network computes."""
    import torch

    import dcanets
    from dcanets.engine import TrainConfig
    from dcanets.engine.loop import build_model

    run_id = parent.info.run_id
    model = dcanets.load_model(f"runs:/{run_id}/best_model", tracking_uri=uri)
    assert parent.data.tags["best_model"] == f"runs:/{run_id}/best_model"
    (best,) = [c for c in children if c.data.tags["trial_id"] == parent.data.tags["best_trial"]]
    ckpt = torch.load(f"{best.data.tags['final_checkpoint']}/last.pt", map_location="cpu", weights_only=True)
    weights = model.state_dict()
    assert weights.keys() == ckpt["model"].keys()
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    engine_model = build_model(TrainConfig.from_dict(ckpt["config"]), len(ckpt["classes"]), len(ckpt["mean"]))
    engine_model.load_state_dict(ckpt["model"])
    x = torch.randn(4, len(ckpt["mean"]), 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), engine_model.eval()(x))


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


EPOCHS = 20  # ~0.1 s each: the signal lands while the second trial still has most of its epochs to go


def wait_for_second_trial(proc, lines, deadline_s=150):
    """Read progress lines until a trial is done and the next one has reported 2 epochs."""
    done_id, deadline = None, time.monotonic() + deadline_s
    for line in proc.stdout:
        lines.append(line)
        if done_id is None and line.rstrip().endswith("] done"):
            done_id = trial_of(line)
        elif done_id and f"epoch 2/{EPOCHS}" in line and done_id not in line:
            return done_id, trial_of(line)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("search ended before its second trial ran:\n" + "".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 600], ids=["no-budget", "time-budget"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_search_ends_killed_and_resumes_without_losing_trials(ray_local, tmp_path, capsys, write_config,
                                                                         sig, budget):
    """Ctrl-C or `kill` to a running `dcanets tune`, with and without tune_config.time_budget_s (all
    shipped configs have one): exit 130, the parent run and the cut trial KILLED in MLflow, the
    completed trial FINISHED, nothing RUNNING, and the --resume command as the last stderr line.
    `--resume` then finishes the search, keeping the completed trial and continuing the cut one."""
    # resuming is the same after either signal: two of the four cases check it
    interrupt_then_resume(ray_local, tmp_path, capsys, write_config, sig, budget,
                          resume=(sig, budget) in ((signal.SIGINT, None), (signal.SIGTERM, 600)))


def interrupt_then_resume(address, tmp_path, capsys, write_config, sig, budget, resume: bool = True,
                          server: Optional[str] = None) -> None:
    """The interrupted search and its --resume, logged to the default SQLite store or to the
    tracking ``server`` (test_mlflow_server.py)."""
    from dcanets.cli import main

    cfg = write_config(tmp_path, scheduler=FIFO, train={"epochs": EPOCHS},
                       tune_config={"num_samples": 2, "max_concurrent_trials": 1, "time_budget_s": budget},
                       tracking={"uri": server, "experiment": tmp_path.name} if server else {})
    out = tmp_path / "out"
    proc = start_search(cfg, out, address, tmp_path / "stderr.txt")
    lines: list = []
    done_id, cut_id = wait_for_second_trial(proc, lines)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, "".join(lines) + rest + err
    (exp_dir,) = out.glob("tiny-*")
    last = err.strip().splitlines()[-1]
    assert last.startswith("dcanets tune: interrupted") and f"dcanets tune --resume {exp_dir}" in last, err
    assert sig.name in last and "Traceback" not in err, err
    assert "status KILLED" in rest, rest
    uri, experiment = (server, tmp_path.name) if server else (f"sqlite:///{out / 'mlflow.db'}", None)
    _, parents, children = runs_of(uri, experiment)
    assert [p.info.status for p in parents] == ["KILLED"]
    status = {c.data.tags["trial_id"]: c.info.status for c in children}
    assert status == {done_id: "FINISHED", cut_id: "KILLED"}, status
    with (exp_dir / "trials.csv").open() as f:
        rows = {r["trial_id"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {done_id: "TERMINATED", cut_id: "INTERRUPTED"}, rows

    if not resume:
        return
    parent_id = parents[0].info.run_id
    assert main(["tune", "--resume", str(exp_dir)]) == 0
    text = capsys.readouterr().out
    assert "tiny: 2 trials" in text and "status FINISHED" in text, text
    _, parents, children = runs_of(uri, experiment)
    assert [(p.info.run_id, p.info.status) for p in parents] == [(parent_id, "FINISHED")]  # the same parent run
    assert {c.data.tags["trial_id"]: c.info.status for c in children} == {done_id: "FINISHED", cut_id: "FINISHED"}
    rows = (exp_dir / "trials.csv").read_text().splitlines()
    assert f",TERMINATED,{EPOCHS}," in next(r for r in rows if r.startswith(done_id))  # kept, not re-run
    (progress,) = exp_dir.glob(f"trial_{cut_id}_*/progress.csv")
    epochs = [int(line.split(",")[0]) for line in progress.read_text().splitlines()[1:]]
    assert epochs.count(1) == 1 and epochs[-1] == EPOCHS, epochs  # resumed from its checkpoint


@pytest.mark.slow
def test_sigkill_then_resume_leaves_no_running_or_orphan_run(ray_local, tmp_path, capsys, write_config):
    """SIGKILL gives the driver no chance to end its runs or save Tune's state. Tune's experiment
    snapshot is kept rare here (TUNE_GLOBAL_CHECKPOINT_S), so the trials started before the kill
    are missing from it and are sampled again under new ids on --resume: their old runs must not
    stay behind as orphans, and nothing may stay RUNNING."""
    from dcanets.cli import main

    cfg = write_config(tmp_path, scheduler=FIFO, train={"epochs": EPOCHS},
                       tune_config={"num_samples": 2, "max_concurrent_trials": 1, "time_budget_s": 600})
    out = tmp_path / "out"
    proc = start_search(cfg, out, ray_local, tmp_path / "stderr.txt")
    lines: list = []
    for line in proc.stdout:  # the first trial completes ...
        lines.append(line)
        if line.rstrip().endswith("] done"):
            break
    (exp_dir,) = out.glob("tiny-*")
    deadline = time.monotonic() + 60
    while len(list((exp_dir / TRIALS).glob("*.json"))) < 2:  # ... the second one starts (its record)
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        time.sleep(0.01)
    proc.kill()  # before its first epoch (and so before Tune's next experiment snapshot)
    proc.communicate(timeout=60)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["RUNNING"] and len(children) == 2  # what SIGKILL leaves

    assert main(["tune", "--resume", str(exp_dir)]) == 0
    text = capsys.readouterr().out
    assert "tiny: 2 trials" in text and "status FINISHED" in text, text
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    with (exp_dir / "trials.csv").open() as f:
        trials = {r["trial_id"]: r["status"] for r in csv.DictReader(f)}
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials)  # one run per trial, no orphan
    assert {c.info.status for c in children} == {"FINISHED"} and set(trials.values()) == {"TERMINATED"}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    from mlflow.entities import ViewType

    client, _, _ = runs_of(uri)
    deleted = client.search_runs([parents[0].info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    # the run of a trial started after Tune's last snapshot (most runs: the second trial) is deleted
    assert not {r.data.tags["trial_id"] for r in deleted} & set(trials)


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_exits_1_with_one_line(ray_local, tmp_path, capfd, write_config):
    from dcanets.cli import main

    # the CIFAR nets refuse shortcut_type 'bogus' when built: every trial crashes in the engine
    cfg = write_config(tmp_path, scheduler=FIFO,
                       space={"model_kwargs.shortcut_type": {"type": "choice", "values": ["bogus"]}},
                       tune_config={"num_samples": 2})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    out, err = capfd.readouterr()
    assert "status FAILED" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("dcanets tune: error: all 2 trial(s) failed; first error:"), err
    _, parents, children = runs_of(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FAILED"] and {c.info.status for c in children} == {"FAILED"}


@pytest.mark.slow
@pytest.mark.parametrize("resources, what", [({"cpu": 4}, "resources.cpu: each trial asks for 4 CPUs"),
                                             ({"gpu": 1}, "resources.gpu: each trial asks for 1 GPU")])
def test_resources_no_node_has_fail_before_any_trial(ray_local, tmp_path, capfd, write_config, resources, what):
    from dcanets.cli import main

    cfg = write_config(tmp_path, resources=resources)
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 2
    _, err = capfd.readouterr()
    line = next(x for x in err.splitlines() if x.startswith("dcanets tune: error:"))
    assert what in line and "1 node(s)" in line, err
    assert ("2 CPUs" if "cpu" in resources else "no node has a GPU") in line
    assert not list((tmp_path / "out").glob("tiny-*"))  # nothing started, nothing left


def test_progress_clock_after_resume_excludes_the_downtime(write_config, tmp_path):
    """Tuner.restore brings back a pickled ProgressLines: bound to the resumed session, its clock
    continues from the time the search had run (search.json's fit_seconds), not from when the
    search was first started."""
    import pickle

    from dcanets.tune import schema
    from dcanets.tune.callbacks import ProgressLines
    from dcanets.tune.search import create_search_dir

    spec = schema.load(write_config(tmp_path, tracking={"enabled": False}))
    saved = pickle.dumps(ProgressLines(spec))
    time.sleep(0.2)  # "downtime"
    state = create_search_dir(spec, tmp_path / "out")
    state.finish_session(100.0, "KILLED", [])
    restored = pickle.loads(saved)
    restored.bind(state)
    restored.setup()
    assert 100.0 <= time.time() - restored.t0 < 100.1


def test_curves_keep_a_diverged_trial_from_squashing_the_loss_axis(write_config, tmp_path, closed_figures):
    from dcanets.tune import report, schema
    from dcanets.tune.state import TrialResult

    figures = closed_figures
    spec = schema.load(write_config(tmp_path))
    ok = tuple({"epoch": e, "val_acc": 0.5, "train_loss": 2.0 / e} for e in (1, 2, 3))
    diverged = ({"epoch": 1, "val_acc": 0.1, "train_loss": 1e12},
                {"epoch": 2, "val_acc": 0.1, "train_loss": float("nan")})
    trials = [TrialResult("ok", "TERMINATED", {"lr": 0.1}, ok, best=0.5),
              TrialResult("diverged", "TERMINATED", {"lr": 1.0}, diverged, best=0.1)]
    report.plot_curves(trials, spec, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    loss_ax = figures[0].axes[1]
    assert loss_ax.get_yscale() == "log"
    low, high = loss_ax.get_ylim()
    assert low < 2.0 / 3 and high < 1e4  # the good trial's curve spans decades, not a flat line at zero


@pytest.mark.parametrize("flag, configured, variable, chosen", [
    ("flag.db", "file.db", "variable.db", "flag.db"),  # --tracking-uri first
    (None, "file.db", "variable.db", "file.db"),  # then the YAML's tracking.uri
    (None, None, "variable.db", "variable.db"),  # then MLflow's own variable
    (None, None, "", "out/mlflow.db"),  # set but empty: not a choice
    (None, None, None, "out/mlflow.db"),  # else SQLite under --output
])
def test_tracking_uri_precedence(flag, configured, variable, chosen, write_config, tmp_path, monkeypatch):
    from dcanets.tune import schema
    from dcanets.tune.search import create_search_dir

    if variable is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / variable}" if variable else "")
    cfg = write_config(tmp_path, tracking={"uri": f"sqlite:///{tmp_path / configured}" if configured else None,
                                           "enabled": False})
    state = create_search_dir(schema.load(cfg), tmp_path / "out", f"sqlite:///{tmp_path / flag}" if flag else None)
    assert state.tracking_uri == f"sqlite:///{tmp_path / chosen}"
    saved = json.loads(next((tmp_path / "out").glob("tiny-*/search.json")).read_text())
    assert saved["tracking_uri"] == state.tracking_uri  # what --resume uses, whatever the variable says then


def test_an_unusable_tracking_uri_from_the_variable_is_named_as_such(write_config, tmp_path, monkeypatch):
    from dcanets.tune import schema
    from dcanets.tune.search import create_search_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    with pytest.raises(ValueError, match=r"^tracking uri foo://bar \(from MLFLOW_TRACKING_URI\): "):
        create_search_dir(schema.load(write_config(tmp_path)), tmp_path / "out")
    assert not list((tmp_path / "out").glob("tiny-*"))  # nothing left behind


def test_a_new_sqlite_store_is_created_by_the_search_not_by_the_check(tmp_path):
    """Creating a SQLite store (MLflow's migrations, seconds) happens while Ray starts: the check
    before Ray only looks at the folder, and open_store creates the file."""
    from dcanets.tune.tracking import check_uri, open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_uri(uri)
    assert not (tmp_path / "mlflow.db").exists()
    open_store(uri)
    assert (tmp_path / "mlflow.db").is_file()
    check_uri(uri)  # an existing store is opened by the check itself
