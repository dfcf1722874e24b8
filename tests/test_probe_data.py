"""The probe's SVHN reader and the paper's Table 2 protocol, end to end on small .mat files in
SVHN's layout with the authors' own SVHN D; bad SVHN input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.io import savemat

from dcgan_dist.models import build_models
from dcgan_dist.probe import __main__ as probe
from dcgan_dist.probe import data as probe_data
from tests.cifar_standin import write_cifar_archive
from tests.test_authors import SHARED, needs_shared, write_random_weights
from tests.test_probe import write_checkpoint


def write_svhn_file(path: Path, count: int, seed: int) -> Path:
    """A .mat file in the layout of SVHN's: X 32 x 32 x 3 x N uint8, y N x 1 in 1..10 (10 = the
    digit 0); each class is its own random image plus noise."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3))
    digits = np.arange(count) % 10
    pixels = (templates[digits] + rng.normal(0, 10, size=(count, 32, 32, 3))).clip(0, 255).astype(np.uint8)
    savemat(path, {"X": pixels.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)})
    return path


def write_svhn(folder: Path, train: int = 200, test: int = 60) -> Path:
    folder.mkdir(exist_ok=True)
    write_svhn_file(folder / "train_32x32.mat", train, seed=1)
    write_svhn_file(folder / "test_32x32.mat", test, seed=2)
    return folder


def test_svhn_reader_gives_images_and_digits(tmp_path):
    splits = probe_data.load_svhn(write_svhn(tmp_path / "svhn"), 32)
    images, labels = splits.test
    assert images.shape == (60, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert labels.tolist() == [i % 10 for i in range(60)]  # label 10 is the digit 0
    assert len(splits.train[1]) == 180 and len(splits.val[1]) == 20  # 10 % of a small file held out


def test_svhn32_features_are_the_authors_pools_4_2_1():
    """svhn_semisup_analysis.py: the three conv layers max-pooled 4x4, 2x2, 1x1 (16x16, 8x8, 4x4
    maps): 16 x (64 + 128 + 256) = 7,168 dimensions."""
    _, discriminator = build_models("svhn32", 32, "paper")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    features = probe.extract_features(discriminator, images)
    with torch.no_grad():
        blocks = discriminator.eval().features(images)
    authors = torch.cat([F.max_pool2d(b, k).flatten(1) for b, k in zip(blocks, (4, 2, 1))], 1)
    assert features.shape == (3, 7168) and np.allclose(features, authors.numpy(), atol=1e-6)


@needs_shared
def test_svhn_protocol_with_the_authors_d_end_to_end(tmp_path, capsys):
    output = tmp_path / "svhn.json"
    assert probe.main(["--discriminator", f"authors:{SHARED}", "--dataset", "svhn", "--data-path", str(write_svhn(tmp_path / "svhn")),
                       "--per-class", "5", "--draws-for-c", "1", "--draws", "2", "--c-grid", "1e-3", "--no-mlflow", "--output-json", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["feature_dims"] == 7168
    assert result["accuracy"] is None  # Table 2 has no full-training-set SVM
    assert result["protocol"]["bn_stats"] == "reestimate"  # the default for the authors' weights
    assert result["test_error_5"]["mean"] == pytest.approx(1 - result["accuracy_5"]["mean"])
    assert result["baselines"]["raw_pixels"]["accuracy_5"] >= 0.9  # the templates: images and labels line up
    assert "test error" in capsys.readouterr().out


def test_cifar10_stand_in_with_an_imagenet32_authors_d_end_to_end(tmp_path, capsys):
    """Table 1's path at a reduced size: the CIFAR-10 archive's layout (tests/cifar_standin.py; 50 +
    10 images per batch instead of 10,000), the authors' imagenet32 D in their file layout (random
    weights), 28,672 float16 features, the full fit and the few-labels draws with the torch solver."""
    write_random_weights(tmp_path / "imagenet32", "imagenet32")
    archive = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", per_batch=50, test=100)
    output = tmp_path / "cifar10.json"
    assert probe.main(["--discriminator", f"authors:{tmp_path / 'imagenet32'}", "--dataset", "cifar10", "--data-path", str(archive),
                       "--per-class", "5", "--draws-for-c", "2", "--draws", "3", "--c-grid", "1e-3", "--no-mlflow",
                       "--output-json", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["feature_dims"] == 28_672 and result["accuracy"] is not None  # the full fit ran
    assert result["protocol"] | {"c_grid": None} == {"bn_stats": "reestimate", "feature_dtype": "float16", "c_grid": None,
                                                     "solver": "torch", "per_class": 5, "draws_for_c": 2, "draws": 3,
                                                     "fresh_draws": True}
    assert result["baselines"]["raw_pixels"]["accuracy"] >= 0.9  # the templates: images and labels line up
    assert "3 fresh draws (C on 2)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no-folder", "missing-test", "not-a-mat", "wrong-layout", "bad-labels"])
def test_bad_svhn_input_exits_2_naming_it(case, tmp_path, capsys):
    folder = write_svhn(tmp_path / "svhn", train=20, test=10)
    named = str(folder / "test_32x32.mat")
    if case == "no-folder":
        folder = named = str(tmp_path / "nowhere")
    elif case == "missing-test":
        (folder / "test_32x32.mat").unlink()
    elif case == "not-a-mat":
        (folder / "test_32x32.mat").write_text("not a mat file")
    elif case == "wrong-layout":  # N x 32 x 32 x 3, as another tool might save it
        savemat(folder / "test_32x32.mat", {"X": np.zeros((10, 32, 32, 3), np.uint8), "y": np.ones((10, 1), np.uint8)})
    elif case == "bad-labels":
        savemat(folder / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 10), np.uint8), "y": np.zeros((10, 1), np.uint8)})
    code = probe.main(["--discriminator", str(write_checkpoint(tmp_path / "ckpt")), "--dataset", "svhn",
                       "--data-path", str(folder), "--no-mlflow"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and named in errors[0], errors
