"""The real servers the tune tests start on 127.0.0.1: an S3-compatible store (moto's server mode,
in its own process) and an ``mlflow server`` (own process group, SQLite backend, proxied artifacts).

A plain module beside the tests (pytest puts this folder on ``sys.path``): ``test_storage.py``,
``test_mlflow_server.py`` and ``test_real_cluster.py`` start the same servers the same way.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, List, NamedTuple

import pytest
from tune_files import free_port

BUCKET = "dcanets"
# what every process that talks to the S3 server needs (Ray nodes included: credentials are not
# forwarded to workers, as on a real cluster where each machine has its own)
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """The server's endpoint and a boto3 client: an S3 client independent of pyarrow, to check
    what dcanets and Ray wrote."""

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}"

    def keys(self, uri: str) -> List[str]:
        """The objects under a search's URI, relative to it (not the folder markers pyarrow writes)."""
        prefix = urllib.parse.urlsplit(uri).path.strip("/") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        keys = [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]
        return [k for k in keys if k and not k.endswith("/")]

    def read(self, uri: str, name: str) -> str:
        key = urllib.parse.urlsplit(uri).path.strip("/") + "/" + name
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[S3]:
    """moto's S3 server on a free port with the bucket made, and the AWS credentials set in this
    process's environment (so that Ray, started afterwards, inherits them)."""
    port = free_port()
    log = (folder / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as env:
        for key, value in AWS_ENV.items():
            env.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            env.delenv(key, raising=False)
        try:
            server = S3(f"http://127.0.0.1:{port}")
            _wait_for_s3(server, proc)
            server.client.create_bucket(Bucket=BUCKET)
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def _wait_for_s3(server: S3, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            server.client.list_buckets()
            return
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)


class MlflowServer(NamedTuple):
    url: str
    artifacts: Path  # --artifacts-destination: where the proxied artifacts land


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free port, one uvicorn worker and no job runner (kept light: the
    default is 4 workers plus a job-execution process); stopped with its process group."""
    url, log = f"http://127.0.0.1:{free_port()}", root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
           "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        _wait_until_healthy(url, proc, log)
        yield MlflowServer(url, root / "artifacts")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, deadline_s: float = 90) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.25)
    raise AssertionError(f"mlflow server at {url} not healthy after {deadline_s} s:\n{log.read_text()}")
