"""A small valid search file (digits, two epochs) that each test overrides where it needs to, and
a local Ray shared by the tests of one module (Ray takes seconds to start)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
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


def _write_config(folder: Path, **overrides: Any) -> Path:
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


@pytest.fixture
def write_config() -> Callable[..., Path]:
    return _write_config


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
