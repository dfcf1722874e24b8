"""Fixtures that start real services: a local Ray instance, MLflow sqlite stores, a real MLflow
tracking server, and an S3 endpoint, all on 127.0.0.1.

One Ray instance, S3 endpoint and MLflow server serve the whole session (each costs seconds).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with as many CPUs as CI has (2).

    The dashboard stays on: Ray Train's placement-group cleaner asks its State API whether a
    trial's controller died, and without it the resources of a trial ASHA stops are never freed.
    """
    import ray

    # address="local": never join a cluster some other process started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store (the registry needs a database) in a scratch directory."""
    monkeypatch.chdir(tmp_path)  # mlruns/ artifacts land here, not in the checkout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def train_args(tmp_path, tracking_uri: str, **overrides) -> list[str]:
    """argv for a small, fast training run into tmp_path."""
    options = {
        "max-steps": 12, "batch-size": 32, "log-every": 4, "sample-every": 6, "checkpoint-every": 6,
        "tracking-uri": tracking_uri, "storage-path": str(tmp_path / "ray_results"), "run-name": "test",
        "experiment": "tests", "eval-samples": 200,  # each run scores G at its last step: keep it cheap
    } | {key.replace("_", "-"): value for key, value in overrides.items()}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint (moto's server) on 127.0.0.1, for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the loopback endpoint; boto3 finds it through the usual env vars."""
    import uuid

    import boto3

    from dcgan_dist.data import s3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3._clients.clear()  # clients made under other settings
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield bucket
    s3._clients.clear()


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1: sqlite backend in `folder`, artifacts proxied
    to s3://<bucket>/mlflow on the loopback S3 endpoint (clients need no S3 credentials)."""

    def __init__(self, folder, s3_endpoint: str, bucket: str, port: int | None = None):
        self.folder, self.s3_endpoint, self.bucket = folder, s3_endpoint, bucket
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 180.0) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        if self.process is not None and self.process.poll() is None:
            return self
        env = os.environ | {
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{self.bucket}/mlflow"],
            env=env, stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer /health within {timeout_s} s")

    def stop(self) -> None:
        """Stop the server and every process it started (it runs in its own process group)."""
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def create_bucket(s3_endpoint: str) -> str:
    import uuid

    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """One real MLflow tracking server for the session (starting one takes seconds)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_endpoint, create_bucket(s3_endpoint)).start()
    yield server
    server.stop()
