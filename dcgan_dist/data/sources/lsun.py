"""LSUN from its released lmdb export (e.g. bedroom_train_lmdb/): keys -> encoded WebP/JPEG."""

from __future__ import annotations

import io
import os
from pathlib import Path

import lmdb
from PIL import Image

from dcgan_dist.data.sources import Source

_envs: dict[tuple[int, str], lmdb.Environment] = {}


def _env(path: str) -> lmdb.Environment:
    """One read-only environment per process (lmdb handles must not cross a fork)."""
    key = (os.getpid(), path)
    if key not in _envs:
        _envs[key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
    return _envs[key]


class _Loader:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, key: bytes) -> Image.Image:
        with _env(self.path).begin(write=False) as txn:
            value = txn.get(key)
        return Image.open(io.BytesIO(value))


def open_source(path: str | None) -> Source:
    if not path or not (Path(path) / "data.mdb").is_file():
        raise FileNotFoundError(f"--in {path}: not an lmdb folder (no data.mdb)")
    with _env(path).begin(write=False) as txn:
        keys = [key for key, _ in txn.cursor()]
    _envs.clear()  # the packer forks workers next; each opens its own
    return Source("lsun", keys, _Loader(path))
