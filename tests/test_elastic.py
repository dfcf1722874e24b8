"""Elastic training on a real cluster of `ray start` nodes on 127.0.0.1 (gloo, CPU): one run of
`--num-workers 1:2` lives through the events of a spot cluster in turn, each asserted as it
happens and all of them from MLflow, the checkpoints and the sample log at the end:

1. it starts on the head alone (1 worker) and grows to 2 when a node joins;
2. that node is drained with a notice (SIGTERM to its `ray start --block`, as Kubernetes sends a
   reclaimed spot pod): every rank checkpoints at the next window, the run goes on at 1 worker
   from there, no logged step redone;
3. another node joins: it grows to 2 again;
4. that node is lost without notice (its whole process group killed): the run finishes at 1.

One MLflow run, every step logged once, every epoch's samples read exactly once by key, and the
part after the last shrink takes exactly the steps a 1-worker run resumed from that checkpoint
takes (equal weights)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from dcgan_dist import checkpoint
from dcgan_dist.data import manifest
from dcgan_dist.data.epochs import shard_keys
from dcgan_dist.data.sample_log import kept_keys
from tests.conftest import RayCluster, train_args
from tests.test_data import write_shards
from tests.test_multinode import job_client, runtime_env, wait_for_job
from tests.test_train import only_run, steps_of

pytestmark = pytest.mark.slow

SHARD_SIZES = [27, 13, 20]  # uneven shards; 60 samples are 12 global batches of 5, none left over
BATCH, EPOCHS = 5, 35
DRAIN_TIMEOUT_S = 8  # the drained node's `ray start` waits this long before it stops its workers


def read_state(run_dir: Path) -> dict:
    import ray.train

    with ray.train.Result.from_path(str(run_dir)).checkpoint.as_directory() as directory:
        return checkpoint.load_state(directory)


def test_an_elastic_run_grows_and_shrinks_with_its_nodes_losing_no_sample(tmp_path):
    data = write_shards(str(tmp_path / "shards"), SHARD_SIZES)
    sample_log, storage = tmp_path / "samples", tmp_path / "ray_results"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*train_args(tmp_path, tracking_uri, data=data, num_workers="1:2", batch_size=BATCH, max_epochs=EPOCHS,
                        log_every=4, sample_every=10_000, checkpoint_every=12, keep_checkpoints=4, max_failures=4,
                        resize_interval_s=2, loader_workers=1, shuffle_buffer=16, eval_every=0, sample_log=str(sample_log)),
            "--no-register-models"]
    del args[args.index("--max-steps"):args.index("--max-steps") + 2]
    root = Path(tempfile.mkdtemp(prefix="elastic-", dir=os.environ.get("RAY_TMPDIR") or None))
    cluster = RayCluster(root)
    cluster.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = str(DRAIN_TIMEOUT_S)
    env = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}  # Ray Train's watcher of drained nodes (default 5 s)
    try:
        cluster.start(num_nodes=1)
        client, mlflow_client = job_client(cluster), MlflowClient(tracking_uri)
        job = client.submit_job(entrypoint=shlex.join(["python", "-m", "dcgan_dist.train", *args]), runtime_env=runtime_env(env))

        def history(metric: str) -> list:
            experiment = mlflow_client.get_experiment_by_name("tests")
            runs = mlflow_client.search_runs([experiment.experiment_id]) if experiment else []
            return sorted(mlflow_client.get_metric_history(runs[0].info.run_id, metric), key=lambda m: m.timestamp) if runs else []

        def wait_for(condition, what: str, timeout_s: float = 180) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}: " + client.get_job_logs(job)[-4000:]
                assert client.get_job_status(job) in ("PENDING", "RUNNING"), f"{what}: " + client.get_job_logs(job)[-4000:]
                time.sleep(0.5)

        def restarts() -> int:
            return len(history("faults/steps_lost"))

        def at_size(size: int, after_restart: int) -> bool:
            """A window trained at `size` workers after restart number `after_restart` began."""
            events = history("faults/steps_lost")
            if len(events) < after_restart:
                return False
            since = events[after_restart - 1].timestamp if after_restart else 0
            return any(m.value == size and m.timestamp > since for m in history("world_size"))

        wait_for(lambda: at_size(1, 0), "the first windows on the head alone")
        cluster.start_node("--address", cluster.address)
        wait_for(lambda: at_size(2, 1), "the run to grow to 2 workers")

        cluster.nodes[1].send_signal(signal.SIGTERM)  # a drain with notice: `ray start --block` drains its node
        wait_for(lambda: at_size(1, 2), "the run to go on at 1 worker after the drain")
        drained = history("faults/steps_lost")[1]

        cluster.start_node("--address", cluster.address)
        wait_for(lambda: at_size(2, 3), "the run to grow to 2 workers again")
        os.killpg(cluster.nodes[2].pid, signal.SIGKILL)  # lost without notice: its raylet and workers at once
        cluster.nodes[2].wait()
        wait_for(lambda: restarts() >= 4, "the restart after the lost node")
        # What a 1-worker run resumed from the same checkpoint starts from: the storage as it is
        # now (the checkpoint the last restart resumed from is its latest) and the MLflow store.
        copy = tmp_path / "replay"
        shutil.copytree(storage, copy / "ray_results")
        with sqlite3.connect(tmp_path / "mlflow.db") as source, sqlite3.connect(copy / "mlflow.db") as target:
            source.backup(target)
        assert wait_for_job(client, job, timeout_s=300) == "SUCCEEDED", client.get_job_logs(job)[-4000:]

        run = only_run(mlflow_client)
        run_id, max_steps = run.info.run_id, EPOCHS * sum(SHARD_SIZES) // BATCH
        assert run.info.status == "FINISHED" and run.data.params["cluster.num_workers"] == "1:2"
        assert steps_of(mlflow_client, run_id, "loss_d") == list(range(1, max_steps + 1))  # every step once
        sizes = [m.value for m in history("world_size")]
        assert [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]] == [1, 2, 1, 2, 1], sizes
        events = history("faults/steps_lost")
        assert len(events) == 4 and drained.value == 0, [(m.step, m.value) for m in events]
        assert all(m.value > 0 for m in history("faults/resize_s"))
        # A loss without notice resumes from the latest checkpoint Ray Train registered (at its poll,
        # every 2 s: one reported just before the loss may not count) and redoes the steps since.
        assert events[3].step % 12 == 0 and events[3].value > 0

        # every epoch read each of its samples exactly once, across the four restarts
        shards = manifest.read(data)
        every_key = sorted(key for url in shards.shard_urls for key in shard_keys(url, shards.expected_samples()))
        kept = kept_keys(sample_log)
        steps_per_epoch = sum(SHARD_SIZES) // BATCH
        assert sorted(kept) == list(range(1, max_steps + 1))
        for epoch in range(EPOCHS):
            read = sorted(key for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1) for key in kept[step])
            assert read == every_key, f"epoch {epoch}"

        # From the last shrink on, the same steps as a 1-worker run resumed from that checkpoint,
        # from the copy: a checkpoint the last attempt had begun by then is made unreadable
        # (restore.py then resumes from the newest readable one before it).
        resumed_from = int(events[3].step)
        for state_file in (copy / "ray_results" / "test").glob(f"checkpoint_*/{checkpoint.STATE_FILE}"):
            if checkpoint.load_state(state_file.parent)["step"] > resumed_from:
                state_file.write_bytes(b"cut short")
        replay = [*train_args(copy, f"sqlite:///{copy / 'mlflow.db'}", data=data, num_workers="1", batch_size=BATCH,
                              max_steps=max_steps, log_every=4, sample_every=10_000, checkpoint_every=12, loader_workers=1,
                              shuffle_buffer=16, eval_every=0), "--no-register-models"]
        replay_job = client.submit_job(entrypoint=shlex.join(["python", "-m", "dcgan_dist.train", *replay]), runtime_env=runtime_env())
        assert wait_for_job(client, replay_job, timeout_s=300) == "SUCCEEDED", client.get_job_logs(replay_job)[-4000:]
        replayed_run = only_run(MlflowClient(f"sqlite:///{copy / 'mlflow.db'}"))
        assert replayed_run.data.tags["train.resumed_from_step"] == str(resumed_from)
        elastic, replayed = read_state(storage / "test"), read_state(copy / "ray_results" / "test")
        assert elastic["step"] == replayed["step"] == max_steps
        for network in ("generator", "discriminator"):
            for name, tensor in elastic[network].items():
                assert torch.equal(tensor, replayed[network][name]), f"{network}.{name}"
    finally:
        cluster.stop()
