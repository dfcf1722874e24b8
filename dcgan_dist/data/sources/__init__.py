"""Where the packer reads images from: one small module per source.

Each module has `open_source(path) -> Source`: `items` (cheap, picklable references: indices,
file paths, lmdb keys, in a fixed order; never the images' bytes) and `reader()`, a context
manager the packer holds while it builds one shard, giving `load(item) -> PIL.Image`. Shard k
holds items [k * shard_size, (k + 1) * shard_size), so a pack can resume shard by shard, and
what a reader opens (an lmdb's memory map) is let go after each shard.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from PIL import Image

Load = Callable[[Any], Image.Image]


@dataclass
class Source:
    name: str
    items: list[Any]
    reader: Callable[[], AbstractContextManager[Load]]


def plain(load: Load) -> Callable[[], AbstractContextManager[Load]]:
    """The reader of a source that needs nothing opened per shard."""
    return lambda: nullcontext(load)


def open_source(name: str, path: str | None) -> Source:
    from dcgan_dist.data.sources import cifar10, digits, folder, imagenet, lsun

    modules = {"digits": digits, "cifar10": cifar10, "lsun": lsun, "imagenet": imagenet, "folder": folder}
    return modules[name].open_source(path)

