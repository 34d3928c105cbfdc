"""Checkpoints load with ``weights_only=True``: plain data round-trips, a code-running payload is refused."""
import random

import numpy as np
import pytest
import torch
from engine_runs import CodeRunningPayload

from dcanets.engine import checkpoint


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    checkpoint.save({"rng": checkpoint.rng_state(), "epoch": 1, "history": [{"val_acc": 0.5}]}, tmp_path / "last.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = checkpoint.load_checkpoint(tmp_path)
    checkpoint.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    assert loaded["epoch"] == 1 and loaded["history"] == [{"val_acc": 0.5}]


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "evil": CodeRunningPayload(marker)}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="refusing to load checkpoint") as info:
        checkpoint.load_checkpoint(tmp_path / "last.pt")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_an_unreadable_checkpoint_is_one_line(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
