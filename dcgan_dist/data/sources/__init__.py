"""Where the packer reads images from: one small module per source.

Each module has `open_source(path) -> Source`: `items` (cheap, picklable references: indices,
file paths, lmdb keys, in a fixed order) and `load(item) -> PIL.Image`. Shard k holds items
[k * shard_size, (k + 1) * shard_size), so a pack can resume shard by shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class Source:
    name: str
    items: list[Any]
    load: Callable[[Any], Image.Image]


def open_source(name: str, path: str | None) -> Source:
    from dcgan_dist.data.sources import cifar10, digits, folder, imagenet, lsun

    modules = {"digits": digits, "cifar10": cifar10, "lsun": lsun, "imagenet": imagenet, "folder": folder}
    return modules[name].open_source(path)


NAMES = ("digits", "cifar10", "lsun", "imagenet", "folder")
