"""A stand-in for cifar-10-python.tar.gz: the real archive's layout (cifar-10-batches-py/ with
data_batch_1..5, test_batch and batches.meta, pickled dicts of b'data' uint8 N x 3072 and
b'labels'), synthetic pixels. Each class is its own random image plus noise, so a linear SVM can
learn the labels from the pixels. Never downloaded: written here.

    python -m tests.cifar_standin /tmp/cifar-10-python.tar.gz      # the real sizes: 5 x 10,000 + 10,000
"""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar_archive(path: Path, per_batch: int = 30, test: int = 60) -> Path:
    """The archive with `per_batch` images in each of the 5 training batches and `test` in test_batch."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, size=(10, 3, 1024))

    def batch(count: int) -> dict:
        labels = np.arange(count) % 10
        pixels = templates[labels] + rng.normal(0, 10, size=(count, 3, 1024)).astype(np.float32)
        return {b"batch_label": b"stand-in", b"data": pixels.clip(0, 255).astype(np.uint8).reshape(count, 3072),
                b"labels": labels.tolist()}

    def add(archive: tarfile.TarFile, name: str, document: dict) -> None:
        payload = pickle.dumps(document)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))

    with tarfile.open(path, "w:gz") as archive:
        for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
            add(archive, name, batch(count))
        add(archive, "batches.meta", {b"label_names": LABEL_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".tar.gz"):  # --help, say, would be taken for the archive's name
        sys.exit("usage: python -m tests.cifar_standin PATH.tar.gz   (writes CIFAR-10's 50,000 + 10,000 images, synthetic)")
    print(write_cifar_archive(Path(sys.argv[1]), per_batch=10_000, test=10_000))
