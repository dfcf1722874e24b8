"""CIFAR-10 from its standard python-version archive (cifar-10-python.tar.gz, or the extracted
cifar-10-batches-py folder): the one reader, for the packer (the 50,000 training images) and
the linear probe (training and test splits with labels).

The batches are pickles. They are read with an unpickler that builds only plain containers and
numpy arrays, so a file from elsewhere can run no code here.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dcgan_dist.data.sources import Source, plain

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
SAFE_GLOBALS = {  # what numpy arrays in a pickle are built from; nothing else may be called
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class CifarError(ValueError):
    """Not the CIFAR-10 python archive, named in one line."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data and numpy arrays)")
        return super().find_class(module, name)


def _unpickle(data: bytes) -> dict:
    return _ArraysOnly(io.BytesIO(data), encoding="bytes").load()


def read_batches(path: Path, names: list[str], require_all: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{batch name: (N x 32 x 32 x 3 uint8 pixels, N int64 labels)} for each of `names` found
    (every one, with `require_all`). CifarError naming the path and the problem."""
    raw: dict[str, bytes] = {}
    try:
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise CifarError(f"{path}: not a tar archive (expected cifar-10-python.tar.gz)")
            with tarfile.open(path) as archive:
                for member in archive.getmembers():
                    if member.isfile() and Path(member.name).name in names:
                        raw[Path(member.name).name] = archive.extractfile(member).read()
        elif path.is_dir():
            folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
            raw = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
        else:
            raise CifarError(f"{path}: no such file or folder")
        batches = {name: _unpickle(raw[name]) for name in names if name in raw}  # in the order of `names`
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        if isinstance(e, CifarError):
            raise
        raise CifarError(f"{path}: not the CIFAR-10 python archive ({e})") from None
    missing = [name for name in names if name not in batches]
    if missing and (require_all or len(missing) == len(names)):
        raise CifarError(f"{path}: not the CIFAR-10 python archive (missing {', '.join(missing)})")
    arrays = {}
    for name, batch in batches.items():
        if not (isinstance(batch, dict) and b"data" in batch and b"labels" in batch):
            raise CifarError(f"{path}: {name} has no b'data'/b'labels' (not the CIFAR-10 python archive)")
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        arrays[name] = (pixels, np.asarray(batch[b"labels"], dtype=np.int64))
    return arrays


def read_split(path: Path, split: str, require_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The "train" (data_batch_1..5) or "test" split: (N x 32 x 32 x 3 uint8, N labels)."""
    batches = read_batches(path, TRAIN_BATCHES if split == "train" else [TEST_BATCH], require_all)
    return np.concatenate([pixels for pixels, _ in batches.values()]), np.concatenate([labels for _, labels in batches.values()])


def _load(pixels: np.ndarray, index: int) -> Image.Image:
    return Image.fromarray(pixels[index], mode="RGB")


def open_source(path: str | None) -> Source:
    if not path:
        raise FileNotFoundError("--in: the CIFAR-10 python archive or folder is needed")
    try:
        pixels, _ = read_split(Path(path), "train", require_all=False)  # packs the batches there are
    except CifarError as e:
        raise FileNotFoundError(str(e)) from None
    return Source("cifar10", list(range(len(pixels))), plain(partial(_load, pixels)))
