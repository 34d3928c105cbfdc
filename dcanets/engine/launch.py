"""``dcanets train --nproc N``: N processes of one node through torch's own launcher.

``torch.distributed.run`` (what ``torchrun --standalone --nproc-per-node N`` runs) starts the workers
with a local rendezvous, watches them, and stops the others when one fails; the workers find their
rank in the variables it sets (``dcanets.engine.distributed.join``). Here the same launcher is
called from Python (``elastic_launch``) so that a failure comes back as one line that names the rank
and its error (the worker records it in torchrun's error file, :func:`record_failure`) and the
number of processes is checked against the machine and the data before any starts
(:func:`check_nproc`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Any, List

import torch

from dcanets.engine.config import TrainConfig
from dcanets.engine.distributed import check_parallel, check_sync_bn


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a batch scheduler's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_nproc(cfg: TrainConfig, nproc: int) -> None:
    """One line when ``nproc`` processes cannot train ``cfg`` here: more than the GPUs (CUDA) or
    the CPUs, a setting DDP cannot serve (:func:`dcanets.engine.distributed.check_parallel`, with
    the run's optimizer built on a stand-in parameter), or a global batch (``batch_size × nproc``)
    larger than the training images."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        have = torch.cuda.device_count()
        if nproc > have:
            raise ValueError(f"--nproc {nproc}: this machine has {have} GPU(s), one per process; "
                             f"use --nproc {max(have, 1)} or fewer")
    elif nproc > usable_cpus():
        raise ValueError(f"--nproc {nproc}: this process may use {usable_cpus()} CPU core(s), and each of the "
                         f"{nproc} processes needs one; use --nproc {usable_cpus()} or fewer")
    check_sync_bn(cfg.sync_bn, torch.device("cuda" if cuda else "cpu"))
    from dcanets.engine.loop import build_optimizer

    check_parallel(build_optimizer(cfg, torch.nn.Linear(1, 1)), fidelity_every=cfg.fidelity_every,
                   sync_bn=cfg.sync_bn)
    from dcanets.engine.data.loaders import training_images

    images = training_images(cfg)
    global_batch = int(cfg.batch_size) * nproc
    if global_batch > images:
        raise ValueError(f"--nproc {nproc}: the global batch, batch_size x nproc = {cfg.batch_size} x {nproc} = "
                         f"{global_batch}, is larger than the {images} training images; lower --batch-size "
                         "(it is per process) or --nproc")


def record_failure(exc: BaseException) -> None:
    """In a worker of torch's launcher: write ``exc`` to its error file, where the launcher reads
    the rank's error (a no-op outside the launcher)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(exc, KeyboardInterrupt):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def failure_line(error: Any) -> str:
    """A ``ChildFailedError`` as one line: the rank that failed first, how, and its error.

    The launcher records the ranks it found failed, then stops the others with SIGTERM and records
    them too (they may have failed meanwhile in a collective with the lost rank: "Connection reset
    by peer"), and its timestamps have a resolution of one second: so the first rank recorded,
    not stopped by SIGTERM, is the cause."""
    failures = error.failures
    order = {r: i for i, r in enumerate(failures)}
    rank = min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, order[r]))
    failure = failures[rank]
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = " ".join(str(message).split())
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode}")
    detail = "" if not message or message.startswith(("Signal ", "To enable traceback")) else f": {message}"
    others = sorted(set(failures) - {rank})
    after = f"; rank(s) {', '.join(map(str, others))} failed after it" if others else ""
    return f"rank {rank} (pid {failure.pid}) {how}{detail}{after}; no process of the run is left"


def launch(nproc: int, args: List[str]) -> int:
    """Run ``python -m dcanets <args>`` as ``nproc`` ranks on this node; 0 when all succeed.

    Raises ``RuntimeError`` with :func:`failure_line` when a rank fails (the launcher has stopped
    the others by then). Each worker gets ``OMP_NUM_THREADS`` = its share of the CPUs unless set."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dcanets-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # its failure report is the line below
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "dcanets", *args)
    except ChildFailedError as exc:
        raise RuntimeError(failure_line(exc)) from None
    finally:
        agent_log.setLevel(level)
    return 0


__all__ = ["check_nproc", "failure_line", "launch", "record_failure", "usable_cpus"]
