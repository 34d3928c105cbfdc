"""``dcanets train`` as a user sees it: per-epoch lines, batch progress, a default output
directory, Ctrl-C with a resume command, filtered ``plugins``, and help for every flag."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcanets import cli

TINY = ["--data", "digits", "--limit", "64", "--epochs", "2", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def test_no_progress_prints_one_line_per_epoch_and_saves_to_a_default_directory(capsys, tmp_path):
    assert cli.main(["train", *TINY, "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert re.match(r"epoch 1/2  train_loss \d+\.\d+  train_acc \d\.\d+  val_loss \d+\.\d+  val_acc \d\.\d+  "
                    r"lr \S+  \d+\.\ds$", epochs[0])
    runs = list((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"cifar_resnet20-\d{8}-\d{6}", runs[0].name)
    assert (runs[0] / "last.pt").is_file() and (runs[0] / "metrics.json").is_file()
    assert lines[-1] == f"dcanets train: saved last.pt and metrics.json in {Path('runs/train') / runs[0].name}"
    assert json.loads(captured.out)["epoch"] == 2


def test_progress_bar_counts_batches_with_rate(capsys, tmp_path):
    assert cli.main(["train", *TINY, "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"epoch 2/2: 100%\|.*\| 4/4 \[.*batch/s", err), err  # 2 epochs x 2 batches of 32


def test_resume_without_output_writes_into_the_resumed_directory(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--no-progress", "--output", str(out)]) == 0
    assert cli.main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["epoch"] == 2
    assert not (tmp_path / "runs").exists()


def default_sigint() -> None:
    """In the child: Ctrl-C's default handler. A shell starts background jobs with SIGINT ignored,
    children inherit that, and Python then never installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_the_resume_command_and_exits_130(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DCANETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "dcanets", "train", "--data", "synthetic:1024", "--epochs", "200",
                             "--batch-size", "64", "--no-progress", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert re.search(rf"interrupted after epoch \d+; resume with: dcanets train --resume {re.escape(str(out))}$",
                     err.strip().splitlines()[-1]), err


def test_plugins_pattern_filters(capsys):
    assert cli.main(["plugins", "cifar*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["cifar_shortcut"]
    assert cli.main(["plugins", "*decomp*"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["decompositions"]


@pytest.mark.parametrize("command", ["train", "models", "plugins", "curvature", "shortcut-prior"])
def test_every_option_has_a_description(command):
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    missing = [a.option_strings or [a.dest] for a in sub._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, f"dcanets {command}: no help text for {missing}"
    for flag in ("--lr", "--epochs", "--momentum"):
        if command == "train":
            action = next(a for a in sub._actions if flag in a.option_strings)
            assert len(action.help) > 20
