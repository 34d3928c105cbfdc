"""``resources: {workers: N}``: what a gang trial asks Ray for, and the gangs refused before any
trial starts (the gang itself runs on the real cluster: test_real_cluster.py)."""
from __future__ import annotations

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
    one = spec_of(tmp_path, write_config, cpu=2)
    assert one.resources.workers == 1 and builders.trial_resources(one) == {"cpu": 2, "gpu": 0}


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
