"""``dcanets train`` in MLflow when asked (flag, ``tracking:`` in --config, MLFLOW_TRACKING_URI, a
resumed tracked run), never otherwise: one run with the whole config as params, ``val_acc`` per
epoch, FINISHED / FAILED / KILLED like a search's trials, the model loadable with dcanets.load_model."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

import dcanets
from dcanets import cli
from dcanets.engine.config import TrainConfig

pytestmark = pytest.mark.slow  # 5-15 s each: a new SQLite store is MLflow's schema migrations

TINY = ["--data", "digits", "--limit", "96", "--epochs", "2", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def _runs(uri):
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments) if experiments else []


def test_the_variable_alone_logs_one_finished_run_with_the_config_and_the_model(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["train", *TINY, "--opt", "dcacounter", "--opt-kwargs", "rho=0.01", "--output", "run"]) == 0
    client, runs = _runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert len(params) >= len(TrainConfig.model_fields) - 2     # every field; empty mappings have no key
    assert (params["opt"], params["opt_kwargs.rho"], params["epochs"], params["limit"]) == ("dcacounter", "0.01",
                                                                                           "2", "96")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert "dca_kappa" in run.data.metrics and "best_val_acc" in run.data.metrics
    model = dcanets.load_model(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert model.fc.out_features == 10 and run.data.metrics["val_acc"] == pytest.approx(final["val_acc"])
    err = capsys.readouterr().err
    assert f"mlflow ui --backend-store-uri {uri}" in err and "(FINISHED)" in err


def test_nothing_is_logged_unless_asked(tmp_path):
    assert cli.main(["train", *TINY, "--output", "run"]) == 0
    assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "run" / "mlflow_run.json").exists()


def test_tracking_in_the_config_file_and_an_experiment_name(tmp_path):
    store = f"sqlite:///{tmp_path / 'c.db'}"
    (tmp_path / "best.yaml").write_text(f"lr: 0.02\ntracking: {{uri: {store}, experiment: mine}}\n")
    assert cli.main(["train", *TINY, "--config", "best.yaml", "--output", "run"]) == 0
    client, runs = _runs(f"sqlite:///{tmp_path / 'c.db'}")
    assert len(runs) == 1 and runs[0].data.params["lr"] == "0.02"
    assert client.get_experiment(runs[0].info.experiment_id).name == "mine"
    (tmp_path / "off.yaml").write_text(f"tracking: {{uri: sqlite:///{tmp_path / 'c.db'}, enabled: false}}\n")
    assert cli.main(["train", *TINY, "--config", "off.yaml", "--output", "run2"]) == 0
    assert len(_runs(f"sqlite:///{tmp_path / 'c.db'}")[1]) == 1
    (tmp_path / "bad.yaml").write_text("tracking: {uri: x, experimnet: y}\n")
    assert cli.main(["train", *TINY, "--config", "bad.yaml"]) == 2


def test_a_failure_is_failed_ctrl_c_is_killed_and_a_resume_continues_the_same_run(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    assert cli.main(["train", *TINY, "--model-kwargs", "drop_ratez=0.1", "--tracking-uri", uri,
                     "--output", "bad"]) == 2
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]

    def interrupted(m, epochs):                                 # Ctrl-C as the first epoch ends
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("dcanets.cli.train.epoch_line", interrupted)
        assert cli.main(["train", *TINY, "--tracking-uri", uri, "--output", "cut"]) == 130
    client, runs = _runs(uri)
    cut = next(r for r in runs if r.info.run_name == "cut")
    assert cut.info.status == "KILLED"
    assert cli.main(["train", "--resume", "cut", "--no-progress"]) == 0   # tracked before: tracked again
    client, runs = _runs(uri)
    assert len(runs) == 2
    resumed = client.get_run(cut.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(cut.info.run_id, "val_acc")] == [1, 2]
    assert cli.main(["train", "--resume", "cut", "--epochs", "3", "--no-progress", "--tracking-uri",
                     f"sqlite:///{tmp_path / 'other.db'}"]) == 2
    assert "--tracking-uri cannot change a resumed run" in capsys.readouterr().err


def test_a_store_mlflow_cannot_use_is_one_line_before_training(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--tracking-uri", "foo://bar", "--output", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dcanets train: error: tracking uri foo://bar: MLflow cannot use it")
    assert not (tmp_path / "run" / "last.pt").exists()
