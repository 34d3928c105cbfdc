"""A small valid search file (digits, two epochs) that each test overrides where it needs to, and
a local Ray shared by the tests of one module (Ray takes seconds to start)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from tune_files import TINY, write_config_file  # noqa: F401  (TINY: re-exported for the tests)


@pytest.fixture
def write_config() -> Callable[..., Path]:
    return write_config_file


@pytest.fixture(autouse=True)
def no_tracking_uri_variable(monkeypatch):
    """The searches log where their test says (the SQLite default under --output, or a server),
    not to a store MLFLOW_TRACKING_URI of the caller's shell names (`dcanets tune` follows it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the module; yields its address (for ``--address`` subprocesses)."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():  # left by another module
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def closed_figures(monkeypatch) -> list:
    """The matplotlib figures closed during the test (``plot_curves`` draws one and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures
