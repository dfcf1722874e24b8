"""The probe's labelled data sets, each as fixed training / validation / test splits of images in
[-1, 1] (N, 3, S, S) with integer labels: CIFAR-10 (the python archive), SVHN (the standard
`train_32x32.mat` / `test_32x32.mat`) and the digits bundled with scikit-learn.

Bad input (a path that is not the archive, a missing or malformed .mat file) raises ProbeError
naming it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch, scikit-learn and dcgan_dist.data load in the loaders below: the probe's parser reads
# DATASETS, and --help answers before torch loads.


@dataclass(frozen=True)
class DatasetProtocol:
    """What the probe runs on a data set: `per_class` labels per class in each draw; `full_fit`:
    also one SVM on the whole training split (the paper's 82.8 % on CIFAR-10; SVHN's Table 2 has none)."""

    per_class: int
    full_fit: bool
    validation: int  # images of the shuffled training set held out (10 % of a smaller file)


DATASETS = {
    "cifar10": DatasetProtocol(per_class=400, full_fit=True, validation=5000),
    # svhn/svhn_semisup_analysis.py: 100 per class, 10,000 held out (svhn/load.py)
    "svhn": DatasetProtocol(per_class=100, full_fit=False, validation=10000),
    "digits": DatasetProtocol(per_class=50, full_fit=True, validation=0),  # a stratified split instead
}
# svhn/svhn_semisup_analysis.py: C chosen on 10 draws of N per class, then 100 fresh draws scored with it
DRAWS_FOR_C, DRAWS = 10, 100
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


class ProbeError(ValueError):
    """Bad input, named in one line (exit code 2)."""


@dataclass
class Splits:
    """Images in [-1, 1] (N, 3, S, S) and integer labels, per split."""

    train: tuple[torch.Tensor, np.ndarray]
    val: tuple[torch.Tensor, np.ndarray]
    test: tuple[torch.Tensor, np.ndarray]


def images_from_hwc(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """N x 32 x 32 x 3 uint8 -> N x 3 x S x S in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if image_size != 32:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return images.contiguous()


def hold_out(pixels: np.ndarray, labels: np.ndarray, validation: int, image_size: int) -> tuple[tuple, tuple]:
    """(train, val): the last part of a fixed shuffle of the training file, `validation` images
    (10 % of a small, test-sized file) held out."""
    order = np.random.default_rng(0).permutation(len(labels))
    held_out = min(validation, len(labels) // 10)
    val, train = order[:held_out], order[held_out:]
    return ((images_from_hwc(pixels[train], image_size), labels[train]),
            (images_from_hwc(pixels[val], image_size), labels[val]))


def load_cifar10(path: Path, image_size: int) -> Splits:
    from dcgan_dist.data.sources import cifar10

    try:
        train_pixels, train_labels = cifar10.read_split(path, "train")
        test_pixels, test_labels = cifar10.read_split(path, "test")
    except cifar10.CifarError as e:
        raise ProbeError(f"--data-path {e}") from None
    train, val = hold_out(train_pixels, train_labels, DATASETS["cifar10"].validation, image_size)
    return Splits(train, val, (images_from_hwc(test_pixels, image_size), test_labels))


def read_svhn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file: X 32 x 32 x 3 x N uint8, y N x 1 in 1..10 (10 = the digit 0) ->
    (N x 32 x 32 x 3 uint8 pixels, the digits 0..9)."""
    from scipy.io import loadmat  # MATLAB v5 arrays only: nothing is unpickled or run
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise ProbeError(f"--data-path {path}: missing (SVHN needs {' and '.join(SVHN_FILES.values())} in the folder)")
    try:
        data = loadmat(path, variable_names=["X", "y"])
    except (MatReadError, ValueError, OSError, NotImplementedError, TypeError) as e:
        raise ProbeError(f"--data-path {path}: not a MATLAB .mat file scipy can read ({str(e).splitlines()[0][:100]})") from None
    pixels, labels = data.get("X"), data.get("y")
    if pixels is None or labels is None:
        raise ProbeError(f"--data-path {path}: no X and y arrays in it (not SVHN's {path.name})")
    if pixels.ndim != 4 or pixels.shape[:3] != (32, 32, 3) or pixels.dtype != np.uint8:
        raise ProbeError(f"--data-path {path}: X is {pixels.dtype} of shape {pixels.shape}, SVHN's is uint8 32 x 32 x 3 x N")
    labels = labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels
    if labels.shape != (pixels.shape[3],) or not np.isin(labels, np.arange(1, 11)).all():
        raise ProbeError(f"--data-path {path}: y must be N x 1 labels in 1..10 for X's N = {pixels.shape[3]} "
                         f"(got shape {data['y'].shape}, values {np.unique(labels)[:12].tolist()})")
    return pixels.transpose(3, 0, 1, 2), (labels % 10).astype(np.int64)


def load_svhn(folder: Path, image_size: int) -> Splits:
    """SVHN as the authors split it (svhn/load.py): 10,000 of the shuffled training file held out
    for validation, the rest training; the test file."""
    if not folder.is_dir():
        raise ProbeError(f"--data-path {folder}: not a folder (give the folder of {' and '.join(SVHN_FILES.values())})")
    train_pixels, train_labels = read_svhn_file(folder / SVHN_FILES["train"])
    test_pixels, test_labels = read_svhn_file(folder / SVHN_FILES["test"])
    train, val = hold_out(train_pixels, train_labels, DATASETS["svhn"].validation, image_size)
    return Splits(train, val, (images_from_hwc(test_pixels, image_size), test_labels))


def load_digits_splits(image_size: int) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from dcgan_dist.data.digits import digits_dataset

    images = digits_dataset(image_size).tensors[0]
    labels = load_digits().target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.30, stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=0.15 / 0.70, stratify=labels[rest], random_state=0)
    return Splits((images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test]))


def check_data_path(dataset: str, data_path: str | None) -> None:
    """ProbeError unless `data_path` is given where `dataset` needs one, exists, and is not given
    for the bundled digits (checked before D is loaded, so a wrong path fails at once)."""
    if dataset == "digits":
        if data_path:
            raise ProbeError("--data-path: digits are bundled with scikit-learn; give no path")
        return
    if not data_path:
        needed = "the path of cifar-10-python.tar.gz" if dataset == "cifar10" else f"the folder of {' and '.join(SVHN_FILES.values())}"
        raise ProbeError(f"--data-path: {dataset} needs {needed}")
    if not Path(data_path).expanduser().exists():
        raise ProbeError(f"--data-path {data_path}: no such file or folder")


def load_splits(dataset: str, data_path: str | None, image_size: int) -> Splits:
    """The splits of `dataset` (a key of DATASETS); ProbeError when the path does not fit."""
    check_data_path(dataset, data_path)
    if dataset == "digits":
        return load_digits_splits(image_size)
    path = Path(data_path).expanduser()
    return load_cifar10(path, image_size) if dataset == "cifar10" else load_svhn(path, image_size)
