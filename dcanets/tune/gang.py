"""A search trial across several processes: a Ray Train ``TorchTrainer`` gang launched from the trial.

``resources: {workers: N, cpu: C, gpu: G}`` with N > 1 makes every trial N DDP ranks of the one
engine (``dcanets.engine.distributed``), each a Ray Train worker asking for C CPUs and G GPUs, on
whichever nodes have them. The pattern is Ray Train V2's (Ray's guide "Hyperparameter Tuning with Ray
Tune"; passing a trainer to ``tune.Tuner`` is deprecated): the Tune trial is a small driver that
builds the ``TorchTrainer`` and calls ``fit()``; ``TuneReportCallback`` forwards rank 0's report of
every epoch to Tune, so ASHA, Optuna, the progress lines and MLflow see the trial as they see a
one-process one.

Why the trial asks for memory only (``dcanets.tune.builders.GANG_DRIVER``): a driver holding a CPU
or GPU could hold what its own workers need (on 2 nodes of 1 CPU, a driver's CPU leaves room for
one worker of two: every gang waits forever). Ray Train places a gang atomically (one placement
group, all of its bundles or none), so trials whose gangs do not fit at once wait for one that
ends, instead of each holding part of the cluster; ``tune_config: {max_concurrent_trials: M}``
limits how many drivers wait.

Checkpoints and failures: rank 0 reports ``last.pt`` every epoch; Ray Train keeps it (the newest
only) in ``<search>/gangs/<trial id>/`` of the search's storage. ``failure_config: {max_failures: N}``
is given to both Ray Train (a worker, or its node, that dies: the gang restarts from the last
checkpoint) and Tune (the driver that dies: the trial restarts, and Ray Train resumes its run
from that folder, as it does after ``dcanets tune --resume``).
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ray.tune import Callback

from dcanets.engine.rundir import FolderLock
from dcanets.tune import builders, schema
from dcanets.tune.storage import Location

GANGS = "gangs"  # the folder of the gangs' Ray Train runs, in the search's folder


def gang_config(spec: schema.TuneSpec, location: Location) -> Dict[str, Any]:
    """What a gang trial needs besides its sampled values: its workers' resources, where Ray Train
    keeps its runs, and the retries."""
    res = spec.resources
    return {"workers": int(res.workers), "cpu": float(res.cpu), "gpu": float(res.gpu),
            "storage_path": posixpath.join(location.path, GANGS), "filesystem": location.ray_filesystem,
            "max_failures": int(spec.failure_config.max_failures)}


def gang_trial(params: Dict[str, Any], base: Dict[str, Any], gang: Dict[str, Any]) -> None:
    """One Tune trial = one Ray Train run of ``gang["workers"]`` engine ranks (runs in the trial's
    small driver process)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = builders.trial_train_config(base, params)
    gpu = gang["gpu"]
    trainer = TorchTrainer(
        gang_worker, train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=gang["workers"], use_gpu=gpu > 0,
                                               resources_per_worker={"CPU": gang["cpu"], "GPU": gpu}),
        run_config=ray.train.RunConfig(
            # the trial's id, no time: a restarted or resumed trial finds its run and resumes it
            name=tune.get_context().get_trial_id(), storage_path=gang["storage_path"],
            storage_filesystem=gang["filesystem"], callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=gang["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    trainer.fit()


def gang_worker(config: Dict[str, Any]) -> None:
    """One rank of a gang (a Ray Train worker; Ray Train has started the process group): the engine
    from the last checkpoint of the run, if any; every epoch reported, with rank 0's ``last.pt``."""
    import ray
    import ray.train
    import ray.train.torch

    import dcanets  # noqa: F401  (plugin models/decompositions into this worker's timm registries)
    from dcanets.engine import TrainConfig, train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    cfg = dict(config["cfg"])
    device = ray.train.torch.get_device()  # the GPU Ray gave this worker (CUDA_VISIBLE_DEVICES), or the CPU
    if cfg.get("device", "auto") in ("auto", "cuda"):
        cfg["device"] = str(device)
    out, held = worker_folder()
    cfg["output"] = str(out)
    resume = _restore(ray.train.get_checkpoint(), out)
    node = ray.get_runtime_context().get_node_id()
    ranks = _gathered((node, os.getpid()))  # Tune's own "pid" of a result is the trial driver's
    gang = {"nodes": ",".join(sorted({n for n, _ in ranks})), "worker_pids": ",".join(str(p) for _, p in ranks),
            "placement_group": _placement_group()}

    def on_epoch(m: Dict[str, Any]) -> None:
        path = m.pop("checkpoint", None)
        m.update(node_id=node, gpu_ids=",".join(map(str, ray.get_gpu_ids())), **gang)
        checkpoint = ray.train.Checkpoint.from_directory(str(out)) if path and rank == 0 else None
        ray.train.report(m, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)

    try:
        train(TrainConfig.from_dict(cfg), on_epoch=on_epoch, resume=resume, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        held.release()


PREFIX = "dcanets-gang-"
WORKER_LOCK = ".gang-worker.lock"


def worker_folder(root: Optional[Path] = None) -> Tuple[Path, FolderLock]:
    """A new run folder for this worker, ``<tmp>/dcanets-gang-*``, and the lock this worker holds on
    it for its life, after removing the folders of workers that are gone.

    A worker removes its folder when its run ends, but a worker that is killed (ASHA stopping its
    trial, the search stopped, a failure ``failure_config`` retries) cannot, and each such folder
    holds a ``last.pt``: over a long search they would fill the disk. Each folder's ``flock``
    (released by the kernel however its holder ends, seen across containers sharing the folder,
    unlike a pid) says whether its worker still runs; a folder whose lock can be taken is removed.
    The lock is taken under a temporary name and then renamed, so no folder is ever seen unlocked
    before its worker holds it.
    """
    root = Path(root or tempfile.gettempdir())
    for folder in root.glob(f"{PREFIX}*"):
        gone = FolderLock(folder / WORKER_LOCK)
        try:
            if (folder / WORKER_LOCK).is_file() and gone.acquire():
                shutil.rmtree(folder, ignore_errors=True)
                gone.release()
        except OSError:  # removed meanwhile by another worker
            continue
    out = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    held = FolderLock(out / f"{WORKER_LOCK}.new")
    held.acquire()  # a new file in a new folder: nobody else holds it
    os.rename(held.path, out / WORKER_LOCK)
    held.path = out / WORKER_LOCK
    return out, held


def _restore(checkpoint: Any, out: Path) -> Optional[Path]:
    """The run's last checkpoint as ``out/last.pt`` (every rank reads it), or None for a new run."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        shutil.copy(Path(folder) / "last.pt", out / "last.pt")
    return out / "last.pt"


def _placement_group() -> str:
    """The id of the gang's placement group (hex), for :class:`GangCleanup`."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    return group.id.hex() if group is not None else ""


class GangCleanup(Callback):
    """Removes the placement group of a gang whose trial ended, in the driver.

    Ray Train removes its gang's placement group when its run ends, and when its controller dies
    otherwise (the trial stopped by ASHA or the search, its driver lost) it leaves that to a
    ``PlacementGroupCleaner`` that asks Ray's state API, which needs the dashboard (``ray[default]``);
    without it the group's resources stay reserved for the rest of the search and the next gang
    waits forever (seen with ``ray[tune]`` alone). The group is the search's (its job's), so the
    driver removes it, once the trial is over or is being retried (a retry makes a new group)."""

    def __init__(self) -> None:
        self.groups: Dict[str, str] = {}  # trial id -> the placement group its gang last reported

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("placement_group"):
            self.groups[trial.trial_id] = result["placement_group"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._remove(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._remove(trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._remove(trial.trial_id)

    def _remove(self, trial_id: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        group = self.groups.pop(trial_id, None)
        if group and placement_group_table().get(group, {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))


def _gathered(value: Any) -> list:
    """``value`` of every rank (one all-gather over the gang's process group)."""
    import torch.distributed as dist

    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


__all__ = ["GANGS", "GangCleanup", "gang_config", "gang_trial", "gang_worker"]
