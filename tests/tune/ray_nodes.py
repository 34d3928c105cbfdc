"""A Ray cluster of real ``ray start`` processes on this machine, stopped without touching any other Ray.

``ray stop`` kills every Ray process on the machine (it matches process names), which would take
down the Rays of whatever else runs here: other test sessions, a user's own cluster. So each node
is started by ``ray start`` in a session of its own (``start_new_session``): the GCS, the raylet,
its agents and every worker process the raylet spawns inherit that session id, and the node's
processes are exactly those whose session id is that of its ``ray start``. Stopping a node sends
SIGTERM to them, then SIGKILL to what is left, and checks that nothing of it survives. The same
works for killing one node mid-search, the way a machine that goes away looks to Ray.

Each node also has a temp dir of its own (short: Ray's socket paths must fit in 107 characters),
so nothing is written under ``/tmp/ray`` where ``ray.init(address="auto")`` elsewhere would find
this cluster. Token authentication stays on, the way a real cluster runs it: the token is made by
``ray get-auth-token --generate`` in a home folder of the cluster's own, and every node and the
driver get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing at it.

Linux only (``/proc``); a plain module beside the tests, imported like ``tune_files``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this environment


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> Optional[List[str]]:
    """Fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, session, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def session_pids(session: int) -> List[int]:
    """The live (not zombie) processes of a session."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) == session:
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> List[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


class Node:
    """One ``ray start`` node: its session (every process of the node) and temp dir."""

    def __init__(self, name: str, session: int, temp_dir: Path) -> None:
        self.name, self.session, self.temp_dir = name, session, temp_dir

    def pids(self) -> List[int]:
        return session_pids(self.session)

    def raylet_pid(self) -> int:
        """The raylet's pid: the process Ray counts as the node (the node dies with it)."""
        for pid in self.pids():
            if Path(_cmdline(pid)[0]).name == "raylet":
                return pid
        raise RuntimeError(f"{self.name}: no raylet running")

    def node_id(self) -> str:
        """The Ray node id (hex), as Tune reports it in a trial's ``node_id``."""
        for arg in _cmdline(self.raylet_pid()):
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        raise RuntimeError(f"{self.name}: the raylet's command line has no --node_id")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the node, the raylet first."""
        pids = self.pids()
        try:
            pids.insert(0, pids.pop(pids.index(self.raylet_pid())))
        except (RuntimeError, ValueError):
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class RayCluster:
    """A head and workers started with ``ray start``; ``stop()`` (also at exit) ends only them.

    ``env`` is what a process of the cluster (a node, the driver) needs: token authentication on
    and the cluster's token. ``address`` is the head's GCS address, for ``--address``.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="dcr-", dir="/tmp"))  # short: socket paths
        self.nodes: List[Node] = []
        self.address = ""
        home = self.root / "home"
        home.mkdir()
        self.env: Dict[str, str] = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))},
            "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}
        atexit.register(self.stop)  # a test that dies between start and its own finally
        # the token, as on a real head: `ray get-auth-token --generate` (it writes ~/.ray/auth_token)
        token_env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_TOKEN_PATH"}  # it must exist if set
        self._run("token", [RAY, "get-auth-token", "--generate"], env={**token_env, "HOME": str(home)})
        (home / ".ray" / "auth_token").chmod(0o600)  # Ray writes it world-readable; dcanets tune warns then

    def start_head(self, num_cpus: int = 1) -> str:
        port = free_port()
        self._start("head", ["--head", f"--port={port}", "--include-dashboard=false"], num_cpus)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_worker(self, num_cpus: int = 1) -> Node:
        return self._start(f"worker{len(self.nodes)}", [f"--address={self.address}"], num_cpus)

    def _start(self, name: str, args: List[str], num_cpus: int) -> Node:
        temp_dir = self.root / name
        # the dashboard agent's port is fixed (52365) unless given: two nodes here, other Rays on the machine
        cmd = [RAY, "start", *args, f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={free_port()}"]
        proc = self._run(name, cmd, env=self.env, new_session=True)
        node = Node(name, proc.pid, temp_dir)
        self.nodes.append(node)
        return node

    def _run(self, name: str, cmd: List[str], env: Dict[str, str], new_session: bool = False):
        log = self.log_dir / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            if new_session:
                Node(name, proc.pid, self.root).kill()
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({rc}): {log.read_text()[-2000:]}")
        return proc

    def stop(self, grace_s: float = 1.0) -> List[int]:
        """SIGTERM every process of every node, SIGKILL what is left after ``grace_s``; the pids
        that still live afterwards (none, unless a process cannot be killed)."""
        for node in self.nodes:
            node.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(n.pids() for n in self.nodes):
            time.sleep(0.2)
        for node in self.nodes:
            node.kill(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.pids() for n in self.nodes):
            time.sleep(0.1)
        survivors = [pid for n in self.nodes for pid in n.pids()]
        if not survivors:
            shutil.rmtree(self.root, ignore_errors=True)
        return survivors
