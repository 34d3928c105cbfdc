"""The small valid search file the tune tests start from, importable by test modules and conftest.

A plain module beside the tests (pytest puts this folder on ``sys.path``), because test modules
cannot import a conftest by package name: ``tests`` is not a package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
