"""End to end: `dcgan_dist.train` on a real local Ray instance into a real sqlite MLflow store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from dcgan_dist import checkpoint
from dcgan_dist.data import pack
from dcgan_dist.models import build_models
from dcgan_dist.train import main
from tests.conftest import train_args

pytestmark = pytest.mark.slow


def only_run(client: MlflowClient, experiment: str = "tests"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def steps_of(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def latest_checkpoint_state(storage: Path, run_name: str = "test") -> dict:
    import ray.train

    result = ray.train.Result.from_path(str(storage / run_name))
    with result.checkpoint.as_directory() as directory:
        return checkpoint.load_state(directory)


def test_training_leaves_metrics_samples_and_registered_models(ray_local, mlflow_sqlite, tmp_path):
    import ray.train

    assert main(train_args(tmp_path, mlflow_sqlite)) == 0

    client = MlflowClient(mlflow_sqlite)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0002" and run.data.params["model.bn"] == "paper"
    assert run.data.params["derived.world_size"] == "1"
    # named for what it trains (--run-name stays Ray Train's resume key, kept as a tag)
    assert re.fullmatch(r"pytorch-examples-32px-digits-[0-9a-f]{6}", run.info.run_name), run.info.run_name
    assert run.data.tags["ray.run_name"] == "test"
    assert run.data.tags["mlflow.source.name"] == "dcgan_dist.train" and run.data.tags["mlflow.source.type"] == "LOCAL"
    # the Datasets panel: the bundled digits, their sha256 as the digest, in the training context
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits" and dataset_input.dataset.digest == run.data.tags["data.sha256"][:36]
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"
    for metric in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert steps_of(client, run.info.run_id, metric) == list(range(1, 13)), metric
    assert steps_of(client, run.info.run_id, "img_per_s") == [4, 8, 12]
    assert steps_of(client, run.info.run_id, "checkpoint/stall_s") == [6, 12]  # local storage: synchronous, with manifests
    assert (Path(ray.train.Result.from_path(str(tmp_path / "ray_results" / "test")).checkpoint.path) / "manifest-rank0.json").is_file()
    assert all(np.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "loss_d"))

    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in path and "step+6+" in path for path in images), images
    assert any("samples" in path and "step+12+" in path for path in images), images

    mlflow.set_tracking_uri(mlflow_sqlite)
    for name in ("dcgan-generator", "dcgan-discriminator"):
        version = client.get_model_version_by_alias(name, "latest")
        assert version.run_id == run.info.run_id
    # saved as TorchScript modules: real modules, loaded with no pickled Python (tests/test_registry.py)
    generator = mlflow.pytorch.load_model("models:/dcgan-generator@latest").eval()
    discriminator = mlflow.pytorch.load_model("models:/dcgan-discriminator@latest").eval()
    z = torch.rand(5, 100) * 2 - 1
    with torch.no_grad():
        images = generator(z)
        assert images.shape == (5, 3, 32, 32)
        logits = discriminator(images)
        assert logits.shape == (5,)

    # the shipped weights and architecture rebuild the full module (for D's per-layer features)
    folder = Path(mlflow.artifacts.download_artifacts("models:/dcgan-discriminator@latest")) / "extra_files"
    spec = json.loads((folder / "architecture.json").read_text())
    assert spec == {"preset": "pytorch-examples", "image_size": 32, "bn": "paper", "z_dim": 100}
    _, rebuilt = build_models(spec["preset"], spec["image_size"], spec["bn"])
    rebuilt.load_state_dict(torch.load(folder / "state_dict.pt", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(images), logits, atol=1e-5)


def test_resume_continues_the_same_run_and_state_past_a_corrupt_checkpoint_as_if_uninterrupted(ray_local, mlflow_sqlite, tmp_path, capfd):
    import ray.train

    storage = tmp_path / "ray_results"
    args = train_args(tmp_path, mlflow_sqlite, max_steps=20, checkpoint_every=10, log_every=5)
    assert main(args) == 0
    client = MlflowClient(mlflow_sqlite)
    first_run = only_run(client)
    state_20 = latest_checkpoint_state(storage)
    assert state_20["step"] == 20
    assert state_20["opt_d"]["state"][0]["step"].item() == 20  # Adam's own step count

    # The latest checkpoint cut short (a node lost while writing it): resume falls back to step 10.
    latest = Path(ray.train.Result.from_path(str(storage / "test")).checkpoint.path)
    state_file = latest / checkpoint.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    capfd.readouterr()
    assert main(train_args(tmp_path, mlflow_sqlite, max_steps=40, checkpoint_every=10, log_every=5)) == 0
    resumed = only_run(client)
    assert resumed.info.run_id == first_run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["train.resumed_from_step"] == "10"
    assert latest.name in resumed.data.tags["train.unreadable_checkpoints"]
    assert f"checkpoint {latest}" in capfd.readouterr().err  # the warning names the bad one
    # steps 11..40 continue the same metric history: no gap, no duplicate
    assert steps_of(client, resumed.info.run_id, "loss_d") == list(range(1, 41))
    state_40 = latest_checkpoint_state(storage)
    assert state_40["step"] == 40 and state_40["mlflow_run_id"] == first_run.info.run_id
    # the optimizer state was restored, not rebuilt: Adam counted all 40 updates
    assert state_40["opt_d"]["state"][0]["step"].item() == 40
    assert state_40["opt_g"]["state"][0]["step"].item() == 40

    # Full-state resume: 10 steps + 30 resumed steps = 40 steps straight (weights, Adam, RNG, data).
    assert main(train_args(tmp_path, mlflow_sqlite, max_steps=40, checkpoint_every=10, log_every=5, run_name="straight")) == 0
    straight_40 = latest_checkpoint_state(storage, "straight")
    for network in ("generator", "discriminator"):
        for key, tensor in straight_40[network].items():
            assert torch.allclose(state_40[network][key].float(), tensor.float(), atol=1e-5), (network, key)


def test_resume_from_shards_with_two_loader_workers_gives_the_uninterrupted_weights_bit_for_bit(ray_local, mlflow_sqlite, tmp_path):
    """Shards read by 2 loader processes (--sampling epochs, CPU, fp32): 6 steps straight, then the
    same run resumed from its step-3 checkpoint (the odd loader worker's turn next), end with the
    same weights to the bit. A DataLoader iterator that drew its workers' seed from the global RNG
    after the restore would shift every latent after the resume."""
    import ray.train

    packed = pack.pack("digits", None, str(tmp_path / "digits"), 32, shard_size=500, progress=False)
    args = train_args(tmp_path, mlflow_sqlite, data=packed["manifest"], loader_workers=2, shuffle_buffer=64, max_steps=6,
                      checkpoint_every=3, log_every=3, sample_every=6, eval_every=0) + ["--no-register-models"]
    storage = tmp_path / "ray_results"
    assert main(args) == 0
    straight = latest_checkpoint_state(storage)
    # Its step-6 checkpoint made unreadable (a node lost while writing it): the same command
    # resumes from step 3 and trains steps 4..6 again.
    latest = Path(ray.train.Result.from_path(str(storage / "test")).checkpoint.path)
    (latest / checkpoint.STATE_FILE).write_bytes(b"")
    assert main(args) == 0
    assert only_run(MlflowClient(mlflow_sqlite)).data.tags["train.resumed_from_step"] == "3"
    resumed = latest_checkpoint_state(storage)
    assert straight["step"] == resumed["step"] == 6
    assert resumed["data_position"] == straight["data_position"]
    for network in ("generator", "discriminator"):
        for key, tensor in straight[network].items():
            assert torch.equal(resumed[network][key], tensor), (network, key)


def test_two_workers_train_with_ddp(ray_local, mlflow_sqlite, tmp_path):
    assert main(train_args(tmp_path, mlflow_sqlite, num_workers=2, max_steps=8, log_every=4)) == 0
    client = MlflowClient(mlflow_sqlite)
    run = only_run(client)
    assert run.data.params["derived.world_size"] == "2"
    assert run.data.params["derived.per_worker_batch"] == "16"
    assert steps_of(client, run.info.run_id, "loss_g") == list(range(1, 9))


def test_unreachable_tracking_server_fails_before_ray(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", *train_args(tmp_path, "http://127.0.0.1:9")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "http://127.0.0.1:9" in result.stderr and "unreachable" in result.stderr
    assert "Ray" not in result.stdout + result.stderr


def test_unwritable_storage_path_fails_before_ray(tmp_path, mlflow_sqlite):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train",
         *train_args(tmp_path, mlflow_sqlite, storage_path=str(blocker / "results"))],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--storage-path" in result.stderr


def test_bn_sync_in_bf16_on_two_gloo_workers_trains_and_registers(ray_local, mlflow_sqlite, tmp_path):
    """--bn-sync --precision bf16 on CPU workers: GlobalBatchNorm2d's statistics in fp32 under
    autocast; 20 steps through the whole loop, losses finite and D's falling, models registered."""
    args = train_args(tmp_path, mlflow_sqlite, num_workers=2, max_steps=20, log_every=5, checkpoint_every=20,
                      precision="bf16", eval_every=0)
    assert main(args + ["--bn-sync"]) == 0
    client = MlflowClient(mlflow_sqlite)
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.data.params["perf.precision"] == "bf16"
    loss_d = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss_d"), key=lambda m: m.step)]
    assert len(loss_d) == 20 and all(np.isfinite(loss_d))
    assert np.mean(loss_d[-5:]) < np.mean(loss_d[:5]), loss_d
    assert [m.value for m in client.get_metric_history(run.info.run_id, "ddp/replica_spread")] == [0.0]
    for name in ("dcgan-generator", "dcgan-discriminator"):
        assert client.get_model_version_by_alias(name, "latest").run_id == run.info.run_id
    generator = mlflow.pytorch.load_model("models:/dcgan-generator@latest")
    with torch.no_grad():
        assert torch.isfinite(generator(torch.rand(5, 100) * 2 - 1)).all()


def test_compiled_models_train_under_ddp(ray_local, mlflow_sqlite, tmp_path):
    """--compile default with 2 gloo workers: G and D compiled after DDP wraps them, D's local
    module for G's pass compiled on its own. The run trains, registers plain-named models, and
    Dynamo compiled graphs without recompiling every step."""
    args = train_args(tmp_path, mlflow_sqlite, num_workers=2, max_steps=8, log_every=4, checkpoint_every=8,
                      compile="default", eval_every=0)
    assert main(args) == 0
    client = MlflowClient(mlflow_sqlite)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert steps_of(client, run.info.run_id, "loss_g") == list(range(1, 9))
    assert all(np.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "loss_d"))
    assert int(run.data.tags["compile.graphs"]) >= 3  # G, D under DDP, D's local module
    assert int(run.data.tags["compile.recompiles"]) <= 2, run.data.tags
    state = latest_checkpoint_state(tmp_path / "ray_results")
    _, discriminator = build_models("pytorch-examples", 32, "paper")
    assert state["discriminator"].keys() == discriminator.state_dict().keys()  # no _orig_mod. or module. prefixes


def test_no_telemetry_from_the_tests_or_ci(ray_local):
    """Ray records a session's usage-stats fields in its cluster metadata only when usage stats
    are on; the tests' Ray (and every process started beside it) runs with them off, as CI does."""
    import ray
    from ray._common.usage import usage_lib

    metadata = usage_lib.get_cluster_metadata(ray._private.worker.global_worker.gcs_client)
    assert metadata["ray_version"] == ray.__version__ and "session_start_timestamp_ms" not in metadata
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "RAY_USAGE_STATS_ENABLED=0" in ci and "MLFLOW_DISABLE_TELEMETRY=true" in ci
