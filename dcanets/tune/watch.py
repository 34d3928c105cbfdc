"""A search's driver watching the Ray cluster it joined with ``--address``.

Why: when the cluster goes away mid-search (its head stops, or it was another job's cluster that
``--address auto`` found), Ray's driver does not raise anything the search could handle: the
Tune loop waits on a cluster that no longer answers, and about a minute later Ray's core worker
ends the process itself (``gcs_rpc_server_reconnect_timeout_s``, 60 s), with no message of
dcanets' own and no ``finally`` run, leaving the MLflow runs RUNNING. So the driver watches the
head's GCS port itself (a TCP connect every ``every_s``: the head's process gone means the port
refuses at once) and, once it has not answered for ``grace_s`` (well inside Ray's minute), calls
``on_lost``: the search ends its runs KILLED, says so in one line with the resume command, and
exits (``dcanets.tune.search``).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional, Tuple

LOST_AFTER_S = 15.0  # a head that restarts (GCS fault tolerance) is back well within this


def gcs_host_port(address: str) -> Optional[Tuple[str, int]]:
    """``"10.0.0.1:6379"`` -> ``("10.0.0.1", 6379)``; None for what is not host:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class ClusterWatch(threading.Thread):
    """A daemon thread that calls ``on_lost()`` once the GCS at ``gcs_address`` has refused
    connections for ``grace_s`` seconds in a row; ``stop()`` ends the watch."""

    def __init__(self, gcs_address: str, on_lost: Callable[[], None], grace_s: float = LOST_AFTER_S,
                 every_s: float = 2.0) -> None:
        super().__init__(name="dcanets-cluster-watch", daemon=True)
        target = gcs_host_port(gcs_address)
        if target is None:
            raise ValueError(f"not a host:port GCS address: {gcs_address!r}")
        self.target, self.on_lost, self.grace_s, self.every_s = target, on_lost, grace_s, every_s
        self.gcs_address = gcs_address
        self._stopped = threading.Event()

    def run(self) -> None:
        failing_since: Optional[float] = None
        while not self._stopped.wait(self.every_s):
            if answers(*self.target):
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= self.grace_s and not self._stopped.is_set():
                self.on_lost()
                return

    def stop(self) -> None:
        self._stopped.set()


def watch_cluster(address: Optional[str], on_lost: Callable[[str], None]) -> Optional[ClusterWatch]:
    """A started watch of the cluster this driver joined with ``--address`` (``on_lost`` gets its
    GCS address); None for a local Ray (this process's own) and for Ray Client (``ray://``: the
    client's connection raises in the driver by itself)."""
    if not address or address.startswith("ray://"):
        return None
    import ray

    gcs = ray.get_runtime_context().gcs_address
    watch = ClusterWatch(gcs, lambda: on_lost(gcs))
    watch.start()
    return watch


__all__ = ["LOST_AFTER_S", "ClusterWatch", "answers", "gcs_host_port", "watch_cluster"]
