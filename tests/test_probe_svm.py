"""The torch L2-SVM (dcgan_dist/probe/svm.py) against liblinear (scikit-learn's LinearSVC, as the
authors fit theirs) at the same C: the objective, the held-out labels and the accuracy; its stop
when it cannot converge; and the authors' draws (C on some draws, then fresh ones scored)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dcgan_dist.models import build_models
from dcgan_dist.probe import svm
from dcgan_dist.probe.data import load_digits_splits
from dcgan_dist.probe.protocol import SvmFits, extract_features, few_labels, score_draw

# The synthetic problem is 20,000 x 8,192 x 10 classes; CI affords this one (liblinear
# takes most of its time); benchmarks/probe_svm.py runs the full size and 45,000 x 28,672.
SYNTHETIC = (3000, 1024, 10)


def synthetic(samples: int, dims: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float16 features: a random mean per class, under unit noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, dims)).astype(np.float32)
    labels = rng.integers(0, classes, samples)
    return (0.15 * means[labels] + rng.normal(0, 1, (samples, dims)).astype(np.float32)).astype(np.float16), labels


def predictions(model: svm.LinearSvm, features: np.ndarray) -> np.ndarray:
    return model.classes_[(features.astype(np.float32) @ model.coef_.T + model.intercept_).argmax(1)]


def compare_with_liblinear(train: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray], c: float) -> None:
    ours, theirs = svm.fit_torch(*train, c), svm.fit_liblinear(*train, c)
    assert ours.converged and theirs.converged
    objective_ours, objective_theirs = svm.objective(*train, ours, c), svm.objective(*train, theirs, c)
    assert np.allclose(ours.objective, objective_ours, rtol=1e-6)  # the solver's own account of where it stopped
    assert np.abs(objective_ours / objective_theirs - 1).max() <= 1e-4, (objective_ours, objective_theirs)
    labels_ours, labels_theirs = predictions(ours, held_out[0]), predictions(theirs, held_out[0])
    assert (labels_ours == labels_theirs).mean() >= 0.995
    assert abs((labels_ours == held_out[1]).mean() - (labels_theirs == held_out[1]).mean()) <= 0.001


@pytest.fixture(scope="module")
def digits_features() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits through a random D (pytorch-examples, 7,168 features), as the probe holds them."""
    torch.manual_seed(0)
    _, discriminator = build_models("pytorch-examples", 32, "paper")
    splits = load_digits_splits(32)
    return {name: (extract_features(discriminator, images, dtype=np.float16), labels)
            for name, (images, labels) in (("train", splits.train), ("test", (torch.cat([splits.val[0], splits.test[0]]),
                                                                                np.concatenate([splits.val[1], splits.test[1]]))))}


@pytest.mark.parametrize("c", [1e-3, 1e-2])
def test_equals_liblinear_on_digits_features(digits_features, c):
    compare_with_liblinear(digits_features["train"], digits_features["test"], c)


@pytest.mark.parametrize("c", [1e-2])
def test_equals_liblinear_on_a_synthetic_problem(c):
    features, labels = synthetic(SYNTHETIC[0] + 2000, *SYNTHETIC[1:])
    compare_with_liblinear((features[:-2000], labels[:-2000]), (features[-2000:], labels[-2000:]), c)


def test_two_classes_are_one_classifier_for_the_second_as_liblinear():
    features, labels = synthetic(600, 64, 2)
    ours, theirs = svm.fit_torch(features, labels, 1e-2), svm.fit_liblinear(features, labels, 1e-2)
    assert ours.coef_.shape == theirs.coef_.shape == (1, 64)
    assert np.abs(svm.objective(features, labels, ours, 1e-2) / svm.objective(features, labels, theirs, 1e-2) - 1).max() <= 1e-4


def test_a_fit_that_stops_early_says_so():
    features, labels = synthetic(500, 64, 3)
    with pytest.warns(svm.SvmNotConverged, match="stopped after 1 Newton"):
        model = svm.fit_torch(features, labels, 1e-1, max_iter=1)
    assert not model.converged and model.iterations == 1
    fits = SvmFits(max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted, not re-raised
        fits.fit(features, labels, 1e-1)
    assert fits.counts() == {"fits": 1, "iterations": 1, "not_converged": 1, "solver": "torch"}


def test_the_authors_draws_choose_c_on_some_and_score_fresh_ones():
    features, labels = synthetic(900, 32, 3)
    splits = {"train": features[:600], "val": features[600:750], "test": features[750:]}
    split_labels = {"train": labels[:600], "val": labels[600:750], "test": labels[750:]}
    grid = (1e-4, 1e-2)
    fits = SvmFits()
    fresh = few_labels(splits, split_labels, 5, 2, 3, grid, fits)
    assert fits.fits == 2 * len(grid) + 3 and fresh["fresh_draws"] and fresh["draws"] == 3
    c_val = np.mean([score_draw(splits, split_labels, 5, seed, grid, SvmFits())[:, 0] for seed in (0, 1)], axis=0)
    assert fresh["C"] == grid[int(np.argmax(c_val))]
    scored = [score_draw(splits, split_labels, 5, seed, (fresh["C"],), SvmFits())[0, 1] for seed in (2, 3, 4)]  # not seeds 0 and 1
    assert (fresh["mean"], fresh["std"]) == pytest.approx((np.mean(scored), np.std(scored)))
    same = few_labels(splits, split_labels, 5, 2, 0, grid, SvmFits())
    chosen_on = [score_draw(splits, split_labels, 5, seed, grid, SvmFits())[grid.index(same["C"]), 1] for seed in (0, 1)]
    assert not same["fresh_draws"] and same["mean"] == pytest.approx(np.mean(chosen_on))


@pytest.mark.parametrize("path", ["primal", "gram factor"])
def test_a_c_grid_from_warm_starts_equals_fits_from_zero_in_fewer_newton_iterations(path, digits_features):
    """The probe fits every C of its grid on one training set (TorchSvm), each from the last's
    solution: the same objective as a fit from w = 0 (the stop stays relative to f's gradient at
    0), fewer iterations."""
    features, labels = synthetic(3000, 512, 10) if path == "primal" else digits_features["train"]
    grid = (1e-4, 1e-3, 1e-2)
    problem = svm.TorchSvm(features, labels)
    assert (problem.factor is None) == (path == "primal")
    warm = [problem.fit(c) for c in grid]
    cold = [svm.fit_torch(features, labels, c) for c in grid]
    for c, ours, reference in zip(grid, warm, cold):
        assert ours.converged and np.abs(ours.objective / reference.objective - 1).max() <= 1e-6
        assert np.abs(svm.objective(features, labels, ours, c) / reference.objective - 1).max() <= 1e-6
    assert sum(m.iterations for m in warm[1:]) < sum(m.iterations for m in cold[1:]), \
        ([m.iterations for m in warm], [m.iterations for m in cold])


@pytest.mark.parametrize("shape", [(900, 64), (300, 700)], ids=["primal", "gram factor"])
def test_x_read_in_many_chunks_gives_the_fit_of_one_chunk(shape, monkeypatch):
    """Full-size features are read a chunk at a time, each upcast into one reused buffer; the CI
    sizes fit in one chunk unless the chunk is made small."""
    features, labels = synthetic(*shape, 4)
    whole = svm.fit_torch(features, labels, 1e-2)
    monkeypatch.setattr(svm, "CHUNK_VALUES", 5000)  # 7-78 rows (or 16 columns of the Gram matrix) a chunk
    chunked = svm.fit_torch(features, labels, 1e-2)
    assert np.allclose(chunked.objective, whole.objective, rtol=1e-7)  # float32 sums in another order
    assert np.allclose(chunked.coef_, whole.coef_, rtol=1e-5, atol=1e-7)
