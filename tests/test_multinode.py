"""Multi-node: a real 2-node Ray cluster on 127.0.0.1 with token authentication, training
submitted as a Ray job (CLI and SDK), checkpoints in a loopback S3 endpoint, and a training
worker killed mid-run. Everything is asserted from MLflow, S3 and Ray's state API."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from dcgan_dist.train import main
from tests.conftest import train_args
from tests.test_train import only_run, steps_of

REPO = str(Path(__file__).resolve().parents[1])


def job_args(tmp_path: Path, *flags: str, **overrides) -> list[str]:
    """A short 2-worker run (one worker per 1-CPU node) into a sqlite store in tmp_path."""
    options = {"num_workers": 2, "max_steps": 12, "log_every": 4, "checkpoint_every": 12} | overrides
    return [*train_args(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", **options), "--no-register-models", *flags]


def runtime_env(extra: dict[str, str] | None = None) -> dict:
    """The job (driver, Train controller and workers) imports this checkout's code."""
    return {"env_vars": {"PYTHONPATH": REPO, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"} | (extra or {})}


def aws_env() -> dict[str, str]:
    return {name: os.environ[name] for name in
            ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def job_client(cluster):
    from ray.job_submission import JobSubmissionClient

    # The token goes in the header explicitly: this test process is not part of the cluster.
    return JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})


def wait_for_job(client, job_id: str, timeout_s: float = 300) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(1)
    return status


def assert_trained_on_both_nodes(cluster, tracking_uri: str, max_steps: int):
    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["derived.world_size"] == "2" and params["derived.per_worker_batch"] == "16"
    assert params["derived.num_nodes"] == "2"
    node_of_rank = json.loads(tags["ray.node_of_rank"])
    assert len(node_of_rank) == 2 and set(node_of_rank) == {n["node_id"] for n in cluster.alive_nodes()}
    assert steps_of(client, run.info.run_id, "loss_d") == list(range(1, max_steps + 1))
    # the entry point, not Ray's worker script, is the run's source; submitted as a Ray job
    assert tags["mlflow.source.name"] == "dcgan_dist.train" and tags["mlflow.source.type"] == "JOB"
    # D's loss falls from ~1.4 as D learns (G's loss rises meanwhile: early GAN dynamics)
    loss_d = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss_d"), key=lambda m: m.step)]
    assert sum(loss_d[-3:]) < sum(loss_d[:3]), loss_d
    assert cluster.token not in json.dumps([params, tags])
    return run


@pytest.mark.slow
def test_ray_job_submit_trains_on_both_nodes(ray_cluster, tmp_path):
    submit = ["job", "submit", "--address", ray_cluster.dashboard, "--runtime-env-json", json.dumps(runtime_env()),
              "--", "python", "-m", "dcgan_dist.train", *job_args(tmp_path)]
    logs = ray_cluster.cli(*submit, timeout_s=300)
    assert "Training finished at step 12" in logs
    # quiet by default: the progress bar, not a line per Ray Train report
    assert "12/12" in logs and "Reporting training result" not in logs, logs[-3000:]
    assert ray_cluster.token not in logs
    assert_trained_on_both_nodes(ray_cluster, f"sqlite:///{tmp_path / 'mlflow.db'}", 12)


@pytest.mark.slow
def test_jobs_sdk_run_with_bn_sync_survives_a_killed_worker_via_s3_checkpoints(ray_cluster, s3_bucket, tmp_path):
    """Submitted through the Jobs SDK, with SyncBatchNorm, checkpoints in S3 (the storage every
    node of a real cluster shares): a training worker is killed after the step-10 checkpoint,
    and the run resumes from S3 into the same MLflow run with every step logged once."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = job_client(ray_cluster)
    args = job_args(tmp_path, "--bn-sync", "--verbose", max_steps=30, checkpoint_every=10, log_every=5, max_failures=2,
                    storage_path=f"s3://{s3_bucket}/checkpoints")
    job_id = client.submit_job(entrypoint=shlex.join(["python", "-m", "dcgan_dist.train", *args]),
                               runtime_env=runtime_env(aws_env()))

    # The training workers, from Ray's state API: kill the one on the non-head node.
    head = next(n["node_id"] for n in ray_cluster.alive_nodes() if n["is_head_node"])
    deadline = time.monotonic() + 180
    while len(workers := ray_cluster.list("actors", "class_name=RayTrainWorker", "state=ALIVE")) < 2:
        assert time.monotonic() < deadline and client.get_job_status(job_id) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    victim = next(w["pid"] for w in workers if w["node_id"] != head)

    # ... once Ray Train has registered the step-10 checkpoint (its controller writes the checkpoint
    # manager's snapshot only then; a checkpoint folder alone may still be uploading) and MLflow
    # holds steps past it.
    s3 = boto3.client("s3")
    mlflow_client = MlflowClient(tracking_uri)
    while True:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        registered = s3.list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/test/checkpoint_manager_snapshot.json").get("Contents", [])
        runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tests").experiment_id]) if registered else []
        if runs and max(steps_of(mlflow_client, runs[0].info.run_id, "loss_d"), default=0) > 10:
            break
        time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)

    assert wait_for_job(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    # one MLflow run across the restart, on both nodes, every step once: none missing, none twice
    run = assert_trained_on_both_nodes(ray_cluster, tracking_uri, 30)
    assert int(run.data.tags["train.resumed_from_step"]) in (10, 20)
    assert steps_of(mlflow_client, run.info.run_id, "img_per_s") == list(range(5, 31, 5))
    assert run.data.params["cluster.bn_sync"] == "True" and run.data.params["cluster.max_failures"] == "2"
    logs = client.get_job_logs(job_id)
    assert "Resuming MLflow run" in logs and "Reporting training result" in logs  # --verbose: Ray Train's own lines too
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/test/")["Contents"]]
    for name in ("state.pt", "rng-rank0.pt", "rng-rank1.pt"):
        assert any(k.startswith("checkpoints/test/checkpoint_") and k.endswith("/" + name) for k in keys), keys


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1:9", "no Ray cluster answers"),  # nothing listens
    ("http://127.0.0.1:8265", "is not HOST:PORT"),  # the dashboard's address, as ray job submit takes it
])
def test_wrong_ray_address_fails_fast_before_anything_is_scheduled(tmp_path, mlflow_sqlite, capsys, address, problem):
    assert main(train_args(tmp_path, mlflow_sqlite, ray_address=address)) == 2  # from the preflight: nothing ran
    error = capsys.readouterr().err
    assert "--ray-address" in error and problem in error and address in error
    assert len(error.strip().splitlines()) == 1, error


@pytest.mark.slow
def test_a_port_that_is_not_a_ray_cluster_is_refused(ray_cluster):
    from dcgan_dist.config import ConfigError
    from dcgan_dist.train import check_ray_address

    check_ray_address(ray_cluster.address)  # the GCS answers
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        check_ray_address(f"127.0.0.1:{ray_cluster.dashboard_port}")  # an HTTP server, not Ray's GCS


def test_missing_s3_storage_bucket_fails_before_ray(tmp_path, mlflow_sqlite, s3_bucket, capsys):
    assert main(train_args(tmp_path, mlflow_sqlite, storage_path="s3://no-such-bucket-here/results")) == 2
    error = capsys.readouterr().err
    assert "--storage-path" in error and "no-such-bucket-here" in error and "no such bucket" in error, error
