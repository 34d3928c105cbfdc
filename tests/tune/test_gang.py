"""``resources: {workers: N}``: what a gang trial asks Ray for, and the gangs refused before any
trial starts (the gang itself runs on the real cluster: test_real_cluster.py)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dcanets.tune import builders, gang, schema
from dcanets.tune.search import check_gang
from dcanets.tune.storage import Location

NODES = [{"CPU": 4.0, "GPU": 2.0, "memory": 8e9}, {"CPU": 2.0, "memory": 8e9}]


def spec_of(tmp_path: Path, write_config, **resources) -> schema.TuneSpec:
    return schema.load(write_config(tmp_path, resources=resources))


def test_a_gang_trial_holds_memory_only_and_its_workers_ask_for_theirs(tmp_path: Path, write_config) -> None:
    spec = spec_of(tmp_path, write_config, workers=4, cpu=2, gpu=1)
    assert builders.trial_resources(spec) == {"cpu": 0, "gpu": 0, "memory": 256 * 2**20}  # no CPU, no GPU
    config = gang.gang_config(spec, Location.local(tmp_path / "search"))
    assert (config["workers"], config["cpu"], config["gpu"]) == (4, 2.0, 1.0)
    assert config["storage_path"] == str(tmp_path / "search" / gang.GANGS) and config["filesystem"] is None
    assert builders.build_tune_config(spec).reuse_actors is False  # a gang's driver is never reused
    one = spec_of(tmp_path, write_config, cpu=2)
    assert one.resources.workers == 1 and builders.trial_resources(one) == {"cpu": 2, "gpu": 0}
    assert builders.build_tune_config(one).reuse_actors is True


def test_workers_must_be_a_whole_number_of_processes(tmp_path: Path, write_config) -> None:
    with pytest.raises(ValueError, match=r"resources\.workers: "):
        spec_of(tmp_path, write_config, workers=0)
    with pytest.raises(ValueError, match=r"resources\.workers: "):
        spec_of(tmp_path, write_config, workers=1.5)


@pytest.mark.parametrize("resources, message", [
    ({"workers": 3, "cpu": 2}, None),                                          # 2 on the first node, 1 on the other
    ({"workers": 4, "cpu": 1, "gpu": 1}, "can place at most 2 at once"),        # 2 GPUs in all
    ({"workers": 4, "cpu": 3}, "gang of 4 workers of 3 CPU each, but the local Ray can place at most 1 at once"),
    ({"workers": 2, "cpu": 1, "gpu": 0.5}, "resources.gpu: the 2 workers of a gang need a GPU each"),
])
def test_gangs_the_cluster_cannot_hold_at_once_are_refused_in_one_line(resources, message) -> None:
    res = schema.Resources(**resources)
    if message is None:
        check_gang(res, NODES, None)
        return
    with pytest.raises(ValueError, match=message) as err:
        check_gang(res, NODES, None)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_asha_stops_gang_trials_and_the_next_gangs_still_get_the_cpus(ray_local, tmp_path: Path, write_config) -> None:
    """Three trials of 2 workers on a Ray of 2 CPUs: one gang at a time. ASHA stops trials after
    their first epoch, which kills their drivers mid-``fit()``; the stopped gangs' placement groups
    must be released (GangCleanup), or the next gang would wait for CPUs forever."""
    from tune_files import runs_of, start_search

    cfg = write_config(tmp_path, train={"model": "multibranch_mlp_1h", "limit": 256, "batch_size": 32, "epochs": 3,
                                        "device": "cpu"},
                       space={"lr": {"type": "loguniform", "low": 0.001, "high": 0.3}},
                       search_alg={"sampler": {"type": "RandomSampler", "seed": 0}},
                       scheduler={"grace_period": 1, "reduction_factor": 2},
                       tune_config={"num_samples": 3, "max_concurrent_trials": 2},
                       resources={"workers": 2, "cpu": 1})
    proc = start_search(cfg, tmp_path / "out", ray_local, tmp_path / "stderr")
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, err[-3000:]
    (exp_dir,) = (tmp_path / "out").glob("tiny-*")
    with (exp_dir / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert [t["status"] for t in trials] == ["TERMINATED"] * 3
    assert sorted(int(t["epochs"]) for t in trials)[0] < 3 and max(int(t["epochs"]) for t in trials) == 3, trials
    _, parents, children = runs_of(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert [r.data.tags.get("world_size") for r in children] == ["2"] * 3
    assert all(r.info.status == "FINISHED" for r in parents + children)


def test_a_killed_workers_folder_is_removed_by_the_next_worker_and_a_running_ones_kept(tmp_path: Path) -> None:
    """A gang worker killed mid-run (ASHA, a failure) leaves its folder and last.pt behind; the next
    worker on the machine removes it, and never a folder whose worker still holds its lock."""
    from dcanets.engine.rundir import FolderLock

    dead, alive, unlocked = (tmp_path / f"{gang.PREFIX}{n}" for n in ("dead", "alive", "nolock"))
    for folder in (dead, alive, unlocked):
        folder.mkdir()
        (folder / "last.pt").write_bytes(b"x" * 1000)
    (dead / gang.WORKER_LOCK).touch()  # its worker ended: the kernel released its flock
    running = FolderLock(alive / gang.WORKER_LOCK)
    assert running.acquire()
    new, held = gang.worker_folder(tmp_path)
    try:
        assert not dead.exists()
        assert (alive / "last.pt").read_bytes() == b"x" * 1000 and (unlocked / "last.pt").exists()
        assert new.parent == tmp_path and new.name.startswith(gang.PREFIX)
        assert [p.name for p in new.iterdir()] == [gang.WORKER_LOCK]
        assert not FolderLock(new / gang.WORKER_LOCK).acquire()  # held by its worker for the run
        gang.worker_folder(tmp_path)[1].release()  # the next worker keeps both running folders
        assert new.is_dir() and alive.is_dir()
    finally:
        running.release()
        held.release()
    gang.worker_folder(tmp_path)[1].release()  # once their workers are gone, both go
    assert not alive.exists() and not new.exists()
