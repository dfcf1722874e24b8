"""The spill (tracking/spill.py) and the sender's use of it, against a sqlite MLflow store and a
tracking URI nobody answers (no process is started): what the sender could not deliver is
written to storage, delivered once with its steps and timestamps, and what storage refuses too is
named in a warning."""

from __future__ import annotations

import logging
import pickle

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from pyarrow import fs

from dcgan_dist.tracking.sender import BufferedSender
from dcgan_dist.tracking.spill import SPILL_FOLDER, Spill
from dcgan_dist.tracking.store import ensure_experiment
from tests.conftest import free_port


@pytest.fixture
def away(monkeypatch) -> MlflowClient:
    """A client of a tracking server that is not there (a closed port on 127.0.0.1): fails at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return MlflowClient(f"http://127.0.0.1:{free_port()}")


def unsent_run(away: MlflowClient, store_uri: str, spill: Spill | None, max_metrics: int = 100) -> tuple[str, BufferedSender]:
    """A run in the sqlite store whose sender talks to the server that is away, holding 3 steps of
    loss_d/loss_g, a tag and an image."""
    client = MlflowClient(store_uri)
    run_id = client.create_run(ensure_experiment(store_uri, "spill")).info.run_id
    sender = BufferedSender(away, run_id, max_metrics=max_metrics, retry_max_s=1.0, spill=spill)
    sender.add_metrics([Metric(name, float(step), 1_000 + step, step) for step in (1, 2, 3) for name in ("loss_d", "loss_g")])
    sender.add_tags({"registered.step": "3"})
    sender.add_image(np.full((4, 4, 3), 7, np.uint8), "samples", 3)
    return run_id, sender


def test_what_the_server_missed_is_spilled_and_delivered_once(mlflow_sqlite, away, tmp_path, caplog):
    spill = pickle.loads(pickle.dumps(Spill(fs.LocalFileSystem(), str(tmp_path / "ray_results" / "run"))))
    run_id, sender = unsent_run(away, mlflow_sqlite, spill, max_metrics=4)  # step 1's two metrics overflow the buffer
    with caplog.at_level(logging.WARNING, "dcgan_dist.tracking.sender"):
        sender.close(timeout_s=30)
    assert sender.dropped() == (0, 0)
    folder = tmp_path / "ray_results" / "run" / SPILL_FOLDER / run_id
    kept = [r.message for r in caplog.records if " kept " in r.message]
    assert len(kept) == 2 and "(its buffer overflowed): kept 2 metrics (loss_d, loss_g; steps 1-1) in" in kept[0], kept
    assert f"kept 4 metrics (loss_d, loss_g; steps 2-3), 1 tags (registered.step), 1 images (samples@3) in {folder}" in kept[1]
    files = sorted(path.suffix for path in folder.iterdir())
    assert files == [".json", ".jsonl", ".jsonl"], files
    copies = {path: path.read_bytes() for path in folder.iterdir()}

    client = MlflowClient(mlflow_sqlite)
    assert spill.deliver(client, run_id) == {"metrics": 6, "tags": 1, "images": 1}
    assert not list(folder.iterdir())  # delivered: deleted
    # the .jsonl once more, as a delivery cut between its send and its delete leaves it: nothing twice
    for path, content in copies.items():
        if path.suffix == ".jsonl":
            path.write_bytes(content)
    assert spill.deliver(client, run_id)["metrics"] == 6
    assert spill.deliver(client, run_id) == {"metrics": 0, "tags": 0, "images": 0}
    for name in ("loss_d", "loss_g"):
        history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, name))
        assert history == [(step, float(step), 1_000 + step) for step in (1, 2, 3)]  # once each, original steps and times
    run = client.get_run(run_id)
    assert run.data.tags["registered.step"] == "3" and "tracking/dropped_metrics" not in run.data.metrics
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(images) == 1 and "samples+step+3+" in images[0], images
    mlflow.set_tracking_uri(mlflow_sqlite)


def test_a_spill_that_cannot_be_written_names_what_was_lost(mlflow_sqlite, away, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run's storage folder should be")
    run_id, sender = unsent_run(away, mlflow_sqlite, Spill(fs.LocalFileSystem(), str(blocker)))
    with caplog.at_level(logging.WARNING, "dcgan_dist.tracking.sender"):
        sender.close(timeout_s=30)
    [warning] = [r.message for r in caplog.records if "spill to" in r.message]
    assert f"{blocker}/{SPILL_FOLDER}/{run_id}" in warning
    assert "lost 6 metrics (loss_d, loss_g; steps 1-3), 1 tags (registered.step), 1 images (samples@3)" in warning
    assert sender.dropped() == (6, 1)
