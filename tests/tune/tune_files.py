"""The small valid search file the tune tests start from, and a search run as a real command in a
subprocess (to interrupt it), importable by test modules and conftest.

A plain module beside the tests (pytest puts this folder on ``sys.path``), because test modules
cannot import a conftest by package name: ``tests`` is not a package.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

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

# the tiny search's ASHA swapped for FIFO: every trial runs all its epochs
FIFO = {"type": "FIFOScheduler", "grace_period": None, "reduction_factor": None}


def write_config_file(folder: Path, **overrides: Any) -> Path:
    """TINY with sections merged from ``overrides`` (a None value removes that key), as
    ``folder/search.yaml``."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        if isinstance(value, dict):
            doc[key] = {k: v for k, v in doc[key].items() if v is not None}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_search(cfg: Path, out: Path, address: str, stderr_path: Path, env: Any = None,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    """`python -m dcanets tune` joined to the shared Ray; stderr to a file (no pipe to fill). The
    child gets Ctrl-C's default handler: tests send it SIGINT, and a test suite started as a
    background job (`pytest &`) would pass SIGINT on ignored."""
    return subprocess.Popen(
        [sys.executable, "-m", "dcanets", "tune", str(cfg), "--output", str(out), "--address", address, *extra],
        stdout=subprocess.PIPE, stderr=stderr_path.open("w"), text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child, before exec: SIGINT handled as by default (Python then raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (for a server a test starts, or one that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial_of(line: str) -> str:
    """The trial id of a progress line (``  7.0s [199693ae] epoch 1/2 ...``)."""
    return line.split("]")[0].split("[")[-1]


def runs_of(uri: str, experiment: Optional[str] = None):
    """The MLflow client of ``uri``, the parent runs and the nested (trial) runs in it (in
    ``experiment`` only, when given: a tracking server shared by several tests)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments() if experiment in (None, e.name)]
    runs = client.search_runs(exps)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children
