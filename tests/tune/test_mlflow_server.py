"""``dcanets tune`` logging to a real MLflow tracking server instead of the SQLite default.

One ``mlflow server`` for the module, in its own process group: a SQLite backend of its own and
``--artifacts-destination``, so the artifacts travel through the server's HTTP proxy
(``mlflow-artifacts:/``), as on a shared server. The searches are those of ``test_search.py``
with ``tracking.uri`` set to the server, so both stores are held to the same assertions (nested
runs, statuses, per-epoch metrics, artifacts, the best model loaded back, --resume); each test
logs to an experiment of its own, since the server is shared.
"""
from __future__ import annotations

import signal
import time
from typing import Iterator

import pytest
from servers import MlflowServer
from servers import mlflow_server as start_mlflow_server
from test_search import interrupt_then_resume, search_end_to_end
from tune_files import free_port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.mark.slow
def test_search_logged_to_a_server_as_to_sqlite(mlflow_server, ray_local, tmp_path, capsys, monkeypatch,
                                                write_config):
    import torch

    import dcanets

    parent = search_end_to_end(tmp_path, capsys, monkeypatch, write_config, server=mlflow_server.url)
    # uploaded through the proxy into the server's artifact store, not written by the client
    run_dir = mlflow_server.artifacts / parent.info.experiment_id / parent.info.run_id / "artifacts"
    assert {"config.yaml", "best.yaml", "trials.csv", "curves.png", "best_model/model.pt",
            "best_model/model.yaml"} <= {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    # MLflow's own variable works as well as the argument (docs/tuning.md, "Loading the best model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    model = dcanets.load_model(f"runs:/{parent.info.run_id}/best_model")
    weights = torch.load(run_dir / "best_model" / "model.pt", weights_only=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_interrupted_search_on_a_server_ends_killed_and_resumes(mlflow_server, ray_local, tmp_path, capsys,
                                                                write_config):
    interrupt_then_resume(ray_local, tmp_path, capsys, write_config, signal.SIGINT, None,
                          server=mlflow_server.url)


def test_a_server_that_is_down_stops_the_search_in_one_line_before_ray(tmp_path, capfd, write_config):
    from dcanets.cli import main

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_config(tmp_path, tracking={"uri": uri})
    t0 = time.monotonic()
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 2
    out, err = capfd.readouterr()
    assert time.monotonic() - t0 < 30  # MLflow's own retries took about 4 minutes
    assert err.strip().splitlines()[-1] == (
        f"dcanets tune: error: tracking uri {uri}: no MLflow server answers there (Connection refused); "
        "start it (mlflow server ...) or give another --tracking-uri / tracking.uri"), err
    assert "ray_init" not in out and not list((tmp_path / "out").glob("tiny-*"))  # nothing started
