"""The probe's protocol on one set of features: D's BatchNorm statistics, the features (every conv
block max-pooled to 4x4), and the L2-SVM (svm.py) with C chosen on validation over the authors' draws (__main__.py runs it on the
trained D, a random D and the raw pixels; fidelity.md says why each choice is made).

Torch and numpy (scikit-learn for the liblinear solver).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dcgan_dist.authors.weights import reestimate_statistics
from dcgan_dist.models import Discriminator
from dcgan_dist.probe import svm
from dcgan_dist.probe.data import ProbeError

POOLED_SIDE = 4  # every block's features are max-pooled to 4x4
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
STATS_BATCH = 128  # the authors' infer_bnorm_stats(X, nbatch=128)
SCORE_CHUNK = 4096  # images scored at a time: the SVM's float64 copy of a split never exists


@torch.no_grad()
def set_bn_statistics(discriminator: Discriminator, images: torch.Tensor, bn_stats: str, device: str = "cpu") -> None:
    """`running`: keep the statistics D kept in training. `reestimate`: replace them by the mean
    over batches of 128 training images of each batch's mean and biased variance (the authors'
    infer_bnorm_stats, through authors.reestimate_statistics)."""
    if bn_stats == "reestimate":
        discriminator.to(device)
        reestimate_statistics(discriminator, (batch.to(device) for batch in images.split(STATS_BATCH)))


@torch.no_grad()
def extract_features(discriminator: Discriminator, images: torch.Tensor, batch_size: int = 256, device: str = "cpu",
                     dtype: type = np.float32) -> np.ndarray:
    """(N, feature_dims) of `dtype`: each conv block max-pooled to 4x4, flattened, concatenated;
    filled in place, so the only full copy is the result's."""
    discriminator.to(device).eval()  # BatchNorm uses its (running or re-estimated) statistics
    features = None
    for start in range(0, len(images), batch_size):
        blocks = discriminator.features(images[start : start + batch_size].to(device))
        chunk = torch.cat([F.adaptive_max_pool2d(b, POOLED_SIDE).flatten(1) for b in blocks], 1).cpu().numpy()
        if features is None:
            features = np.empty((len(images), chunk.shape[1]), dtype=dtype)
        features[start : start + len(chunk)] = chunk
    check_finite(features)
    return features


def check_finite(features: np.ndarray) -> None:
    for start in range(0, len(features), SCORE_CHUNK):
        if not np.isfinite(features[start : start + SCORE_CHUNK]).all():
            raise ProbeError(f"features beyond {features.dtype}'s range (largest {np.finfo(features.dtype).max:g}): "
                             "use --feature-dtype float32")


def raw_pixels(images: torch.Tensor, dtype: type = np.float32) -> np.ndarray:
    return images.flatten(1).numpy().astype(dtype)


# ---------------------------------------------------------------- the SVM


@dataclass
class SvmFits:
    """How every SVM of a probe is fit (svm.py's solvers) and how many fits did not converge."""

    solver: str = "torch"
    device: str = "cpu"
    max_iter: int = 0  # 0: the solver's own limit
    fits: int = 0
    iterations: int = 0  # Newton's (torch) or liblinear's, summed over the fits
    not_converged: int = 0

    def fit(self, features: np.ndarray, labels: np.ndarray, c: float) -> svm.LinearSvm:
        """One-vs-rest L2-SVM (squared hinge) on the features as they are, as the authors fit theirs."""
        return next(self.fit_grid(features, labels, (c,)))

    def fit_grid(self, features: np.ndarray, labels: np.ndarray, c_grid: tuple[float, ...]) -> Iterator[svm.LinearSvm]:
        """An SVM per C of `c_grid` on one training set, in the grid's order: the torch solver
        prepares the set once and starts each fit at the last's solution (svm.TorchSvm)."""
        limit = {"max_iter": self.max_iter} if self.max_iter else {}
        problem = svm.TorchSvm(features, labels, self.device) if self.solver == "torch" else None
        for c in c_grid:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", svm.SvmNotConverged)
                model = problem.fit(c, **limit) if problem else svm.fit_liblinear(features, labels, c, **limit)
            self.fits += 1
            self.iterations += model.iterations
            self.not_converged += not model.converged
            for warning in caught:
                if not issubclass(warning.category, svm.SvmNotConverged):
                    warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            yield model

    def counts(self) -> dict[str, Any]:
        return {"fits": self.fits, "iterations": self.iterations, "not_converged": self.not_converged, "solver": self.solver}


def accuracy(model: svm.LinearSvm, features: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of `labels` predicted, a chunk of float32 at a time (never a float64 copy of the split)."""
    weights, bias = model.coef_.T.astype(np.float32), model.intercept_.astype(np.float32)
    correct = 0
    for start in range(0, len(features), SCORE_CHUNK):
        scores = features[start : start + SCORE_CHUNK].astype(np.float32) @ weights + bias
        correct += int((model.classes_[scores.argmax(1)] == labels[start : start + SCORE_CHUNK]).sum())
    return correct / len(labels)


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in np.unique(labels)])


def full_fit(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], c_grid: tuple[float, ...],
             fits: SvmFits) -> dict[str, float]:
    """An SVM per C on the whole training split; the best on validation, scored on test."""
    best = (-1.0, 0.0, 0.0)
    for c, model in zip(c_grid, fits.fit_grid(features["train"], labels["train"], c_grid)):
        val_accuracy = accuracy(model, features["val"], labels["val"])
        if val_accuracy > best[0]:
            best = (val_accuracy, c, accuracy(model, features["test"], labels["test"]))
    return {"accuracy": best[2], "C": best[1], "val_accuracy": best[0]}


def score_draw(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], per_class: int, seed: int,
               c_grid: tuple[float, ...], fits: SvmFits) -> np.ndarray:
    """(C, 2): the validation and test accuracy of an SVM per C of `c_grid` on draw `seed` of
    `per_class` training images per class."""
    chosen = per_class_subset(labels["train"], per_class, seed)
    models = fits.fit_grid(np.asarray(features["train"][chosen]), labels["train"][chosen], c_grid)
    return np.array([(accuracy(model, features["val"], labels["val"]), accuracy(model, features["test"], labels["test"]))
                     for model in models])


def few_labels(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], per_class: int, draws_for_c: int,
               draws: int, c_grid: tuple[float, ...], fits: SvmFits, stages: Stages | None = None,
               name: str = "") -> dict[str, Any]:
    """The authors' protocol (svhn/svhn_semisup_analysis.py): for each C an SVM on each of
    `draws_for_c` draws of `per_class` labelled training images per class; the C of the best mean
    validation accuracy; then that C on `draws` fresh draws, whose test accuracies give the mean
    and std. `draws` 0: the test accuracies of the draws C was chosen on (this probe's earlier way)."""
    timed = stages.timed if stages else lambda *_: nullcontext()
    with timed(name, f"C search: {draws_for_c} draws x {len(c_grid)} C"):
        scores = np.stack([score_draw(features, labels, per_class, draw, c_grid, fits) for draw in range(draws_for_c)], axis=1)
    best = int(scores[:, :, 0].mean(1).argmax())  # scores: (C, draw, validation or test)
    if draws:  # seeds after the ones C was chosen on: fresh draws
        with timed(name, f"{draws} fresh draws"):
            tests = np.array([score_draw(features, labels, per_class, draws_for_c + draw, (c_grid[best],), fits)[0, 1]
                              for draw in range(draws)])
    else:
        tests = scores[best, :, 1]
    return {"mean": float(tests.mean()), "std": float(tests.std()), "C": c_grid[best],
            "val_accuracy": float(scores[best, :, 0].mean()), "per_class": per_class, "draws_for_c": draws_for_c,
            "draws": draws or draws_for_c, "fresh_draws": bool(draws)}


def probe_feature_set(name: str, featurize: Callable[[torch.Tensor], np.ndarray], splits, per_class: int, draws_for_c: int,
                      draws: int, c_grid: tuple[float, ...], with_full_fit: bool, fits: SvmFits, stages: Stages) -> dict[str, Any]:
    """The protocol for one feature set: features of every split, the few-labels SVMs and (when
    asked) the full-training-split SVM, each stage timed."""
    labels = {split: getattr(splits, split)[1] for split in ("train", "val", "test")}
    with stages.timed(name, "features"):
        features = {split: featurize(getattr(splits, split)[0]) for split in ("train", "val", "test")}
    result = {"dims": int(features["train"].shape[1]), "feature_bytes": int(sum(f.nbytes for f in features.values())),
              "few": few_labels(features, labels, per_class, draws_for_c, draws, c_grid, fits, stages, name)}
    if with_full_fit:
        with stages.timed(name, f"full fit: {len(labels['train']):,} x {len(c_grid)} C"):
            result |= full_fit(features, labels, c_grid, fits)
    return result


# ---------------------------------------------------------------- what each stage costs


RSS_SAMPLE_S = 0.05  # how often a stage's resident set is sampled


def memory_kib() -> tuple[int, int]:
    """(the resident set now, the process's peak) in KiB: Linux's VmRSS and VmHWM; elsewhere the
    peak (ru_maxrss) for both."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return peak, peak


class PeakWatch:
    """One stage's own peak resident set, leaving the process's peak alone (resetting VmHWM would
    also lower what getrusage and /usr/bin/time report): the process's new peak where the stage
    set one, else the largest resident set sampled every RSS_SAMPLE_S while it ran."""

    def __init__(self):
        self.largest, self.peak_before = memory_kib()
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self) -> None:
        while not self.done.wait(RSS_SAMPLE_S):
            self.largest = max(self.largest, memory_kib()[0])

    def stop(self) -> float:
        """The stage's peak in GiB."""
        self.done.set()
        self.sampler.join()
        now, peak = memory_kib()
        return (peak if peak > self.peak_before else max(self.largest, now)) / 2**20


@dataclass
class Stages:
    """Wall time and peak resident memory of each stage of a probe (its table; RESULTS' figures)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def timed(self, feature_set: str, stage: str) -> Iterator[None]:
        watch, began = PeakWatch(), time.perf_counter()
        try:
            yield
        finally:
            peak = watch.stop()
        row = {"feature_set": feature_set, "stage": stage, "seconds": round(time.perf_counter() - began, 1), "peak_rss_gb": round(peak, 2),
               "process_peak_rss_gb": round(memory_kib()[1] / 2**20, 2)}
        self.rows.append(row)
        print(f"probe: {feature_set}: {stage}: {row['seconds']:,.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
