"""CIFAR-10 from its standard python-version archive (cifar-10-python.tar.gz, or the extracted
cifar-10-batches-py folder): the 50,000 training images of data_batch_1..5."""

from __future__ import annotations

import pickle
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dcgan_dist.data.sources import Source

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _read_batches(path: Path) -> np.ndarray:
    arrays = []
    if path.is_file():
        with tarfile.open(path) as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            for name in BATCHES:
                if name in members:
                    arrays.append(pickle.load(archive.extractfile(members[name]), encoding="bytes")[b"data"])
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for name in BATCHES:
            if (folder / name).is_file():
                with open(folder / name, "rb") as f:
                    arrays.append(pickle.load(f, encoding="bytes")[b"data"])
    if not arrays:
        raise FileNotFoundError(f"{path}: no CIFAR-10 data_batch_1..5 (expected cifar-10-python.tar.gz or cifar-10-batches-py/)")
    return np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N x 32 x 32 x 3 uint8


def _load(pixels: np.ndarray, index: int) -> Image.Image:
    return Image.fromarray(pixels[index], mode="RGB")


def open_source(path: str | None) -> Source:
    if not path:
        raise FileNotFoundError("--in: the CIFAR-10 python archive or folder is needed")
    pixels = _read_batches(Path(path))
    return Source("cifar10", list(range(len(pixels))), partial(_load, pixels))
