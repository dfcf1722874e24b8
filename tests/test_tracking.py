"""Tracking against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to a
loopback moto S3 endpoint): a training run's record, the registry, the probe on a registered D,
a server that goes away while a run logs or as it ends, and a finished run re-run."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from dcgan_dist import checkpoint, evaluate
from dcgan_dist.champion import holds_final_models, log_final_models
from dcgan_dist.models import Architecture
from dcgan_dist.register import last_checkpoint_state
from dcgan_dist.tracking import registry
from dcgan_dist.tracking.run_logger import RunLogger
from dcgan_dist.tracking.spill import SPILL_FOLDER
from dcgan_dist.tracking.store import QUIET_RUN_LINKS, TrackingError, ensure_experiment
from dcgan_dist.train import main
from tests.conftest import train_args
from tests.fault_proxy import Fault, FaultProxy
from tests.test_train import steps_of

REPO = Path(__file__).resolve().parents[1]
PROBE_STEPS = 60  # a short run; even a random D passes 80 % on digits (benchmarks/RESULTS.md)
MODELS = (registry.GENERATOR_MODEL, registry.DISCRIMINATOR_MODEL)


def wait_until(condition, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_training_on_a_server_registers_models_that_load_and_probe(ray_local, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = train_args(tmp_path, mlflow_server.uri, experiment="server", max_steps=PROBE_STEPS, log_every=10,
                      sample_every=30, checkpoint_every=PROBE_STEPS, eval_every=PROBE_STEPS // 3, logged_models="champion-and-last")
    assert main(args) == 0

    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("server").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["model.preset"] == "pytorch-examples"
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == list(range(1, PROBE_STEPS + 1))
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    tags = run.data.tags
    assert tags["code.version"] == "0.1.0" and tags["ray.world_size"] == "1" and tags["ray.job_id"]
    assert tags["data.manifest"] == "digits" and len(tags["data.sha256"]) == 64
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert all(any("samples" in path and f"step+{step}+" in path for path in images) for step in (30, 60)), images

    # the artifacts are in the bucket behind the server, not on this machine
    bucket = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=mlflow_server.bucket, Prefix="mlflow/")["Contents"]]
    assert any(key.endswith("state_dict.pt") for key in keys) and any(key.endswith(".png") for key in keys)
    assert not (tmp_path / "mlruns").exists()

    mlflow.set_tracking_uri(mlflow_server.uri)
    version = client.get_model_version_by_alias("dcgan-generator", "latest")
    assert version.run_id == run_id and version.tags["step"] == str(PROBE_STEPS)
    # --logged-models champion-and-last: of the evaluations at 20, 40 and 60, the best's and the last's models only
    fid = client.get_metric_history(run_id, "eval/fid")
    best_step = min(fid, key=lambda m: (m.value, m.step)).step
    assert sorted(m.step for m in fid) == [20, 40, 60]
    logged = logged_models(client, run_id)
    assert sorted((m.name, int(m.tags["step"])) for m in logged) == sorted((n, s) for n in ("discriminator", "generator") for s in {best_step, 60})
    [champion] = [m for m in logged if m.name == "generator" and m.tags["step"] == str(best_step)]
    assert client.get_model_version_by_alias("dcgan-generator", "champion").source == f"models:/{champion.model_id}"
    assert ("eval/fid", best_step) in {(m.key, m.step) for m in champion.metrics}
    for name, batch, shape in (("dcgan-generator", torch.randn(7, 100), (7, 3, 32, 32)),
                               ("dcgan-discriminator", torch.randn(1, 3, 32, 32), (1,))):
        network = mlflow.pytorch.load_model(f"models:/{name}@latest").eval().to("cpu")  # a torch module, any batch
        with torch.no_grad():
            assert network(batch).shape == shape and network(batch[:1]).shape[0] == 1

    # the probe, as a user runs it, on the registered D; its results go to the training run
    output = tmp_path / "probe.json"
    probe = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.probe", "--discriminator", "models:/dcgan-discriminator@latest",
         "--dataset", "digits", "--tracking-uri", mlflow_server.uri, "--output-json", str(output),
         "--draws-for-c", "1", "--draws", "1", "--c-grid", "1e-4,1e-3,1e-2"],
        capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(output.read_text())
    assert set(result) == {"accuracy", "accuracy_50", "test_error_50", "feature_dims", "baselines", "protocol", "svm_fits", "stages"}
    assert result["feature_dims"] == 7168 and set(result["baselines"]) == {"raw_pixels", "random_d"}
    assert result["accuracy"] >= 0.80, result
    metric = client.get_metric_history(run_id, "probe/digits/accuracy")
    assert [(m.value, m.step) for m in metric] == [(result["accuracy"], PROBE_STEPS)]
    # ... and to the registered D itself: its LoggedModel's metrics and its version's tags (issue 32)
    d_version = client.get_model_version_by_alias("dcgan-discriminator", "latest")
    assert d_version.tags["probe.digits.accuracy"] == f"{result['accuracy']:.6g}"
    d_model_id = d_version.source.removeprefix("models:/")  # the LoggedModel of the last evaluated step
    assert d_model_id in {m.model_id for m in logged if m.source_run_id == run_id and m.name == "discriminator"}
    linked = {m.key: m.value for m in client.get_logged_model(d_model_id).metrics}
    assert linked["probe/digits/accuracy"] == result["accuracy"] and "probe/digits/accuracy_50_mean" in linked

    unknown = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.probe", "--discriminator", "models:/dcgan-discriminator@no-such-alias",
         "--dataset", "digits", "--tracking-uri", mlflow_server.uri],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    errors = [line for line in unknown.stderr.splitlines() if "error:" in line]
    assert unknown.returncode == 2 and len(errors) == 1 and "models:/dcgan-discriminator@no-such-alias" in errors[0], unknown.stderr
    # the run's evaluation named its best snapshot on the server too
    assert client.get_model_version_by_alias("dcgan-generator", "champion").tags["champion.step"] == str(best_step)


@pytest.mark.slow
def test_set_alias_points_at_a_version_and_refuses_latest(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    name = f"alias-test-{time.time_ns()}"
    client.create_registered_model(name)
    first = client.create_model_version(name, "s3://nowhere/a")
    client.create_model_version(name, "s3://nowhere/b")
    registry.set_alias(name, first.version, "champion", mlflow_server.uri)
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    with pytest.raises(TrackingError, match="latest"):
        registry.set_alias(name, first.version, "latest", mlflow_server.uri)


@pytest.mark.slow
def test_a_server_that_goes_away_costs_counted_metrics_not_the_run(mlflow_server, monkeypatch):
    """Stop the server while a RunLogger logs, restart it: logging calls keep returning, the
    buffer keeps the newest metrics, and what overflowed is counted in the run."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while the server is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = mlflow_server  # restarted on the same port and store, for the tests after this one
    try:
        ensure_experiment(server.uri, "outage")
        logger = RunLogger(server.uri, "outage", "outage", None, max_buffered_metrics=20)
        logger.log_metrics([(step, {"loss": float(step)}) for step in range(1, 11)])
        wait_until(lambda: logger.sender.pending() == 0, what="the first metrics to be sent")

        server.stop()
        for step in range(11, 61):  # 50 metrics into a buffer of 20 while nobody answers
            logger.log_metrics([(step, {"loss": float(step)})])
        wait_until(lambda: logger.sender.dropped()[0] >= 30, what="the overflow to be counted")
        server.start()
        logger.finish()

        client = MlflowClient(server.uri)
        steps = sorted(m.step for m in client.get_metric_history(logger.run_id, "loss"))
        dropped = client.get_metric_history(logger.run_id, "tracking/dropped_metrics")
        assert steps[:10] == list(range(1, 11)) and steps[-20:] == list(range(41, 61))
        assert len(steps) + dropped[-1].value == 60  # each metric was either sent or counted
        assert client.get_run(logger.run_id).info.status == "FINISHED"
    finally:
        if mlflow.active_run() is not None:
            mlflow.end_run()
        server.start()  # no-op when it runs


@pytest.mark.slow
def test_a_server_away_when_training_ends_costs_no_models(ray_local, mlflow_server, tmp_path, monkeypatch, capfd):
    """The server goes away at step 4 of 30 and stays away: training still succeeds (its
    evaluation's LoggedModel not logged, a warning), with the final models in its checkpoint and
    what the sender still held spilled next to it; once the server is back, `python -m
    dcgan_dist.register` delivers the spill (every step's losses once, nothing dropped) and logs
    and registers the models into the same run, and running it again finds nothing to do."""
    from dcgan_dist import register

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the workers get these too: fail fast while it is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    server, client = mlflow_server, MlflowClient(mlflow_server.uri)
    args = train_args(tmp_path, server.uri, experiment="away-at-end", run_name="away", max_steps=30, log_every=2,
                      checkpoint_every=15)
    run_ids = []

    def stop_the_server_once_the_run_logs():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("away-at-end")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and steps_of(client, runs[0].info.run_id, "loss_d"):
                run_ids.append(runs[0].info.run_id)
                server.stop()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=stop_the_server_once_the_run_logs, daemon=True)
    watcher.start()
    try:
        assert main(args) == 0
        watcher.join(timeout=10)
        assert run_ids and server.process.poll() is not None, "the server should have been down at the end"
    finally:
        server.start()
    console = capfd.readouterr().err
    assert "python -m dcgan_dist.register --storage-path" in console  # the warning says what to run
    assert "the models of step 30 were not logged" in console and "delivers them" in console, console[-3000:]
    [run_id] = run_ids
    assert client.get_run(run_id).data.tags.get("registered.step") is None  # nothing registered yet
    spilled = tmp_path / "ray_results" / "away" / SPILL_FOLDER / run_id
    assert any(path.suffix == ".jsonl" for path in spilled.iterdir())

    storage = ["--storage-path", str(tmp_path / "ray_results"), "--run-name", "away"]
    assert register.main(storage) == 0
    said = capfd.readouterr().out
    assert "Delivered " in said and "Delivered 0 metrics" not in said, said
    assert not list(spilled.iterdir())
    for name in ("loss_d", "loss_g"):
        assert steps_of(client, run_id, name) == list(range(1, 31)), name  # every step, once
    assert all(m.value == 0 for m in client.get_metric_history(run_id, "tracking/dropped_metrics"))
    grids = sorted(int(a.path.split("+step+")[1].split("+")[0]) for a in client.list_artifacts(run_id, "images")
                   if a.path.startswith("images/samples+") and a.path.endswith(".png"))
    assert grids == [0, 6, 12, 18, 24, 30], grids  # the untrained G's grid first
    # the models logged late are still linked to their evaluation (MLflow links the run's metrics of their step)
    mlflow.set_tracking_uri(server.uri)
    generators = [m for m in mlflow.search_logged_models(experiment_ids=[run_id_experiment(client, run_id)], output_format="list")
                  if m.source_run_id == run_id and m.name == "generator"]
    # The one register logged READY; an outage between MLflow's create and its upload leaves one that
    # never became READY (the server goes away once the run's first losses are visible: late on a busy machine).
    ready = [m for m in generators if m.status == LoggedModelStatus.READY]
    assert len(ready) == 1, [(m.model_id, str(m.status), m.tags) for m in generators]
    generator = ready[0]
    assert {(m.key, m.step) for m in generator.metrics} >= {("eval/fid", 30)}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered.step"] == "30"
    for name in ("dcgan-generator", "dcgan-discriminator"):
        latest = client.get_model_version_by_alias(name, "latest")
        assert latest.run_id == run_id and latest.tags["step"] == "30"
        assert client.get_model_version_by_alias(name, "champion").run_id == run_id  # the best snapshot, from the checkpoint
    versions = len(client.search_model_versions("name='dcgan-generator'"))

    # Registering again finds the models there: no new versions (re-running the training
    # command checks the same tag: loop.finish_run).
    capfd.readouterr()
    assert register.main(storage) == 0
    assert "nothing to do" in capfd.readouterr().out
    assert len(client.search_model_versions("name='dcgan-generator'")) == versions
    experiment_id = client.get_experiment_by_name("away-at-end").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]  # one run throughout


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_and_env_reach_no_file_and_no_console(ray_local, mlflow_server, s3_bucket, tmp_path,
                                                                              monkeypatch, capfd):
    """A password in --tracking-uri (http://user:password@, which MLflow's client sends as basic
    auth; the server ignores it) and an AWS secret key in the environment (S3 checkpoints): a
    run trains to its checkpoints and logs its models; a resume fails in its worker on an
    MLflow error that names the URL it requested; the next resume finishes the same run. Then
    neither secret, raw, URL-encoded or in a basic-auth header, is in any checkpoint, the
    server's database, log or artifacts, a file under tmp_path, or the console."""
    password, aws_secret = f"pw/{secrets.token_hex(12)}+=", f"{secrets.token_hex(16)}/aws+"  # characters a URI must encode
    needles = {password, urllib.parse.quote(password, safe=""), base64.b64encode(f"dcgan:{password}".encode()).decode(),
               aws_secret, urllib.parse.quote(aws_secret, safe="")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(QUIET_RUN_LINKS, "false")  # the preflight sets it for this process: restored afterwards
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)  # moto takes any key; the driver hands it to the workers
    proxy = FaultProxy(mlflow_server.uri).start()  # between the runs and the server: it refuses a request on cue
    uri = proxy.url.replace("http://", f"http://dcgan:{urllib.parse.quote(password, safe='')}@")
    storage = f"s3://{s3_bucket}/runs"

    def train(max_steps: int) -> int:
        args = train_args(tmp_path, uri, experiment="secrets", storage_path=storage, max_steps=max_steps, log_every=2,
                          sample_every=2, checkpoint_every=2, eval_every=0, max_failures=0) + ["--no-register-models"]
        return main(args)

    console = []
    try:
        assert train(2) == 0
        console.append(capfd.readouterr())
        # the resume's worker asks to mark the run RUNNING again: refused, its MLflow error names the URL
        proxy.schedule(Fault("slowdown", times=None, method="POST", path="/runs/update"))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the driver hands it to the worker: it fails at once
        assert train(4) == 1
        console.append(capfd.readouterr())
        proxy.schedule()
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        assert train(4) == 0  # the checkpoint's config has no password: the resume takes the URI from its command line
        console.append(capfd.readouterr())
    finally:
        proxy.stop()

    written = {str(path): path.read_bytes() for folder in (tmp_path, mlflow_server.folder) for path in folder.rglob("*") if path.is_file()}
    s3_client = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, aws_access_key_id="testing",
                             aws_secret_access_key="testing", region_name="us-east-1")
    for bucket in (s3_bucket, mlflow_server.bucket):  # the checkpoints; the server's artifacts (images, models)
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                written[f"s3://{bucket}/{item['Key']}"] = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    assert any(name.endswith(checkpoint.STATE_FILE) for name in written) and any("/artifacts/" in name for name in written)
    written |= {f"console {i} {stream}": getattr(output, stream).encode() for i, output in enumerate(console) for stream in ("out", "err")}
    leaked = sorted({name for name, content in written.items() for needle in needles if needle.encode() in content})
    assert not leaked, f"a secret is in {leaked}"

    [summary] = [line for line in console[1].err.splitlines() if "training failed (" in line]
    assert "training failed (rank 0: " in summary and f"{proxy.url}/api/2.0/mlflow/runs/update" in summary, summary
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["train.resumed_from_step"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_d")) == [1, 2, 3, 4]
    assert run.data.params["tracking.tracking_uri"] == proxy.url
    state = last_checkpoint_state(storage, "test")
    assert state["step"] == 4 and state["config"]["tracking.tracking_uri"] == proxy.url


def run_id_experiment(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id


def versions_of_run(client: MlflowClient, run_id: str) -> dict[str, list[tuple[str, str]]]:
    """{model: [(version, step)]} of the versions `run_id` registered."""
    return {name: sorted((v.version, v.tags.get("step")) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
            for name in MODELS}


@pytest.mark.slow
def test_a_server_lost_before_the_tags_are_sent_registers_no_model_twice(mlflow_server, monkeypatch):
    """The server goes away right after G and D (and the champion) are registered, before the
    run's buffered tags, `registered.step` among them, are sent. Doing the end again, as a re-run
    of the command or `python -m dcgan_dist.register` does, finds the versions in the registry:
    one version of each model for the run and each step, and the run then holds its tags."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while the server is down
    server, client = mlflow_server, MlflowClient(mlflow_server.uri)
    proxy = FaultProxy(server.uri).start()  # the run's way to the server
    # The tags' send is held on its way (registrations and aliases are other requests), and the
    # server stopped meanwhile: the tags never reach it.
    proxy.schedule(Fault("stall", times=None, method="POST", path="/runs/log-batch", seconds=120))
    architecture = Architecture.of("pytorch-examples", 32, "paper")
    generator, discriminator = architecture.build()
    best = evaluate.Best.capture(4, 0.5, *architecture.build())
    try:
        ensure_experiment(proxy.url, "lost-tags")
        logger = RunLogger(proxy.url, "lost-tags", "lost-tags", None, system_metrics=False)
        first = log_final_models(logger, architecture, generator, discriminator, 8, best, "digits")
        wait_until(lambda: proxy.injected["stall"] >= 1, what="the tags to be on their way")
        server.stop()
        proxy.stop()  # the held send is cut
        logger.abandon()  # as the end of training does when the server is away (loop.finish_run)
    finally:
        server.start()
        mlflow.set_tracking_uri(server.uri)
        if mlflow.active_run() is not None:
            mlflow.end_run("KILLED")  # the process that held it is gone
    run_id = logger.run_id
    assert client.get_run(run_id).data.tags.get("registered.step") is None  # the tags were lost
    registered = versions_of_run(client, run_id)
    assert {name: [step for _, step in versions] for name, versions in registered.items()} == {name: ["4", "8"] for name in MODELS}

    again = RunLogger(server.uri, "lost-tags", "", run_id, system_metrics=False)
    assert not holds_final_models(again, 8)
    assert log_final_models(again, architecture, generator, discriminator, 8, best, "digits") == first
    again.finish()
    assert versions_of_run(client, run_id) == registered  # nothing registered twice
    assert client.get_run(run_id).data.tags["registered.step"] == "8"
    for name in MODELS:
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.run_id == run_id and champion.tags["step"] == "4"


def registry_and_run(client: MlflowClient, run_id: str) -> tuple:
    """What re-running a finished run must leave as it was: every version of G and D with its
    tags, where each alias points, the run's LoggedModels, and the run's tags and status."""
    versions = sorted((v.name, v.version, v.run_id, sorted(v.tags.items()))
                      for name in MODELS for v in client.search_model_versions(f"name = '{name}'"))
    run = client.get_run(run_id)
    return (versions, {name: client.get_registered_model(name).aliases for name in MODELS}, run.data.tags, run.info.status,
            sorted(m.model_id for m in logged_models(client, run_id)))


def logged_models(client: MlflowClient, run_id: str, network: str = "", order_by: str = "") -> list:
    """The run's LoggedModels (of `network`), found with MLflow's own search (order_by: a metric, ascending)."""
    mlflow.set_tracking_uri(client.tracking_uri)
    where = f"source_run_id = '{run_id}'" + (f" AND name = '{network}'" if network else "")
    return mlflow.search_logged_models(experiment_ids=[run_id_experiment(client, run_id)], filter_string=where, output_format="list",
                                       order_by=[{"field_name": f"metrics.{order_by}", "ascending": True}] if order_by else None)


@pytest.mark.slow
def test_a_finished_run_re_run_at_or_below_its_step_says_so_and_changes_nothing(ray_local, mlflow_server, tmp_path,
                                                                                 monkeypatch, capfd):
    """Every evaluation (steps 4 and 8) logs G and D as LoggedModels with its metrics linked;
    the champion is registered from the best by eval/fid (MLflow's search agrees), @latest from
    step 8's. Then the command re-run with a lower --max-steps (a typo) or the same one says it
    is finished, and registers nothing, moves no alias, sets no tag, logs no model."""
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_server.uri)
    options = {"experiment": "finished", "run_name": "typo", "log_every": 4, "sample_every": 8, "checkpoint_every": 8,
               "eval_every": 4}
    assert main(train_args(tmp_path, mlflow_server.uri, max_steps=8, **options)) == 0
    [run] = client.search_runs([client.get_experiment_by_name("finished").experiment_id])
    run_id = run.info.run_id
    assert run.data.tags["registered.step"] == "8"
    assert [step for _, step in versions_of_run(client, run_id)[registry.GENERATOR_MODEL]][-1] == "8"
    logged = logged_models(client, run_id)
    assert sorted((m.name, m.tags["step"]) for m in logged) == [(n, s) for n in ("discriminator", "generator") for s in ("4", "8")]
    dataset = client.get_run(run_id).inputs.dataset_inputs[0].dataset
    for model in logged:  # each evaluation's metrics, linked to its models and the training data set
        linked = {(m.key, m.step, m.dataset_name, m.dataset_digest) for m in model.metrics}
        assert {(key, int(model.tags["step"]), dataset.name, dataset.digest) for key in ("eval/fid", "eval/kid")} <= linked, linked
    assert sorted(steps_of(client, run_id, "eval/fid")) == [4, 8]  # in the run's history once each
    best = logged_models(client, run_id, "generator", order_by="eval/fid")[0]
    for name, network in zip(MODELS, ("generator", "discriminator")):
        champion = client.get_model_version_by_alias(name, "champion")
        [source] = [m for m in logged if m.name == network and m.tags["step"] == best.tags["step"]]
        assert champion.source == f"models:/{source.model_id}" and champion.tags["step"] == best.tags["step"]
        [last] = [m for m in logged if m.name == network and m.tags["step"] == "8"]
        assert client.get_model_version_by_alias(name, "latest").source == f"models:/{last.model_id}"
    before = registry_and_run(client, run_id)

    for max_steps, said in ((4, "Run typo finished at step 8 (--max-steps 4 is below it): nothing to train"),
                            (8, "Run typo finished at step 8: nothing to train")):
        capfd.readouterr()
        assert main(train_args(tmp_path, mlflow_server.uri, max_steps=max_steps, **options)) == 0
        output = capfd.readouterr()
        assert said in output.out + output.err, output.err[-3000:]
        assert registry_and_run(client, run_id) == before, f"--max-steps {max_steps}"


def test_the_end_of_training_marks_failed_the_models_an_outage_left_pending(mlflow_sqlite):
    """A send cut between MLflow's create and its upload leaves a PENDING LoggedModel (CI met one);
    the end of training marks it FAILED and leaves the READY ones as they are."""
    ensure_experiment(mlflow_sqlite, "tests")
    logger = RunLogger(mlflow_sqlite, "tests", "pending", None, system_metrics=False)
    client = MlflowClient(mlflow_sqlite)
    experiment_id = client.get_run(logger.run_id).info.experiment_id
    cut = mlflow.initialize_logged_model(name="generator", source_run_id=logger.run_id, experiment_id=experiment_id,
                                         tags={registry.STEP_TAG: "4"})
    assert cut.status == LoggedModelStatus.PENDING
    architecture = Architecture.of("pytorch-examples", 32, "paper")
    log_final_models(logger, architecture, *architecture.build(), 8, None, "digits")
    logger.finish()
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{logger.run_id}'")
    assert sorted((m.name, m.tags[registry.STEP_TAG], m.status) for m in found) == [
        ("discriminator", "8", LoggedModelStatus.READY), ("generator", "4", LoggedModelStatus.FAILED), ("generator", "8", LoggedModelStatus.READY)]


def test_a_resumed_logger_skips_the_steps_the_run_already_holds(mlflow_sqlite):
    """What a restart after a crash relies on: steps 11..15 were logged before the crash and
    are trained again from the step-10 checkpoint; they are kept once, not logged twice."""
    ensure_experiment(mlflow_sqlite, "tests")
    first = RunLogger(mlflow_sqlite, "tests", "crashing", None)
    first.log_metrics([(step, {"loss_d": 1.0}) for step in range(1, 16)] + [(15, {"img_per_s": 1.0})])
    first.log_image(np.zeros((8, 8, 3), np.uint8), key="samples", step=12)
    first.finish("FAILED")

    resumed = RunLogger(mlflow_sqlite, "tests", "crashing", first.run_id)
    resumed.skip_logged(("loss_d", "img_per_s"), ("samples",))
    assert resumed.logged_through == {"loss_d": 15, "img_per_s": 15, "samples": 12}
    resumed.log_metrics([(step, {"loss_d": 2.0}) for step in range(11, 21)] + [(20, {"img_per_s": 2.0})])
    resumed.log_image(np.zeros((8, 8, 3), np.uint8), key="samples", step=12)
    resumed.finish()

    client = MlflowClient(mlflow_sqlite)
    history = sorted(client.get_metric_history(first.run_id, "loss_d"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.value for m in history] == [1.0] * 15 + [2.0] * 5
    assert steps_of(client, first.run_id, "img_per_s") == [15, 20]
    assert len([a for a in client.list_artifacts(first.run_id, "images") if a.path.endswith(".png")]) == 1
