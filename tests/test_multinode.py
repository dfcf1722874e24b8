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
def test_a_lost_node_and_a_lost_driver_cost_no_steps(ray_cluster, s3_bucket, tmp_path):
    """Submitted through the Jobs SDK, with SyncBatchNorm and checkpoints in S3 (the storage
    every node of a real cluster shares):
    1. before the first checkpoint, the worker node is lost whole (its raylet and every process
       on it) and a replacement joins, as KubeRay replaces a pod: Ray Train restarts both
       workers from step 0, into the MLflow run the driver made;
    2. once the step-20 checkpoint is registered the job is stopped (its driver lost, as `ray
       job stop` or a killed submitter does) and the same command submitted again: it resumes
       from S3 (at 20, or 40 if the stop came late).
    One MLflow run, on both nodes, every step once."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, s3, mlflow_client = job_client(ray_cluster), boto3.client("s3"), MlflowClient(tracking_uri)
    args = job_args(tmp_path, "--bn-sync", "--verbose", max_steps=60, checkpoint_every=20, log_every=2, max_failures=2,
                    storage_path=f"s3://{s3_bucket}/checkpoints")
    entrypoint = shlex.join(["python", "-m", "dcgan_dist.train", *args])
    first_job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(aws_env()))

    def logged_steps() -> list[int]:
        experiment = mlflow_client.get_experiment_by_name("tests")
        runs = mlflow_client.search_runs([experiment.experiment_id]) if experiment else []
        return steps_of(mlflow_client, runs[0].info.run_id, "loss_d") if runs else []

    def wait_for(condition, what: str, job_id: str) -> None:
        deadline = time.monotonic() + 240
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: " + client.get_job_logs(job_id)[-3000:]
            assert client.get_job_status(job_id) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
            time.sleep(0.2)

    def checkpointed() -> bool:
        key = "checkpoints/test/checkpoint_manager_snapshot.json"  # written once Ray Train registers a checkpoint
        return bool(s3.list_objects_v2(Bucket=s3_bucket, Prefix=key).get("Contents"))

    wait_for(lambda: logged_steps(), "the first steps in MLflow", first_job)
    assert not checkpointed()
    worker_node = ray_cluster.nodes[1]
    os.killpg(worker_node.pid, signal.SIGKILL)  # the whole node: `ray start --block`, its raylet and workers
    worker_node.wait()
    ray_cluster.start_node("--address", ray_cluster.address)  # the replacement
    wait_for(checkpointed, "the step-20 checkpoint after the restart", first_job)

    client.stop_job(first_job)
    assert wait_for_job(client, first_job) == "STOPPED"
    first_logs = client.get_job_logs(first_job)
    second_job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(aws_env()))
    assert wait_for_job(client, second_job) == "SUCCEEDED", client.get_job_logs(second_job)[-3000:]

    run = assert_trained_on_both_nodes(ray_cluster, tracking_uri, 60)
    assert "Resuming MLflow run" not in first_logs  # the restart after the lost node began at step 0 ...
    assert mlflow_client.get_run(run.info.run_id).data.tags["train.resumed_from_step"] in ("20", "40")  # ... the resubmission not
    assert steps_of(mlflow_client, run.info.run_id, "img_per_s") == list(range(2, 61, 2))
    assert run.data.params["cluster.bn_sync"] == "True" and run.data.params["cluster.max_failures"] == "2"
    logs = client.get_job_logs(second_job)
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
