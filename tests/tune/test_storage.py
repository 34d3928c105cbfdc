"""``storage:`` / ``--storage``: a search kept in S3 (a real S3-compatible HTTP server: moto's
server mode in its own process) or in a shared folder, then resumed from there alone, with the
machine's search folder deleted; and storage that cannot be used, refused with one line before
Ray starts.

The server's credentials are set in the environment before the module's Ray starts: Ray workers
inherit the environment of the Ray that started them, as every node of a cluster needs its own
credentials. The tracking store lives outside the output folder, in the role of a tracking
server that both "machines" reach.
"""
from __future__ import annotations

import csv
import io
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
from servers import BUCKET, S3, s3_server
from tune_files import FIFO, free_port, runs_of, start_search, trial_of

from dcanets.tune.state import SearchState

EPOCHS = 20  # ~0.1 s each: the signal lands while the first trial still has most of its epochs to go


@pytest.fixture(scope="module", autouse=True)
def s3(tmp_path_factory):
    """moto's S3 server for the module, credentials in the environment before the module's Ray
    starts (autouse: set up before ``ray_local``)."""
    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def interrupt_at(proc: subprocess.Popen, text: str, lines: List[str], deadline_s: float = 300) -> str:
    """SIGINT to the search once a progress line holds ``text``; the id of that line's trial."""
    deadline = time.monotonic() + deadline_s
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            proc.send_signal(signal.SIGINT)
            return trial_of(line)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("search ended before it was interrupted:\n" + "".join(lines))


def stored_files(where: str, s3: S3) -> List[str]:
    """The files of a search kept in S3 or in a shared folder, relative to its folder there."""
    if where.startswith("s3://"):
        return s3.keys(where)
    return [str(p.relative_to(where)) for p in Path(where).rglob("*") if p.is_file()]


def read_stored(where: str, name: str, s3: S3) -> str:
    return s3.read(where, name) if where.startswith("s3://") else (Path(where) / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["s3", "shared-folder"])
def test_search_kept_in_storage_resumes_from_it_alone(kind, ray_local, s3, tmp_path, capsys, monkeypatch,
                                                      write_config):
    """The search is interrupted; everything --resume needs is in the storage; the machine's
    search folder is deleted; `--resume <storage>` (from another directory) finishes the search,
    continuing the cut trial from its checkpoint, into the same MLflow runs. S3 is set in the
    YAML; the shared folder by --storage, which overrides the YAML's (unusable) storage."""
    from dcanets.cli import main

    (tmp_path / "server").mkdir()
    mlflow_uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    cfg = write_config(tmp_path, scheduler=FIFO, train={"limit": 200, "epochs": EPOCHS},
                       storage=s3.uri("round") if kind == "s3" else "s3://no-such-bucket/x",
                       tune_config={"num_samples": 2, "max_concurrent_trials": 1}, tracking={"uri": mlflow_uri})
    extra = ["--storage", str(tmp_path / "shared")] if kind == "shared-folder" else []
    out, lines = tmp_path / "out", []
    proc = start_search(cfg, out, ray_local, tmp_path / "stderr.txt", extra=extra)
    cut_id = interrupt_at(proc, f"epoch 2/{EPOCHS}", lines)
    rest, _ = proc.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, "".join(lines) + rest + err
    (name,) = [p.name for p in out.glob("tiny-*")]
    where = s3.uri(f"round/{name}") if kind == "s3" else str(tmp_path / "shared" / name)
    assert err.strip().splitlines()[-1].endswith(f"dcanets tune --resume {shlex.quote(where)}"), err

    files = stored_files(where, s3)
    for stored in ("tuner.pkl", "search.json", "config.yaml", "best.yaml", "trials.csv", "curves.png"):
        assert stored in files, sorted(files)
    assert any(f.startswith(f"trial_{cut_id}_") and "/checkpoint_" in f and f.endswith("/last.pt") for f in files)
    assert not (out / name / "tuner.pkl").exists()  # Ray's state is in the storage only
    cut = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(read_stored(where, "trials.csv", s3)))}[cut_id]
    assert cut["status"] == "INTERRUPTED" and 2 <= int(cut["epochs"]) < EPOCHS, cut
    assert f"copied to the storage {where};" in rest
    assert resumed_location(monkeypatch, str(out / name)) == where  # the search folder resumes from the storage

    shutil.rmtree(out)  # "another machine": only the storage and the tracking server are left
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv, local = ["--resume", where], Path(where)
    if kind == "s3":  # this machine names the endpoint by the standard variable; the workers do not have it
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
        argv = ["--resume", f"s3://{BUCKET}/round/{name}", "--output", str(tmp_path / "elsewhere" / "searches")]
        local = tmp_path / "elsewhere" / "searches" / name
    capsys.readouterr()
    assert main(["tune", *argv]) == 0
    text = capsys.readouterr().out
    assert "tiny: 2 trials" in text and "status FINISHED" in text, text

    (progress,) = [f for f in stored_files(where, s3)
                   if f.startswith(f"trial_{cut_id}_") and f.endswith("/progress.csv")]
    epochs = [int(line.split(",")[0]) for line in read_stored(where, progress, s3).splitlines()[1:]]
    assert epochs.count(1) == 1 and epochs[-1] == EPOCHS, epochs  # continued from its checkpoint
    trials = {r["trial_id"]: r["status"] for r in csv.DictReader(io.StringIO(read_stored(where, "trials.csv", s3)))}
    assert set(trials.values()) == {"TERMINATED"} and cut_id in trials and len(trials) == 2
    assert (local / "best.yaml").read_text() == read_stored(where, "best.yaml", s3)
    _, parents, children = runs_of(mlflow_uri)
    assert [p.info.status for p in parents] == ["FINISHED"] and parents[0].data.tags["ray_results"] == where
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials)
    assert {c.info.status for c in children} == {"FINISHED"}


class _Resolved(Exception):
    pass


def resumed_location(monkeypatch, where: str) -> str:
    """Where `dcanets tune --resume WHERE` finds Ray's state (the search itself is not run)."""
    from dcanets.cli import main
    from dcanets.tune import search

    found = []

    def resolve_only(spec, state, **kwargs):
        found.append(state.location.uri)
        raise _Resolved

    with monkeypatch.context() as m:
        m.setattr(search, "run_search", resolve_only)
        with pytest.raises(_Resolved):
            main(["tune", "--resume", where])
    return found[0]


def _unusable(kind: str, s3: S3) -> str:
    if kind == "missing-bucket":
        return f"s3://no-such-bucket/tune?endpoint_override={s3.endpoint}"
    return f"s3://{BUCKET}/unreachable?endpoint_override=http://127.0.0.1:{free_port()}"  # nothing listens


@pytest.mark.parametrize("kind, what", [
    ("missing-bucket", ["cannot write there (", "Bucket 'no-such-bucket' not found"]),
    pytest.param("unreachable", ["cannot read there (", "Could not connect"],
                 marks=pytest.mark.slow),  # pyarrow retries for ~6 s
])
def test_unusable_storage_stops_before_ray_with_one_line(kind, what, s3, tmp_path, capfd, write_config):
    from dcanets.cli import main

    storage = _unusable(kind, s3)
    cfg = write_config(tmp_path, storage=storage, tracking={"enabled": False})
    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 2
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcanets tune: error: storage s3://"), err
    assert all(part in lines[0] for part in what), err
    assert not list((tmp_path / "out").glob("tiny-*"))  # nothing started, nothing left
    assert not s3.keys(s3.uri("unreachable"))


def test_resume_from_a_uri_that_holds_no_search_is_one_line(s3, tmp_path, capfd):
    from dcanets.cli import main

    assert main(["tune", "--resume", s3.uri("nothing-here/tiny-20260101-000000"),
                 "--output", str(tmp_path / "out")]) == 2
    _, err = capfd.readouterr()
    assert err.startswith("dcanets tune: error: --resume s3://") and "not a dcanets tune search" in err, err
    assert len(err.strip().splitlines()) == 1


def test_endpoint_from_aws_endpoint_url_s3(s3, tmp_path, monkeypatch, write_config):
    """The endpoint may come from the standard variable instead of the URI; it is part of the
    filesystem handed to Ray, which pickles it to the workers."""
    import pickle

    from dcanets.tune import schema
    from dcanets.tune.search import create_search_dir

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    spec = schema.load(write_config(tmp_path, storage=f"s3://{BUCKET}/by-env", tracking={"enabled": False}))
    state = create_search_dir(spec, tmp_path / "out")
    exp_dir = state.folder
    where = f"s3://{BUCKET}/by-env/{exp_dir.name}"
    assert sorted(s3.keys(where)) == ["config.yaml", "search.json"]
    fs = pickle.loads(pickle.dumps(state.location.ray_filesystem))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with fs.open_input_stream(f"{BUCKET}/by-env/{exp_dir.name}/config.yaml") as f:
        assert f.read() == spec.path.read_bytes()


def test_relative_storage_paths(tmp_path, monkeypatch, write_config):
    """In the YAML against the YAML's folder (like the data paths), on the command line against
    the current directory (like --output)."""
    from dcanets.cli.tune import _storage_flag
    from dcanets.tune import schema

    assert schema.load(write_config(tmp_path, storage="shared/tune")).storage == str(tmp_path / "shared" / "tune")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert _storage_flag("shared") == str(tmp_path / "cwd" / "shared")
    assert _storage_flag("s3://bucket/x?endpoint_override=http://h:9000") == "s3://bucket/x?endpoint_override=http://h:9000"


def test_search_json_is_copied_as_trials_start_and_end(tmp_path, write_config):
    """StateCopies, a Tune callback after the MLflow tracker: the run ids reach the storage while
    the search runs, for a resume after the driver died."""
    from dcanets.tune import schema
    from dcanets.tune.callbacks import StateCopies
    from dcanets.tune.search import create_search_dir

    shared = tmp_path / "shared"
    state = create_search_dir(schema.load(write_config(tmp_path, storage=str(shared), tracking={"enabled": False})),
                              tmp_path / "out")
    copies = StateCopies()
    copies.bind(state)
    for hook, ids in ((copies.on_trial_start, ["a"]), (copies.on_trial_error, ["a", "b"])):
        for trial_id in ids:
            if trial_id not in state.trials:
                state.add_trial(trial_id, f"run-{trial_id}")
        hook(0, [], None)
        stored = SearchState.load(shared / state.folder.name)
        assert {k: v.run_id for k, v in stored.trials.items()} == {i: f"run-{i}" for i in ids}
