"""``dcanets timm-train``: a script of timm's train.py's shape (``timm_train_like.py``, which never
imports dcanets) runs with dcanets' models and decompositions, unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcanets import cli

SCRIPT = Path(__file__).with_name("timm_train_like.py")


@pytest.fixture(autouse=True)
def _own_argv(monkeypatch):
    """The command sets sys.argv and sys.path for the script, as `python train.py` would."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize("opt, extra", [
    ("dcacounter", []),
    ("lookahead_dcaquasihalf", []),
    ("dcacounter", ["--opt-kwargs", "rho=0.5"]),      # κ measured on the batch read off the script's passes
])
def test_a_train_py_shaped_script_trains_cifar_negnet20_with_a_decomposition(tmp_path, capsys, opt, extra):
    summary = tmp_path / "summary.json"
    rc = cli.main(["timm-train", str(SCRIPT), "--model", "cifar_negnet20", "--opt", opt, "-b", "4",
                   "--summary", str(summary), *extra])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("Train: ") == 2
    result = json.loads(summary.read_text())
    assert result["argv0"] == str(SCRIPT)
    assert result["optimizer"] == ("Lookahead" if opt.startswith("lookahead") else "DcaCounter")
    assert result["moved"] > 0 and result["loss"] == result["loss"]


def test_a_closure_only_decomposition_stops_at_its_first_step_in_one_line(capsys):
    rc = cli.main(["timm-train", str(SCRIPT), "--model", "cifar_negnet20", "--opt", "dcaprox", "-b", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("dcanets timm-train: error: DcaProx needs a closure")
    assert "timm's train.py, needs another decomposition" in err[0]


def test_a_missing_script_is_one_line(capsys, tmp_path):
    assert cli.main(["timm-train", str(tmp_path / "train.py"), "--model", "x"]) == 2
    assert "No such file (give the path of timm's train.py)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_same_script_alone_does_not_know_the_dcanets_names(tmp_path):
    """What the command is for: without it, timm's registry has no dcanets name."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "cifar_negnet20", "--opt", "dcacounter"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "Unknown model (cifar_negnet20)" in proc.stderr
