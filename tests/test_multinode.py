"""Multi-node: a real 2-node Ray cluster on 127.0.0.1 with token authentication, training
submitted as a Ray job (CLI and SDK), checkpoints in a loopback S3 endpoint, and a training
worker killed mid-run. Everything is asserted from MLflow, S3 and Ray's state API."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from tests.conftest import train_args
from tests.test_train import only_run, steps_of

pytestmark = pytest.mark.slow

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
    # D's loss falls from ~1.4 as D learns (G's loss rises meanwhile: early GAN dynamics)
    loss_d = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss_d"), key=lambda m: m.step)]
    assert sum(loss_d[-3:]) < sum(loss_d[:3]), loss_d
    assert cluster.token not in json.dumps([params, tags])
    return run


def test_ray_job_submit_trains_on_both_nodes(ray_cluster, tmp_path):
    submit = ["job", "submit", "--address", ray_cluster.dashboard, "--runtime-env-json", json.dumps(runtime_env()),
              "--", "python", "-m", "dcgan_dist.train", *job_args(tmp_path)]
    logs = ray_cluster.cli(*submit, timeout_s=300)
    assert "Training finished at step 12" in logs
    assert ray_cluster.token not in logs
    assert_trained_on_both_nodes(ray_cluster, f"sqlite:///{tmp_path / 'mlflow.db'}", 12)


def test_jobs_sdk_with_bn_sync_checkpoints_to_s3(ray_cluster, s3_bucket, tmp_path):
    client = job_client(ray_cluster)
    args = job_args(tmp_path, "--bn-sync", storage_path=f"s3://{s3_bucket}/checkpoints")
    job_id = client.submit_job(entrypoint=shlex.join(["python", "-m", "dcgan_dist.train", *args]),
                               runtime_env=runtime_env(aws_env()))
    assert wait_for_job(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]

    run = assert_trained_on_both_nodes(ray_cluster, f"sqlite:///{tmp_path / 'mlflow.db'}", 12)
    assert run.data.params["cluster.bn_sync"] == "True"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/test/")["Contents"]]
    for name in ("state.pt", "rng-rank0.pt", "rng-rank1.pt"):
        assert any(k.startswith("checkpoints/test/checkpoint_") and k.endswith("/" + name) for k in keys), keys


def test_killed_worker_resumes_from_the_s3_checkpoint_in_the_same_run(ray_cluster, s3_bucket, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = job_client(ray_cluster)
    args = job_args(tmp_path, max_steps=40, checkpoint_every=10, log_every=5, max_failures=2,
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

    # ... once the step-10 checkpoint is in S3 and MLflow holds steps past it.
    s3 = boto3.client("s3")
    mlflow_client = MlflowClient(tracking_uri)
    while True:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/test/checkpoint_").get("Contents", [])
        runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tests").experiment_id]) if listed else []
        if runs and max(steps_of(mlflow_client, runs[0].info.run_id, "loss_d"), default=0) > 10:
            break
        time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)

    assert wait_for_job(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    run = only_run(mlflow_client)  # one MLflow run across the restart
    assert run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["train.resumed_from_step"])
    assert resumed_from in (10, 20, 30)
    # continuous: every step once, none missing, none twice
    for metric in ("loss_d", "loss_g"):
        assert steps_of(mlflow_client, run.info.run_id, metric) == list(range(1, 41)), metric
    assert steps_of(mlflow_client, run.info.run_id, "img_per_s") == list(range(5, 41, 5))
    logs = client.get_job_logs(job_id)
    assert "Resuming MLflow run" in logs


def test_wrong_ray_address_fails_fast_before_anything_is_scheduled(tmp_path, mlflow_sqlite):
    for address, problem in (("127.0.0.1:9", "no Ray cluster answers"), ("http://127.0.0.1:8265", "is not HOST:PORT")):
        result = subprocess.run(
            [sys.executable, "-m", "dcgan_dist.train", *train_args(tmp_path, mlflow_sqlite, ray_address=address)],
            capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": REPO},
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "--ray-address" in result.stderr and problem in result.stderr and address in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unwritable_s3_storage_path_fails_before_ray(tmp_path, mlflow_sqlite, s3_bucket):
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train",
         *train_args(tmp_path, mlflow_sqlite, storage_path="s3://no-such-bucket-here/results")],
        capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": REPO},
    )
    assert result.returncode == 2 and "--storage-path" in result.stderr and "no such bucket" in result.stderr, result.stderr
