"""``dcanets tune`` on a two-node Ray cluster started on this machine: trials land on both nodes.

Each node offers one CPU and each trial asks for one, so two concurrent trials can only run on
two nodes. The ``two_nodes`` fixture owns its Ray: it shuts down whatever Ray this process is
connected to first (another test's, or one left by a failure), so the test passes alone and in
any order, and it leaves no Ray behind.
"""
from __future__ import annotations

import pytest
import yaml


@pytest.fixture
def two_nodes():
    """A connected two-node local cluster, torn down afterwards; the node ids are yielded."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_trials_run_on_both_nodes(two_nodes, tmp_path):
    from dcanets.tune import schema
    from dcanets.tune import search as tune_cmd

    assert len(two_nodes) == 2
    path = tmp_path / "two_nodes.yaml"
    path.write_text(yaml.safe_dump({
        "name": "two_nodes",
        "train": {"data": "digits", "limit": 200, "epochs": 1, "batch_size": 64, "model": "cifar_resnet20"},
        "space": {"lr": {"type": "loguniform", "low": 0.01, "high": 0.1}},
        "scheduler": {"type": "FIFOScheduler"},
        "tune_config": {"num_samples": 2, "reuse_actors": False},
        "resources": {"cpu": 1},
        "tracking": {"enabled": False},
    }))
    spec = schema.load(path)
    state = tune_cmd.create_search_dir(spec, tmp_path / "out")
    result = tune_cmd.run_search(spec, state, quiet=True)
    assert result.status == "FINISHED"
    placed = {t.node_id for t in result.trials}
    assert placed == two_nodes, f"trials on {placed}, cluster nodes {two_nodes}"
