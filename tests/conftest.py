"""Fixtures that start real services: a local Ray instance and MLflow sqlite stores.

One Ray instance serves the whole session (starting Ray costs seconds).
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
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
