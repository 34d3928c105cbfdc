"""``dcanets tune`` never reports a failure as a success and never leaves a run or a process
behind (issue 24): a diverged trial is marked as such and the search goes on; a full disk ends
the runs KILLED with the resume command; two searches create one SQLite store safely; a signal
while Ray starts is handled as during the search, with no Ray process left; a search whose
trials had all ended when a signal came is FINISHED; the Ray token file is kept private.

The real searches join the module's local Ray (``ray_local``), except the one that must start
its own Ray to be interrupted while it does.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import pytest
from tune_files import FIFO, runs_of, start_search, trial_of

from dcanets.tune.state import DIVERGED, TRIALS, TrialResult, session_status, trial_status


def rows(exp_dir: Path) -> dict:
    with (exp_dir / "trials.csv").open() as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------ 5: a diverged trial
@pytest.mark.slow
def test_a_diverged_trial_is_marked_and_the_search_goes_on(ray_local, tmp_path, capfd, write_config):
    from dcanets.cli import main

    cfg = write_config(tmp_path, scheduler=FIFO, space={"lr": {"type": "choice", "values": [1e30, 0.05]}},
                       search_alg={"points_to_evaluate": [{"lr": 1e30}, {"lr": 0.05}]},
                       tune_config={"num_samples": 2, "max_concurrent_trials": 1})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 0  # one trial ended well
    out, err = capfd.readouterr()
    (exp_dir,) = (tmp_path / "out").glob("tiny-*")
    table = rows(exp_dir)
    (bad,) = [t for t, r in table.items() if float(r["lr"]) == 1e30]
    (good,) = [t for t, r in table.items() if float(r["lr"]) == 0.05]
    assert table[bad]["status"] == DIVERGED and table[bad]["epochs"] == "1"  # stopped after its NaN epoch
    assert table[good]["status"] == "TERMINATED" and table[good]["epochs"] == "2"  # the search went on
    assert f"[{bad}] DIVERGED (diverged at epoch 1: train_loss nan)" in out
    assert re.search(rf"^{bad}\s+DIVERGED\s+1 ", out, re.M), out  # kept in the table
    assert "status FINISHED" in out
    assert "best trial " + good in (exp_dir / "best.yaml").read_text()  # never ranked
    assert (f"dcanets tune: warning: 1 of 2 trial(s) diverged (trial {bad} diverged at epoch 1: train_loss nan); "
            "they are kept in trials.csv as DIVERGED, never ranked") in err.splitlines()
    _, parents, children = runs_of(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FINISHED"] and parents[0].data.tags["best_trial"] == good
    runs = {c.data.tags["trial_id"]: c for c in children}
    assert runs[bad].info.status == "FAILED" and runs[good].info.status == "FINISHED"
    assert runs[bad].data.tags["diverged"] == "true"
    assert runs[bad].data.tags["failure_reason"] == "diverged at epoch 1: train_loss nan"
    assert "diverged" not in runs[good].data.tags


def test_statuses_of_trials_and_sessions():
    nan = float("nan")
    assert trial_status("TERMINATED", True, [{"train_loss": 1.0}, {"train_loss": nan}]) == DIVERGED
    assert trial_status("TERMINATED", False, [{"train_loss": nan}]) == "INTERRUPTED"  # cut first, then judged
    assert trial_status("TERMINATED", True, [{"train_loss": 1.0}]) == "TERMINATED"
    assert trial_status("ERROR", True, []) == "ERROR"

    def trials(*statuses: str) -> List[TrialResult]:
        return [TrialResult(str(i), s, {}, ()) for i, s in enumerate(statuses)]

    assert session_status(trials("TERMINATED", DIVERGED), True, 2) == "FINISHED"  # the signal came after the end
    assert session_status(trials("TERMINATED"), True, 2) == "KILLED"  # ... before every sample was tried
    assert session_status(trials("TERMINATED", "INTERRUPTED"), True, 2) == "KILLED"
    assert session_status(trials(DIVERGED, "ERROR"), False, 2) == "FAILED"  # nothing ended well
    assert session_status(trials("TERMINATED"), False, 2) == "FINISHED"  # e.g. its time budget ran out


# ------------------------------------------------------------------------------ 6: a full disk
@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_ends_the_runs_killed_and_the_search_resumes(ray_local, tmp_path, capsys, write_config):
    """What this simulates: writing the search's state gets ENOSPC from the kernel while both trials
    run. The temporary files of both trials' records (``search-trials/<id>.json.tmp``) are made
    links to /dev/full (every write to one fails with ENOSPC; no root, no patching) once both
    trials have reported; the next write is the tracker's, when the first trial ends. Not
    simulated: Ray's and MLflow's own files failing too (a disk that is really full), which no
    test here can do without root."""
    from dcanets.cli import main

    cfg = write_config(tmp_path, scheduler=FIFO, train={"epochs": 20},
                       tune_config={"num_samples": 2, "max_concurrent_trials": 2})
    out = tmp_path / "out"
    proc = start_search(cfg, out, ray_local, tmp_path / "stderr.txt")
    lines: List[str] = []
    started = set()
    for line in proc.stdout:  # both trials past their second epoch
        lines.append(line)
        if "epoch 2/20" in line:
            started.add(trial_of(line))
        if len(started) == 2:
            break
    assert len(started) == 2, "".join(lines)
    (exp_dir,) = out.glob("tiny-*")
    links = [exp_dir / TRIALS / f"{trial_id}.json.tmp" for trial_id in sorted(started)]
    for link in links:
        link.symlink_to("/dev/full")
    rest, _ = proc.communicate(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 2, "".join(lines) + rest + err
    assert err.strip().splitlines()[-1] in [
        f"dcanets tune: error: no space left on device writing '{link.with_suffix('')}' (it was not changed, and "
        f"no temporary file is left); free space on that disk; then continue with  dcanets tune --resume {exp_dir}"
        for link in links], err
    assert "Traceback" not in err
    left = [link for link in links if link.is_symlink()]  # the failed write removed its own
    assert len(left) <= 1 and set(exp_dir.rglob("*.tmp")) == set(left)
    for link in left:  # space again
        link.unlink()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]  # the one that ended, the one cut

    assert main(["tune", "--resume", str(exp_dir)]) == 0  # space again: the search finishes from what it kept
    assert "status FINISHED" in capsys.readouterr().out
    _, parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["FINISHED"] and {c.info.status for c in children} == {"FINISHED"}
    assert {r["status"] for r in rows(exp_dir).values()} == {"TERMINATED"} and len(rows(exp_dir)) == 2


# ------------------------------------------------------------------------------ 7: a new SQLite store, twice at once
RACE = """
import sys, time
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
from dcanets.tune.tracking import open_store
open_store(sys.argv[1])
print("ok")
"""


@pytest.mark.slow
def test_two_searches_create_one_sqlite_store_at_once(tmp_path):
    """Both searches on a fresh --output open (create) the store while Ray starts: the same
    ``open_store`` in two processes released at the same moment. Without the lock one of them
    failed ("table tags already exists", "Circular dependency detected")."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for _ in range(2)]
    time.sleep(5)  # both have imported Python and wait for the go
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [r[0].strip() for r in results] == ["ok", "ok"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("after")  # a complete schema
    assert [e.name for e in client.search_experiments()] == ["after", "Default"]


# ------------------------------------------------------------------------------ 8: a signal while Ray starts
def ray_processes(marker: str) -> List[str]:
    """Command lines of the processes whose command line holds ``marker`` (a Ray temp folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


@pytest.mark.slow
def test_sigterm_while_ray_starts_is_handled_and_leaves_no_process(tmp_path, write_config):
    """The reproduction: SIGTERM in the seconds `ray.init` takes aborted the driver (exit 134, a
    C++ stack), printed no resume line and left Ray's agents running. Now: exit 130, the line of
    a search interrupted before its trials, and no process of that Ray left. The search starts its
    own Ray in a temp folder of its own (RAY_TMPDIR), whose path is in every command line of that
    Ray's processes. It runs with a fresh HOME, where it creates Ray's token file: mode 0600."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "HOME": str(home), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "DCANETS_CACHE": str(tmp_path / "cache")}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    cfg = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "dcanets", "tune", str(cfg), "--output", str(tmp_path / "out"),
                             "--num-cpus", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(ray_tmp.glob("ray/session_*")):  # Ray is starting its processes
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "Ray did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        left = ray_processes(str(ray_tmp))
        deadline = time.monotonic() + 15  # the raylet's agents notice its end within a second or two
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = ray_processes(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert left == []
    assert proc.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == ("dcanets tune: interrupted (SIGTERM received) before any trial started; "
                                            "nothing to resume"), err
    assert "Traceback" not in err and "SIGTERM received, terminating" not in err and "*** " not in err, err
    assert not list((tmp_path / "out").glob("tiny-*"))  # nothing to resume, nothing left
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and re.fullmatch(r"[0-9a-f]{64}", token.read_text())


# ------------------------------------------------------------------------------ 10: signals after the end, the token
@pytest.mark.slow
def test_a_signal_after_every_trial_ended_leaves_the_search_finished(ray_local, tmp_path, write_config):
    cfg = write_config(tmp_path, scheduler=FIFO, tune_config={"num_samples": 1, "max_concurrent_trials": 1})
    out = tmp_path / "out"
    proc = start_search(cfg, out, ray_local, tmp_path / "stderr.txt")
    lines: List[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip().endswith("] done"):  # the only trial has ended
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, "".join(lines) + rest + err
    assert "status FINISHED" in rest and "dcanets tune: interrupted" not in err, rest + err
    _, parents, children = runs_of(f"sqlite:///{out / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FINISHED"] and [c.info.status for c in children] == ["FINISHED"]


def test_the_token_file_dcanets_creates_is_private_and_an_exposed_one_is_named(tmp_path, monkeypatch):
    from dcanets.tune import raytoken

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    assert raytoken.create_private_token() == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert raytoken.exposure() is None
    kept = token.read_text()
    assert raytoken.create_private_token() is None and token.read_text() == kept  # never replaced
    token.chmod(0o644)  # as Ray itself creates it
    assert raytoken.exposure() == (f"the Ray token file {token} is readable by other users (mode 0644): whoever "
                                   f"reads it can run code on your Ray cluster; chmod 600 {token}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)  # the token in the environment: no file is read or made
    assert raytoken.exposure() is None and raytoken.token_path() is None
