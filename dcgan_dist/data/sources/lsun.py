"""LSUN from its released lmdb export (e.g. bedroom_train_lmdb/): keys -> encoded WebP/JPEG.

Listing walks the keys only (about 3 M keys; the values, 43 GB for bedrooms, stay on disk), and
values are read one shard at a time: the packer opens the lmdb for a shard and closes it after,
so the pages of the memory map it touched leave the process (lmdb handles must not cross a fork
either, and each shard's are the process's own).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
from PIL import Image

from dcgan_dist.data.sources import Load, Source


def _open(path: str) -> lmdb.Environment:
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)


def list_keys(path: str) -> list[bytes]:
    """Every key in the lmdb's order, without reading a value."""
    env = _open(path)
    try:
        with env.begin(write=False) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))
    finally:
        env.close()


class _Reader:
    """Picklable: forked pack workers call it once per shard."""

    def __init__(self, path: str):
        self.path = path

    @contextmanager
    def __call__(self) -> Iterator[Load]:
        env = _open(self.path)
        try:
            with env.begin(write=False) as txn:
                yield lambda key: Image.open(io.BytesIO(txn.get(key)))  # get() copies the value out of the map
        finally:
            env.close()


def open_source(path: str | None) -> Source:
    if not path or not (Path(path) / "data.mdb").is_file():
        raise FileNotFoundError(f"--in {path}: not an lmdb folder (no data.mdb)")
    return Source("lsun", list_keys(path), _Reader(path))
