"""The L2-SVM probe: features, the CIFAR-10 archive reader, the protocol on a generated archive,
and bad input. (The probe of a trained D from a real MLflow server is in test_tracking.py.)"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgan_dist import checkpoint, choices
from dcgan_dist.data.sources import cifar10
from dcgan_dist.models import Architecture, build_models
from dcgan_dist.probe import __main__ as probe
from dcgan_dist.probe import protocol as probe_protocol
from dcgan_dist.step import make_optimizers
from tests.cifar_standin import write_cifar_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("preset", "expected"), [("imagenet32", 28_672), ("paper", 14_336), ("pytorch-examples", 7_168)])
def test_features_are_every_block_max_pooled_to_4x4(preset, expected):
    _, discriminator = build_models(preset, 32, "paper")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    features = probe.extract_features(discriminator, images)
    assert features.shape == (3, expected)
    # the first block's 4x4 max-pool is the first slice of the features
    first = torch.nn.functional.adaptive_max_pool2d(discriminator.features(images)[0], 4).flatten(1)
    assert np.allclose(features[:, : first.shape[1]], first.detach().numpy(), atol=1e-6)
    # eval-mode BatchNorm: an image's features do not depend on the rest of its batch
    assert np.allclose(probe.extract_features(discriminator, images[:1]), features[:1], atol=1e-5)


def test_reestimated_statistics_normalise_the_training_images_as_their_batch_would():
    """`reestimate` (the authors' infer_bnorm_stats): with the training images in one batch, eval-mode
    features equal the batch-statistics (train-mode) features; `running` keeps the trained ones."""
    _, discriminator = build_models("svhn32", 32, "paper")
    images = torch.rand(100, 3, 32, 32) * 2 - 1
    norm = discriminator.blocks[1][1]
    kept = norm.running_mean.clone()
    probe_protocol.set_bn_statistics(discriminator, images, "running")
    assert torch.equal(norm.running_mean, kept)
    with torch.no_grad():
        batch_statistics = [b.detach() for b in discriminator.train().features(images)]
    probe_protocol.set_bn_statistics(discriminator, images, "reestimate")
    assert not torch.allclose(norm.running_mean, kept)
    features = probe.extract_features(discriminator, images)
    expected = torch.cat([torch.nn.functional.adaptive_max_pool2d(b, 4).flatten(1) for b in batch_statistics], 1)
    assert np.allclose(features, expected.numpy(), atol=1e-4)


def test_default_c_grid_spans_the_authors_range():
    authors_c = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)  # svhn/svhn_semisup_analysis.py
    assert set(authors_c) <= set(choices.C_GRID)


def test_float16_features_hold_the_float32_values_and_overflow_is_named():
    _, discriminator = build_models("imagenet32", 32, "paper")
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    full = probe.extract_features(discriminator, images)
    half = probe.extract_features(discriminator, images, dtype=np.float16)
    assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
    assert np.allclose(half, full, rtol=1e-3, atol=1e-3)
    with pytest.raises(probe.ProbeError, match="--feature-dtype float32"):
        probe_protocol.check_finite(np.full((2, 3), np.inf, dtype=np.float16))  # as a float32 > 65504 casts


def test_device_cuda_without_cuda_exits_2_or_gives_the_cpu_features(tmp_path, capsys):
    if torch.cuda.is_available():  # a GPU machine: the same features as on the CPU
        _, discriminator = build_models("svhn32", 32, "paper")
        images = torch.rand(8, 3, 32, 32) * 2 - 1
        cpu = probe.extract_features(discriminator, images)
        assert np.allclose(probe.extract_features(discriminator, images, device="cuda"), cpu, atol=1e-3)
        return
    code = probe.main(["--discriminator", str(tmp_path), "--dataset", "digits", "--device", "cuda", "--no-mlflow"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "--device cuda" in errors[0]


def write_checkpoint(folder: Path, preset: str = "pytorch-examples", claimed_preset: str | None = None) -> Path:
    """A checkpoint as the training loop writes it (its architecture saying `claimed_preset`)."""
    generator, discriminator = build_models(preset, 32, "paper")
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    folder.mkdir()
    config = {"model.preset": claimed_preset or preset, "model.image_size": 32, "model.bn": "paper"}
    checkpoint.save(folder, rank=0, device=torch.device("cpu"), step=7, generator=generator, discriminator=discriminator, opt_g=opt_g,
                    opt_d=opt_d, mlflow_run_id=None, config=config, architecture=Architecture.of(claimed_preset or preset, 32, "paper"))
    return folder


def test_probe_on_a_cifar_archive_writes_the_json_document(tmp_path, capsys):
    archive = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    output = tmp_path / "probe.json"
    code = probe.main(["--discriminator", str(write_checkpoint(tmp_path / "ckpt")), "--dataset", "cifar10",
                       "--data-path", str(archive), "--per-class", "5", "--draws-for-c", "1", "--draws", "2", "--no-mlflow", "--c-grid", "1e-3,1e-2",
                       "--output-json", str(output)])
    assert code == 0
    result = json.loads(output.read_text())
    # the few-labels result is named by its count, --per-class 5, not the paper's 400
    assert set(result) == {"accuracy", "accuracy_5", "test_error_5", "feature_dims", "baselines", "protocol", "svm_fits", "stages"}
    # 3 feature sets x (2 draws x 2 C, 2 fresh draws, 2 C on the whole split)
    assert result["svm_fits"]["fits"] == 3 * (2 + 2 + 2) and result["svm_fits"]["iterations"] >= result["svm_fits"]["fits"]
    stages = [(row["feature_set"], row["stage"]) for row in result["stages"]]
    assert stages[:2] == [("all", "load cifar10"), ("both D", "BatchNorm statistics: running")]
    assert stages[2:] == [(name, stage) for name in ("discriminator", "random_d", "raw_pixels") for stage in
                          ("features", "C search: 1 draws x 2 C", "2 fresh draws", "full fit: 135 x 2 C")]
    assert all(row["seconds"] >= 0 and 0 < row["peak_rss_gb"] <= row["process_peak_rss_gb"] for row in result["stages"])
    assert set(result["accuracy_5"]) == {"mean", "std", "C"} and set(result["baselines"]) == {"raw_pixels", "random_d"}
    assert result["feature_dims"] == 7168
    assert result["protocol"] | {"c_grid": None} == {"bn_stats": "running", "feature_dtype": "float16", "c_grid": None,
                                                     "solver": "torch", "per_class": 5, "draws_for_c": 1, "draws": 2,
                                                     "fresh_draws": True}
    baselines = [v for b in result["baselines"].values() for v in b.values()]
    assert all(0.0 <= value <= 1.0 for value in (result["accuracy"], *baselines))
    assert result["baselines"]["raw_pixels"]["accuracy"] >= 0.9  # the colours: proof that images and labels line up
    printed = capsys.readouterr().out
    assert "trained D" in printed and "raw pixels" in printed and "random D" in printed
    assert "| raw_pixels | full fit: 135 x 2 C |" in printed  # the stage table (150 training images less 15 for validation)


def test_each_stage_reports_its_own_peak_memory_and_leaves_the_process_peak_alone():
    """The full-size probe's RESULTS row per stage: a stage reports the memory it held, even below
    an earlier stage's peak (sampled), and a stage that allocates nothing reports the memory in
    use then; the process's peak (what getrusage and /usr/bin/time report) is never reset."""
    stages = probe_protocol.Stages()
    for name, megabytes in (("800 MB", 800), ("400 MB", 400), ("nothing", 0)):
        with stages.timed("set", name):
            block = np.ones(megabytes * 2**20 // 8)
            time.sleep(0.3)  # longer than a few samples
            del block  # gone before the stage ends: only the samples saw it
    big, medium, small = (row["peak_rss_gb"] for row in stages.rows)
    assert big - medium >= 0.3 and medium - small >= 0.3, stages.rows
    assert probe_protocol.memory_kib()[1] / 2**20 >= big - 0.01 and stages.rows[-1]["process_peak_rss_gb"] >= big - 0.01


def test_probe_logs_to_the_checkpoints_run(tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    run_id = client.create_run(client.create_experiment("probe-target")).info.run_id
    folder = write_checkpoint(tmp_path / "ckpt")
    state = checkpoint.load_state(folder) | {"mlflow_run_id": run_id}
    torch.save(state, folder / checkpoint.STATE_FILE)
    archive = write_cifar_archive(tmp_path / "cifar.tar.gz")
    assert probe.main(["--discriminator", str(folder), "--dataset", "cifar10", "--data-path", str(archive),
                       "--per-class", "5",
                       "--draws-for-c", "1", "--draws", "1", "--c-grid", "1e-3,1e-2", "--tracking-uri", mlflow_sqlite, "--no-full-fit"]) == 0
    [metric] = client.get_metric_history(run_id, "probe/cifar10/accuracy_5_mean")
    assert metric.step == 7 and 0.0 <= metric.value <= 1.0
    metrics = client.get_run(run_id).data.metrics
    assert {"probe/cifar10/accuracy_5_std", "probe/cifar10/test_error_5_mean", "probe/cifar10/raw_pixels_5"} <= set(metrics)
    assert not any("_400" in key for key in metrics)  # named by --per-class
    assert "probe/cifar10/accuracy" not in metrics  # --no-full-fit: no SVM on the whole training split
    assert [a.path for a in client.list_artifacts(run_id, "probe")] == ["probe/cifar10.json"]


@pytest.mark.parametrize("case", ["text-file", "tar-without-batches", "missing-path", "not-a-checkpoint",
                                  "wrong-preset", "weights-of-another-preset", "unknown-model", "truncated-archive",
                                  "non-positive-c", "cuda-without-cuda"])
def test_bad_input_exits_2_naming_it(case, tmp_path, mlflow_sqlite, capsys):
    archive = write_cifar_archive(tmp_path / "cifar.tar.gz", per_batch=10, test=10)
    ckpt = tmp_path / "ckpt"
    args = {"--discriminator": str(ckpt), "--dataset": "cifar10", "--data-path": str(archive), "--no-mlflow": None}
    named = None
    if case == "text-file":
        (tmp_path / "notes.txt").write_text("not an archive")
        args["--data-path"] = named = str(tmp_path / "notes.txt")
        write_checkpoint(ckpt)
    elif case == "tar-without-batches":
        with tarfile.open(tmp_path / "other.tar", "w") as other:
            other.add(archive, arcname="something_else")
        args["--data-path"] = str(tmp_path / "other.tar")
        named = "data_batch_1"
        write_checkpoint(ckpt)
    elif case == "missing-path":
        args["--data-path"] = named = str(tmp_path / "nowhere.tar.gz")
        write_checkpoint(ckpt)
    elif case == "not-a-checkpoint":
        ckpt.mkdir()
        named = str(ckpt)
    elif case == "wrong-preset":
        write_checkpoint(ckpt)
        args["--preset"] = "imagenet32"
        named = "imagenet32"
    elif case == "weights-of-another-preset":
        write_checkpoint(ckpt, preset="pytorch-examples", claimed_preset="paper")
        named = "paper"
    elif case == "unknown-model":
        args["--discriminator"] = named = "models:/dcgan-discriminator@nope"
        args["--tracking-uri"] = mlflow_sqlite
    elif case == "truncated-archive":  # a download cut short
        data = archive.read_bytes()
        (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
        args["--data-path"] = named = str(tmp_path / "cut.tar.gz")
        write_checkpoint(ckpt)
    elif case == "non-positive-c":
        args["--c-grid"] = "1e-3,0"
        named = "--c-grid"
        write_checkpoint(ckpt)
    elif case == "cuda-without-cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is valid here")
        args["--device"] = "cuda"
        named = "--device cuda"
        write_checkpoint(ckpt)
    argv = [item for key, value in args.items() for item in ((key,) if value is None else (key, value))]
    assert probe.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not MLflow's INFO lines
    assert len(errors) == 1 and named in errors[0], errors


@pytest.mark.slow
def test_cli_bad_dataset_path_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.probe", "--discriminator", str(tmp_path), "--dataset", "cifar10"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2 and "--data-path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cifar_reader_runs_no_code_from_the_archive(tmp_path):
    """The batches are pickles: one that would call a function is refused, not run."""
    class Payload:
        def __reduce__(self):  # unpickling would call Path.touch: a file appearing means code ran
            return (Path.touch, (tmp_path / "ran",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(cifar10.CifarError, match="refusing"):
        cifar10.read_split(tmp_path, "test")
    assert not (tmp_path / "ran").exists()
    # the genuine layout reads: uint8 pixels N x 32 x 32 x 3 and the labels
    write_cifar_archive(tmp_path / "cifar.tar.gz", per_batch=10, test=20)
    pixels, labels = cifar10.read_split(tmp_path / "cifar.tar.gz", "test")
    assert pixels.shape == (20, 32, 32, 3) and pixels.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(20)]
