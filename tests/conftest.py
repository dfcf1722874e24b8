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
        "experiment": "tests",
    } | {key.replace("_", "-"): value for key, value in overrides.items()}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
