"""``dcanets tune --address``: the cluster goes away mid-search (every process of its nodes
killed, as when its machines go down or another job's cluster is stopped). The search must end in
one line of its own, with its MLflow runs KILLED and the resume command, well before Ray's own
driver timeout (about a minute) would end the process without a word (``dcanets/tune/watch.py``).
The cluster is ``ray start`` processes of this machine (``ray_nodes``), never ``ray stop``."""
from __future__ import annotations

import re
import signal
import sys
import time

import pytest
from ray_nodes import RayCluster
from tune_files import FIFO, runs_of, start_search

from dcanets.tune.watch import LOST_AFTER_S

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cluster helper reads /proc")]


def test_a_cluster_that_goes_away_ends_the_search_killed_in_one_line(tmp_path, write_config):
    cluster = RayCluster(tmp_path / "ray-logs")
    driver = None
    try:
        cluster.start_head(num_cpus=1)
        cfg = write_config(tmp_path, train={"epochs": 300, "limit": 200}, scheduler=FIFO,
                           tune_config={"num_samples": 1, "max_concurrent_trials": 1})
        out = tmp_path / "out"
        driver = start_search(cfg, out, cluster.address, tmp_path / "driver.stderr",
                              env={k: v for k, v in cluster.env.items() if k.startswith("RAY_AUTH_")})
        assert driver.stdout is not None
        for line in driver.stdout:                       # the trial runs: its second epoch is reported
            if "epoch 2/300" in line:
                break
        else:
            raise AssertionError((tmp_path / "driver.stderr").read_text()[-3000:])
        lost_at = time.monotonic()
        for node in cluster.nodes:
            node.kill(signal.SIGKILL)
        rest, _ = driver.communicate(timeout=240)
        seconds = time.monotonic() - lost_at
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop()
    err = (tmp_path / "driver.stderr").read_text().strip().splitlines()
    ours = [line for line in err if line.startswith("dcanets tune:")]
    assert driver.returncode == 1, err[-20:]
    assert len(ours) == 1 and ours[0] == err[-1], err[-20:]
    (exp_dir,) = out.glob("tiny-*")
    assert re.fullmatch(rf"dcanets tune: error: the Ray cluster at {re.escape(cluster.address)} went away mid-search "
                        rf"\(its head \S+ has not answered for {LOST_AFTER_S:.0f} s\); the search is KILLED: continue "
                        rf"with  dcanets tune --resume {re.escape(str(exp_dir))}", ours[0]), ours[0]
    print(f"the driver ended {seconds:.1f} s after the cluster was killed")
    assert seconds < 55, f"{seconds:.0f} s: Ray's own driver timeout, not the watch, ended it"
    _, parents, children = runs_of(f"sqlite:///{out / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["KILLED"] and [c.info.status for c in children] == ["KILLED"]
    assert '"status": "KILLED"' in (exp_dir / "search.json").read_text()
