"""timm's spellings of the same settings (``dcanets/cli/flags.py``), and commands that answer
``--help`` or a mistyped flag without importing torch."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcanets.cli import build_parser
from dcanets.cli.flags import TIMM_ALIASES
from dcanets.cli.train import config_from_args
from dcanets.engine.config import TrainConfig


def _config(argv):
    return config_from_args(build_parser(argv).parse_args(argv)).to_dict()


@pytest.mark.parametrize("timm_argv, ours", [
    (["--model-kwargs", "drop_rate=0.1", "shortcut_alpha=-1"], ["--model-kwargs", "drop_rate=0.1,shortcut_alpha=-1"]),
    (["--opt-kwargs", "rho=0.01", "lam=20", "--lr", "0.05"],
     ["--opt-kwargs", '{"rho": 0.01, "lam": 20}', "--lr", "0.05"]),
    (["--opt-kwargs", "eps=1e-8", "betas=(0.9, 0.99)"], ["--opt-kwargs", "eps=1.0e-8,betas=[0.9, 0.99]"]),
    (["--smoothing", "0.1"], ["--label-smoothing", "0.1"]),
    (["-b", "64"], ["--batch-size", "64"]),
    (["--data-dir", "synthetic:64"], ["--data", "synthetic:64"]),
    (["--no-aug"], ["--no-augment"]),
    (["--sched", "multistep", "--decay-milestones", "2", "4", "--epochs", "6"],
     ["--sched", "multistep", "--decay-milestones", "2,4", "--epochs", "6"]),
    (["--warmup-epochs", "1", "--sched", "cosine"], ["--warmup-epochs=1", "--sched=cosine"]),
])
def test_timms_spellings_give_the_same_config(timm_argv, ours):
    got = _config(["train", *timm_argv, "--output", "x"])
    assert got == _config(["train", *ours, "--output", "x"])
    assert got != _config(["train", "--output", "x"])                 # the flag did something


def test_every_alias_names_an_existing_field_and_no_other_flag():
    """The table is data: an entry is all a field needs, and no alias hides another field's flag."""
    fields = set(TrainConfig.model_fields)
    own = {"--" + f.replace("_", "-") for f in fields}
    for field, aliases in TIMM_ALIASES.items():
        assert field in fields, field                                   # (skipped if not, but none is stale)
        assert not set(aliases) & own, aliases


def _run_command(argv):
    """``dcanets ARGV`` in a fresh interpreter; (status, stderr, seconds, heavy modules it imported)."""
    code = ("import atexit, sys\n"
            f"sys.argv = ['dcanets', *{argv!r}]\n"
            "atexit.register(lambda: print('IMPORTED', sorted(m for m in ('torch', 'timm', 'ray', 'mlflow', 'optuna')"
            " if m in sys.modules), file=sys.stderr))\n"
            "from dcanets.cli import main\n"
            "sys.exit(main())\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - t0
    heavy = next(line for line in proc.stderr.splitlines() if line.startswith("IMPORTED"))
    return proc.returncode, proc.stderr, seconds, heavy


@pytest.mark.parametrize("argv, status, says", [
    (["train", "--help"], 0, ""),
    (["tune", "--help"], 0, ""),
    (["train", "--smothing", "0.1"], 2, "did you mean: --smoothing"),
    (["train", "--lr", "abc"], 2, "lr: must be a number, got 'abc'"),
    (["timm-train", "--help"], 0, ""),
])
def test_help_and_argument_errors_answer_without_importing_torch(argv, status, says):
    """The 2-second promise rests on this: nothing heavy is imported. (The time bound itself is
    generous: the test machine is shared.)"""
    code, err, seconds, heavy = _run_command(argv)
    assert code == status and says in err
    assert heavy == "IMPORTED []", heavy
    assert seconds < 20


def test_tune_says_what_it_does_at_once(tmp_path):
    """A search's first line comes before torch, timm and Ray are imported (they take 10-60 s on
    a loaded 2-core machine); then the search is interrupted before any trial, leaving nothing."""
    import signal

    cfg = Path(__file__).resolve().parents[2] / "tune_configs" / "quickstart.yaml"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dcanets", "tune", str(cfg), "--output", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        first = proc.stdout.readline()
        seconds = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
    assert first.startswith(f"dcanets tune: {cfg}: checking the search file, then a local Ray"), first
    assert seconds < 15, f"first line after {seconds:.1f} s"
    assert not list(tmp_path.glob("quickstart-*"))
