"""``dcanets train`` never loses, overwrites or mixes a run's data, and never reports a failure as
a success (issue 24): --resume writes where it resumed from and keeps what a resume must keep, a
run folder is held by one run at a time and never taken over by a fresh one, a diverged run
fails, a full disk is one line that leaves the last checkpoint valid. Each case checks the exit
code, the one line and what is on disk afterwards (hashes where an earlier run's folder is involved).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dcanets import cli

RUN = ["--data", "digits", "--limit", "200", "--batch-size", "50", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DCANETS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def hashes(folder: Path, lock: bool = True) -> Dict[str, str]:
    """sha256 of every file in ``folder``; the lock file too unless ``lock`` is False (it names the
    last process that held the folder: a refused resume held it while it read the checkpoint)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and (lock or p.name != ".dcanets.lock")}


def train(argv: List[str], capsys) -> tuple:
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def command(*argv: str) -> List[str]:
    return [sys.executable, "-m", "dcanets", "train", *argv]


def env(tmp_path: Path) -> Dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", DCANETS_CACHE=str(tmp_path / "cache"))
    e.pop("DCANETS_DEBUG", None)
    return e


# ------------------------------------------------------------------------------ 1: where a resume writes
def test_a_moved_run_resumes_into_the_folder_it_was_moved_to(tmp_path, capsys):
    """The reproduction: train W/A, move it to W/B, make a new W/A, resume W/B. The checkpoint's
    saved output (W/A) must not win: W/A stays empty, W/B continues."""
    assert train([*RUN, "--epochs", "2", "--output", "W/A"], capsys)[0] == 0
    (tmp_path / "W" / "A").rename(tmp_path / "W" / "B")
    (tmp_path / "W" / "A").mkdir()
    code, _, err = train(["--resume", "W/B", "--epochs", "3"], capsys)
    assert code == 0, err
    assert err[-1] == "dcanets train: saved last.pt and metrics.json in W/B"
    assert list((tmp_path / "W" / "A").iterdir()) == []
    record = json.loads((tmp_path / "W" / "B" / "metrics.json").read_text())
    assert record["final"]["epoch"] == 3 and len(record["history"]) == 3
    assert record["config"]["output"] == "W/B"
    assert torch.load(tmp_path / "W" / "B" / "last.pt", weights_only=True)["epoch"] == 3


def test_a_trial_checkpoint_resumes_where_it_is_now(tmp_path, capsys):
    """A search trial's last.pt was written in a temporary folder that is gone (Tune copied it into
    the trial's checkpoint_NNNNNN folder): resuming it writes beside it, and the dead folder is not
    made again."""
    assert train([*RUN, "--epochs", "1", "--output", "tmp-trial"], capsys)[0] == 0
    ckpt = tmp_path / "search" / "trial_0" / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    (tmp_path / "tmp-trial" / "last.pt").rename(ckpt / "last.pt")
    for leftover in (tmp_path / "tmp-trial").iterdir():
        leftover.unlink()
    (tmp_path / "tmp-trial").rmdir()
    code, _, err = train(["--resume", str(ckpt / "last.pt"), "--epochs", "2"], capsys)
    assert code == 0, err
    assert err[-1] == f"dcanets train: saved last.pt and metrics.json in {ckpt}"
    assert not (tmp_path / "tmp-trial").exists()
    assert json.loads((ckpt / "metrics.json").read_text())["final"]["epoch"] == 2


def test_resume_with_another_output_is_refused(tmp_path, capsys):
    assert train([*RUN, "--epochs", "1", "--output", "W/A"], capsys)[0] == 0
    before = hashes(tmp_path / "W" / "A")
    code, _, err = train(["--resume", "W/A", "--epochs", "2", "--output", "W/C"], capsys)  # refused before any lock
    assert code == 2 and err == ["dcanets train: error: --resume W/A continues the run in its own folder 'W/A', not "
                                 "output 'W/C': drop --output (to continue a copy elsewhere, copy the folder and "
                                 "resume the copy)"]
    assert hashes(tmp_path / "W" / "A") == before and not (tmp_path / "W" / "C").exists()


# ------------------------------------------------------------------------------ 2: what a resume may change
def test_resume_refuses_another_split_and_fewer_epochs(tmp_path, capsys):
    """The reproduction: --limit/--seed/--val-fraction on resume mixed the validation set into
    the training set; --epochs below the epochs run was accepted silently."""
    assert train([*RUN, "--epochs", "2", "--output", "W/r"], capsys)[0] == 0
    before = hashes(tmp_path / "W" / "r", lock=False)
    first = json.loads((tmp_path / "W" / "r" / "metrics.json").read_text())["final"]
    code, _, err = train(["--resume", "W/r", "--epochs", "3", "--limit", "1000", "--seed", "7",
                          "--val-fraction", "0.5"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("dcanets train: error: checkpoint 'W/r' was trained with other values of val_fraction "
                             "(0.1, now 0.5), limit (200, now 1000), seed (0, now 7); a resumed run keeps them "
                             "(only epochs, device, amp,"), err
    code, _, err = train(["--resume", "W/r", "--epochs", "1"], capsys)
    assert code == 2 and err == ["dcanets train: error: epochs=1 is below the 2 epochs checkpoint 'W/r' has run; "
                                 "pass epochs >= 2 (more epochs continue the run)"]
    assert hashes(tmp_path / "W" / "r", lock=False) == before  # refused before any of the run's files was written
    # what may change: more epochs, where and how it runs
    code, _, err = train(["--resume", "W/r", "--epochs", "3", "--device", "cpu", "--no-amp", "--no-channels-last"],
                         capsys)
    assert code == 0, err
    history = json.loads((tmp_path / "W" / "r" / "metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]
    assert (history["final"]["val_images"], history["final"]["train_images"]) == (first["val_images"], 200) == (23, 200)


def test_every_field_outside_may_change_is_compared():
    """A field added to TrainConfig is kept on resume unless it is listed in MAY_CHANGE."""
    from dcanets.engine import TrainConfig
    from dcanets.engine.resume import MAY_CHANGE, differences

    saved = TrainConfig(data="digits").to_dict()
    assert set(MAY_CHANGE) < set(TrainConfig.model_fields)
    changed = {"lr": 0.1, "opt": "adamw", "split_seed": 3, "val_limit": 5, "augment": True,
               "label_smoothing": 0.1, "sched": "step", "model_kwargs": {"shortcut_type": "pad"}}
    for key, value in changed.items():
        assert [d[0] for d in differences(saved, TrainConfig(data="digits", **{key: value}))] == [key]
    for key, value in {"epochs": 20, "device": "cpu", "amp": False, "compile": True, "output": "x"}.items():
        assert differences(saved, TrainConfig(data="digits", **{key: value})) == []
    # batch_size is per process: it may change only with the global batch (batch_size x processes) kept
    from dcanets.engine.resume import check_batch

    check_batch(saved, 2, TrainConfig(data="digits", batch_size=2 * saved["batch_size"]), 1, "ckpt")
    with pytest.raises(ValueError, match="global batch of 128 .*now 64"):
        check_batch(saved, 1, TrainConfig(data="digits", batch_size=64), 1, "ckpt")
    old = {k: v for k, v in saved.items() if k != "label_smoothing"}  # a checkpoint of an older dcanets
    assert differences(old, TrainConfig(data="digits")) == []
    assert differences(old, TrainConfig(data="digits", label_smoothing=0.1)) == [("label_smoothing", 0.0, 0.1)]


# ------------------------------------------------------------------------------ 3: one run per folder
def test_a_fresh_run_into_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
    assert train([*RUN, "--epochs", "1", "--output", "W/A"], capsys)[0] == 0
    before = hashes(tmp_path / "W" / "A")
    code, _, err = train([*RUN, "--epochs", "1", "--seed", "3", "--output", "W/A"], capsys)
    assert code == 2 and err == [
        "dcanets train: error: output 'W/A' holds a finished run, epoch 1 of 1 (last.pt, metrics.json); a new run "
        "there would replace it: pass another output folder, or continue it with: dcanets train --resume W/A "
        "--epochs N"]
    assert hashes(tmp_path / "W" / "A") == before


def test_default_outputs_of_the_same_second_get_numbered_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    for _ in range(2):
        assert train([*RUN, "--epochs", "1"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "train").iterdir()) == [
        "cifar_resnet20-20260101-000000", "cifar_resnet20-20260101-000000-2"]


def wait_for(predicate, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"{what}: the run ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


SLOW_RUN = ["--data", "synthetic:256", "--batch-size", "64", "--no-progress"]  # ~2 s an epoch


@pytest.mark.slow
def test_two_runs_into_one_output_at_once_one_is_refused_the_other_intact(tmp_path, capsys):
    """The reproduction: both exited 0 and one result vanished. The second (started in this
    process once the first holds the folder) is refused in one line naming the first's pid; the
    first's files are the first's (its seed, all its epochs)."""
    out = tmp_path / "W" / "X"
    first = subprocess.Popen(command(*SLOW_RUN, "--epochs", "3", "--seed", "1", "--output", str(out)),
                             env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".dcanets.lock"
    wait_for(lambda: lock.is_file() and str(first.pid) in lock.read_text(), first, "the first run's lock")
    code, _, lines = train([*SLOW_RUN, "--epochs", "3", "--seed", "2", "--output", str(out)], capsys)
    assert first.poll() is None  # the two overlapped
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert code == 2
    assert len(lines) == 1 and re.fullmatch(
        rf"dcanets train: error: output '{re.escape(str(out))}' is in use by another run \(pid {first.pid} on host "
        r"\S+ \(.*dcanets.*\), since [-\d]+ [:\d]+\); wait for it to end, or pass another output folder",
        lines[0]), lines
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["seed"] == 1 and [h["epoch"] for h in record["history"]] == [1, 2, 3]
    assert torch.load(out / "last.pt", weights_only=True)["config"]["seed"] == 1


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_stale_and_resume_takes_over(tmp_path):
    """SIGKILL leaves the lock file (with the dead pid) behind; the kernel released the lock with
    the process, so --resume continues the run."""
    out = tmp_path / "run"
    proc = subprocess.Popen(command(*SLOW_RUN, "--epochs", "200", "--output", str(out)), env=env(tmp_path),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "last.pt").is_file(), proc, "the first checkpoint")
    proc.kill()
    proc.wait(timeout=60)
    assert str(proc.pid) in (out / ".dcanets.lock").read_text()
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    done = subprocess.run(command("--resume", str(out), "--epochs", str(epoch + 1), "--no-progress"),
                          env=env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metrics.json").read_text())["final"]["epoch"] == epoch + 1


# ------------------------------------------------------------------------------ 5: divergence
def test_a_diverged_run_exits_1_with_one_line(tmp_path, capsys):
    code, out, err = train([*RUN, "--epochs", "2", "--lr", "1e30", "--output", "W/D"], capsys)
    assert code == 1
    assert err[-1] == ("dcanets train: error: the run diverged at epoch 1: train_loss nan; lower --lr (it was 1e+30) "
                       "or add --warmup-epochs; its metrics.json and last.pt are in W/D")
    assert not any(line.startswith("dcanets train: saved") for line in err)
    assert json.loads(out)["diverged"] is True
    assert json.loads((tmp_path / "W" / "D" / "metrics.json").read_text())["final"]["diverged"] is True


# ------------------------------------------------------------------------------ 6: a full disk
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_valid(tmp_path, capsys):
    """What this simulates: the write of the next checkpoint gets ENOSPC from the kernel. Its
    temporary file ``last.pt.tmp`` is made a link to /dev/full, the device on which every write
    fails with ENOSPC: a real errno from a real write(2), no root and no patching. Not simulated:
    the other files of the disk failing at the same time."""
    assert train([*RUN, "--epochs", "1", "--output", "W/A"], capsys)[0] == 0
    before = hashes(tmp_path / "W" / "A", lock=False)
    (tmp_path / "W" / "A" / "last.pt.tmp").symlink_to("/dev/full")
    code, _, err = train(["--resume", "W/A", "--epochs", "2"], capsys)
    assert code == 2
    assert err[-1] == ("dcanets train: error: no space left on device writing 'W/A/last.pt' (it was not changed, and "
                       "no temporary file is left); free space on that disk; continue with: dcanets train --resume W/A")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "W" / "A" / "last.pt.tmp").is_symlink()  # the link to /dev/full removed too
    assert hashes(tmp_path / "W" / "A", lock=False) == before
    assert torch.load(tmp_path / "W" / "A" / "last.pt", weights_only=True)["epoch"] == 1  # still a valid checkpoint


# ------------------------------------------------------------------------------ 10: SIGINT from a background job
@pytest.mark.slow
def test_ctrl_c_works_when_the_caller_ignores_sigint(tmp_path):
    """A shell starts background jobs (`pytest ... &`) with SIGINT ignored, and children inherit
    that: the Ctrl-C test must give its child the default handler, or the child never sees it."""
    test = f"{Path(__file__).with_name('test_train_cli.py')}::test_ctrl_c_prints_the_resume_command_and_exits_130"
    code = ("import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "sys.exit(subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', "
            f"{test!r}]).returncode)")
    proc = subprocess.run([sys.executable, "-c", code], env=env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # this process is unaffected
