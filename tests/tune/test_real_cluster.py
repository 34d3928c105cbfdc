"""``dcanets tune --address`` against a real Ray cluster: ``ray start`` head and worker processes.

``test_cluster.py`` runs the search in-process on ``ray.cluster_utils.Cluster``; here every piece
is what a user runs on real machines, as separate processes: the token made by
``ray get-auth-token --generate``, ``ray start --head``, ``ray start --address``, and the
``dcanets tune CONFIG --address HEAD:PORT`` command, with token authentication on throughout. The
commands of docs/tuning.md "Running on a cluster" are these, host names aside. Both nodes offer
one CPU and each trial asks for one, so two concurrent trials can only run on two nodes.

Where the search keeps its MLflow runs and its checkpoints is one fixture, ``stores``: a cluster
needs the storage reachable from every node (each trial writes its checkpoints from its own) and
the MLflow store from the driver (the only writer). Both are real servers started by this module,
as they would be on real machines: an ``mlflow server`` (``tracking: {uri: http://...}``) and an
S3-compatible server (moto, ``storage: s3://...?endpoint_override=...``) whose credentials every
node has in its environment (``servers.py``).

The cluster is stopped by the sessions of its own processes (``ray_nodes``), never by ``ray
stop``, which would kill every Ray on the machine; the fixture checks that none survives.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest
import yaml
from ray_nodes import RayCluster
from servers import S3, MlflowServer, mlflow_server, s3_server
from tune_files import trial_of

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cluster helper reads /proc")]

DRIVER_TIMEOUT_S = 300  # a search that hangs (e.g. waiting for a node that never comes) fails instead
LOST = ("ActorDiedError", "ActorUnavailableError", "RayActorError")  # how Ray reports a lost node's actor


def search_yaml(folder: Path, *, tracking: Dict[str, Any], storage: Optional[str], epochs: int = 2,
                limit: int = 200, **sections: Any) -> Path:
    """The tiny search every test runs; ``tracking`` and ``storage`` (the ``stores`` fixture) are
    where its runs and checkpoints go. FIFO, so every trial runs every epoch; no actor reuse and
    two trials at once, so that each starts at once on its own node."""
    doc: Dict[str, Any] = {
        "name": "cluster",
        "train": {"data": "digits", "limit": limit, "epochs": epochs, "batch_size": 64, "model": "cifar_resnet20",
                  "seed": 0},
        "space": {"lr": {"type": "loguniform", "low": 0.01, "high": 0.1}},
        "scheduler": {"type": "FIFOScheduler"},
        "tune_config": {"num_samples": 2, "max_concurrent_trials": 2, "reuse_actors": False},
        "resources": {"cpu": 1},
        "tracking": tracking,
        **sections,
    }
    if storage is not None:
        doc["storage"] = storage
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module", autouse=True)
def s3(tmp_path_factory) -> Iterator[S3]:
    """The S3 server, its credentials set before any node starts (autouse, module scope: before
    the function-scoped ``cluster``), as each machine of a real cluster has its own."""
    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def stores(tmp_path: Path, s3: S3, tracking_server: MlflowServer) -> Dict[str, Any]:
    """Where the search keeps its MLflow runs (``tracking``: the server, written by the driver
    alone) and its trial checkpoints and Tune state (``storage``: the bucket, written from every
    node); one experiment and one prefix per test."""
    return {"tracking": {"uri": tracking_server.url, "experiment": f"cluster-{tmp_path.name}"},
            "storage": s3.uri(f"cluster/{tmp_path.name}")}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """A head and one worker, 1 CPU each, started with ``ray start``; stopped afterwards, checking
    that no process of either node survives (by session id: other Rays on the machine are left alone)."""
    ray_cluster = RayCluster(tmp_path / "ray-logs")
    try:
        ray_cluster.start_head(num_cpus=1)
        ray_cluster.add_worker(num_cpus=1)
        yield ray_cluster
    finally:
        survivors = ray_cluster.stop()
        assert not survivors, f"processes of the test cluster still alive after stop: {survivors}"


class Search(NamedTuple):
    returncode: int
    lines: List[str]  # stdout: the progress lines, the table, the outputs line
    stderr: str
    exp_dir: Path


def run_search(cluster: RayCluster, cfg: Path, out: Path, on_line: Callable[[str], None] = lambda line: None
               ) -> Search:
    """``dcanets tune CFG --address HEAD --output OUT`` as a subprocess with the cluster's token
    settings; ``on_line`` sees each stdout line as it comes (to act mid-search). The driver runs
    in a session of its own, killed whole if it outlives ``DRIVER_TIMEOUT_S`` or the test."""
    err = out.parent / "driver.stderr"
    out.mkdir(parents=True, exist_ok=True)
    with err.open("w") as err_file:  # a file, not a pipe: Ray's logs would fill a pipe nobody reads
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcanets", "tune", str(cfg), "--address", cluster.address, "--output", str(out)],
            stdout=subprocess.PIPE, stderr=err_file, text=True, start_new_session=True,
            env={**cluster.env, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(DRIVER_TIMEOUT_S, _kill_session, (proc,))
    watchdog.start()
    lines: List[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            on_line(line)
        proc.wait()
    finally:
        watchdog.cancel()
        _kill_session(proc)
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("cluster-")]
    assert proc.returncode != -signal.SIGKILL, f"dcanets tune hung past {DRIVER_TIMEOUT_S}s: {lines[-20:]}"
    assert len(folders) == 1, f"search folders under {out}: {folders}; stderr: {err.read_text()[-3000:]}"
    return Search(proc.returncode, lines, err.read_text(), folders[0])


def _kill_session(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def read_trials(exp_dir: Path) -> List[Dict[str, str]]:
    with (exp_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def check_mlflow(exp_dir: Path, trials: List[Dict[str, str]], steps: Optional[Dict[str, List[int]]] = None) -> None:
    """The store the search used (search.json's URI) holds one child run per trial of trials.csv,
    FINISHED for a completed trial and FAILED for a failed one, with val_acc logged at the epochs
    ``steps`` gives (default: once at each epoch of trials.csv), under a FINISHED parent; nothing
    is left RUNNING."""
    from mlflow.tracking import MlflowClient

    state = json.loads((exp_dir / "search.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([state["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    logged = {r.data.tags["trial_id"]: (r.info.status, sorted(m.step for m in client.get_metric_history(
        r.info.run_id, "val_acc"))) for r in children}
    status = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}
    steps = {t["trial_id"]: list(range(1, int(t["epochs"]) + 1)) for t in trials} | (steps or {})
    assert len(children) == len(trials)
    assert logged == {t["trial_id"]: (status[t["status"]], steps[t["trial_id"]]) for t in trials}
    assert not client.search_runs([state["experiment_id"]], filter_string="attributes.status = 'RUNNING'")


def test_trials_run_on_both_ray_start_nodes(cluster: RayCluster, stores: Dict[str, Any], s3: S3,
                                            tmp_path: Path) -> None:
    head, worker = cluster.nodes
    cfg = search_yaml(tmp_path, **stores)
    search = run_search(cluster, cfg, tmp_path / "out")

    assert search.returncode == 0, search.stderr[-3000:]
    trials = read_trials(search.exp_dir)
    assert [(t["status"], t["epochs"]) for t in trials] == [("TERMINATED", "2"), ("TERMINATED", "2")]
    placed = {t["node_id"] for t in trials}
    assert placed == {head.node_id(), worker.node_id()}, f"trials on {placed}"
    check_mlflow(search.exp_dir, trials)
    assert json.loads((search.exp_dir / "search.json").read_text())["tracking_uri"] == stores["tracking"]["uri"]
    stored = s3.keys(f"{stores['storage'].split('?')[0]}/{search.exp_dir.name}")
    for name in ("best.yaml", "trials.csv", "curves.png", "tuner.pkl"):
        assert name in stored, stored
    for t in trials:  # each trial's checkpoints, written from its own node, are in the bucket
        assert any(t["trial_id"] in k and k.endswith("last.pt") for k in stored), (t["trial_id"], stored)


# The worker node dies once a trial on it has reported epoch 2, with 3 epochs to go. Not after epoch
# 1: Tune registers a reported checkpoint in a second round trip (its `save` task) and starts the
# next epoch only after it, so a report of epoch 2 proves the epoch-1 checkpoint registered; the
# epoch-2 one may or may not be when the node dies, and the retry starts from whichever is.
EPOCHS, KILL_AFTER = 5, 2


def kill_worker_mid_trial(cluster: RayCluster, tmp_path: Path, stores: Dict[str, Any], **sections: Any
                          ) -> Tuple[Search, str]:
    """Run the search and kill the worker node (its raylet first, then every process of it: a
    machine that goes away) as soon as a trial on it reports epoch ``KILL_AFTER``; the search and
    the id of that trial."""
    worker = cluster.nodes[1]
    worker_id = worker.node_id()
    cfg = search_yaml(tmp_path, **stores, epochs=EPOCHS, limit=1797, **sections)
    killed: List[str] = []

    def on_line(line: str) -> None:
        if not killed and f" epoch {KILL_AFTER}/" in line and f"node={worker_id[:8]}" in line:
            worker.kill()
            killed.append(trial_of(line))

    search = run_search(cluster, cfg, tmp_path / "out", on_line)
    assert killed, f"no trial reported epoch {KILL_AFTER} from the worker node: {search.lines}"
    assert not worker.pids(), "the worker node's processes outlived the kill"
    assert cluster.nodes[0].pids(), "the head went down with the worker"
    return search, killed[0]


def lines_of(search: Search, trial_id: str) -> List[str]:
    return [line for line in search.lines if f"[{trial_id}]" in line]


def epochs_on(lines: List[str], node_id: str) -> List[int]:
    """The epochs the progress lines show reported from ``node_id``, in order."""
    return [int(m.group(1)) for line in lines if f"node={node_id[:8]}" in line
            for m in [re.search(r"\] epoch (\d+)/", line)] if m]


def test_worker_node_dies_mid_trial_and_the_trial_resumes_on_the_head(
        cluster: RayCluster, stores: Dict[str, Any], tmp_path: Path) -> None:
    """With ``failure_config: {max_failures: 1}`` Tune retries the lost trial on the head from its
    last registered epoch checkpoint: status 0, both trials complete every epoch, and MLflow has
    each epoch reported, on the lost node then on the head, in the trial's one run."""
    head_id, worker_id = (node.node_id() for node in cluster.nodes)
    search, lost = kill_worker_mid_trial(cluster, tmp_path, stores, failure_config={"max_failures": 1})
    assert search.returncode == 0, search.stderr[-3000:]

    own = lines_of(search, lost)
    retry = [line for line in own if " failed (" in line]
    assert len(retry) == 1, own
    match = re.search(rf"failed \((\w+) on node {worker_id[:8]}\): retry 1 of 1, from its epoch (\d+) checkpoint",
                      retry[0])
    assert match and match.group(1) in LOST, retry[0]
    resumed = int(match.group(2))
    on_worker = epochs_on(own[:own.index(retry[0])], worker_id)
    on_head = epochs_on(own[own.index(retry[0]) + 1:], head_id)
    assert on_worker == list(range(1, on_worker[-1] + 1)) and KILL_AFTER - 1 <= resumed <= on_worker[-1], own
    assert on_head == list(range(resumed + 1, EPOCHS + 1)), own  # continued from the checkpoint
    assert len(on_worker) + len(on_head) == len(epochs_on(own, worker_id) + epochs_on(own, head_id)), own
    assert "warning" not in search.stderr

    trials = read_trials(search.exp_dir)
    assert [(t["status"], t["epochs"]) for t in trials] == [("TERMINATED", str(EPOCHS))] * 2
    assert [t["node_id"] for t in trials if t["trial_id"] == lost] == [head_id]  # where it ended
    check_mlflow(search.exp_dir, trials, steps={lost: sorted(on_worker + on_head)})
    print(f"trial {lost}: epochs {on_worker} on the worker, killed; retried from the epoch-{resumed} "
          f"checkpoint: epochs {on_head} on the head")


def test_worker_node_dies_mid_trial_without_retries(
        cluster: RayCluster, stores: Dict[str, Any], tmp_path: Path) -> None:
    """Ray's default, ``max_failures: 0``: the lost trial ends ERROR (its run FAILED, with the epochs
    it reported), the other trial completes, and the search ends with status 0 and one warning
    line that names the failure and the setting that retries it; nothing RUNNING."""
    worker_id = cluster.nodes[1].node_id()
    search, lost = kill_worker_mid_trial(cluster, tmp_path, stores)
    assert search.returncode == 0, search.stderr[-3000:]

    failed = [line for line in lines_of(search, lost) if " FAILED (" in line]
    assert len(failed) == 1 and re.search(rf"FAILED \((\w+) on node {worker_id[:8]}\): see .*error.txt", failed[0])
    warning = [line for line in search.stderr.splitlines() if line.startswith("dcanets tune: warning:")]
    assert len(warning) == 1, search.stderr[-3000:]
    first = re.search(r"1 of 2 trial\(s\) failed; first error: (\w+): ", warning[0])
    assert first and first.group(1) in LOST, warning[0]
    assert warning[0].endswith("failure_config: {max_failures: N} retries a failed trial from its last checkpoint")

    trials = {t["trial_id"]: t for t in read_trials(search.exp_dir)}
    assert trials[lost]["status"] == "ERROR" and KILL_AFTER <= int(trials[lost]["epochs"]) < EPOCHS
    assert [(t["status"], t["epochs"]) for i, t in trials.items() if i != lost] == [("TERMINATED", str(EPOCHS))]
    check_mlflow(search.exp_dir, list(trials.values()))
    print(f"trial {lost}: ERROR after {trials[lost]['epochs']} epoch(s) on the lost worker; {failed[0].strip()}; "
          f"{warning[0]}")


# ------------------------------------------------------------------------------------------ gangs
# resources: {workers: 2, cpu: 1} on two nodes of 1 CPU: each trial is a Ray Train gang of 2 DDP
# ranks, which only fits with one worker on each node, and only one gang fits at a time: the
# second trial's gang waits for the first (its driver holds no CPU: dcanets.tune.gang).
GANG = {"resources": {"workers": 2, "cpu": 1}}


def gang_runs(exp_dir: Path) -> List[Any]:
    from mlflow.tracking import MlflowClient

    state = json.loads((exp_dir / "search.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")


def test_a_gang_trial_spans_both_nodes_and_gangs_queue(cluster: RayCluster, stores: Dict[str, Any], s3: S3,
                                                      tmp_path: Path) -> None:
    head, worker = cluster.nodes
    cfg = search_yaml(tmp_path, **stores, **GANG)
    search = run_search(cluster, cfg, tmp_path / "out")

    assert search.returncode == 0, search.stderr[-3000:]
    trials = read_trials(search.exp_dir)
    assert [(t["status"], t["epochs"]) for t in trials] == [("TERMINATED", "2"), ("TERMINATED", "2")]
    check_mlflow(search.exp_dir, trials)
    both = ",".join(sorted([head.node_id(), worker.node_id()]))
    assert {(r.data.tags["world_size"], r.data.tags["nodes"]) for r in gang_runs(search.exp_dir)} == {("2", both)}
    # one gang at a time: the second trial's first epoch comes after the first trial is done
    done = [i for i, line in enumerate(search.lines) if line.endswith("] done")]
    starts = {trial_of(line): i for i, line in reversed(list(enumerate(search.lines))) if "] epoch 1/" in line}
    assert len(done) == 2 and sorted(starts.values())[1] > done[0], search.lines
    stored = s3.keys(f"{stores['storage'].split('?')[0]}/{search.exp_dir.name}")
    for t in trials:  # rank 0's last.pt, kept by Ray Train in the search's storage
        assert any(k.startswith(f"gangs/{t['trial_id']}/checkpoint_") and k.endswith("last.pt") for k in stored), stored


def train_workers(node: Any) -> List[int]:
    """The Ray Train worker processes of a node (Ray titles them ``ray::RayTrainWorker...``)."""
    return [pid for pid in node.pids() if _cmdline_of(pid).startswith("ray::RayTrainWorker")]


def _cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_a_killed_gang_worker_restarts_the_gang_from_its_last_checkpoint(
        cluster: RayCluster, stores: Dict[str, Any], s3: S3, tmp_path: Path) -> None:
    """``failure_config: {max_failures: 1}``: the worker on the worker node is killed once its trial
    has reported epoch 2; Ray Train restarts the gang (new processes, on both nodes again) from the
    last checkpoint, and the trial completes every epoch, in its one MLflow run."""
    worker = cluster.nodes[1]
    cfg = search_yaml(tmp_path, **stores, epochs=EPOCHS, limit=1797, failure_config={"max_failures": 1},
                      tune_config={"num_samples": 1, "reuse_actors": False}, **GANG)
    killed: List[int] = []

    def on_line(line: str) -> None:
        if not killed and f" epoch {KILL_AFTER}/" in line:
            victims = train_workers(worker)
            assert len(victims) == 1, victims
            os.kill(victims[0], signal.SIGKILL)
            killed.append(victims[0])

    search = run_search(cluster, cfg, tmp_path / "out", on_line)
    assert search.returncode == 0 and killed, search.stderr[-3000:]
    assert not any("FAILED" in line or " failed (" in line for line in search.lines)  # Ray Train retried, not Tune
    trials = read_trials(search.exp_dir)
    assert [(t["status"], t["epochs"]) for t in trials] == [("TERMINATED", str(EPOCHS))]
    # the trial's results as Tune stored them, with the gang's processes: new ones after the kill
    uri = f"{stores['storage'].split('?')[0]}/{search.exp_dir.name}"
    found = [k for k in s3.keys(uri) if k.endswith("/result.json") and trials[0]["trial_id"] in k]
    results = [json.loads(line) for line in s3.read(stores["storage"].replace("?", f"/{search.exp_dir.name}?", 1),
                                                   found[0]).splitlines()]
    pids, epochs = [r["worker_pids"] for r in results], [r["epoch"] for r in results]
    restart = next(i for i in range(1, len(pids)) if pids[i] != pids[0])
    before, after = epochs[:restart], epochs[restart:]
    assert len(set(pids[restart:])) == 1 and str(killed[0]) in pids[0].split(",")
    assert set(pids[0].split(",")).isdisjoint(pids[-1].split(","))  # a whole new gang
    assert [r["nodes"] for r in results] == [results[0]["nodes"]] * len(results) and "," in results[0]["nodes"]
    assert before == list(range(1, before[-1] + 1)) and KILL_AFTER <= before[-1], epochs
    assert after == list(range(after[0], EPOCHS + 1)) and KILL_AFTER < after[0] <= before[-1] + 1, epochs
    check_mlflow(search.exp_dir, trials, steps={trials[0]["trial_id"]: sorted(epochs)})
    assert not train_workers(worker)  # the gang ended with the trial
    print(f"gang worker {killed[0]} killed after epoch {KILL_AFTER}: epochs {before}, then {after} after the restart")
