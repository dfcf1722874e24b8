"""ImageNet-1k from the ILSVRC train folder layout: train/n01440764/n01440764_10026.JPEG, ..."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from dcgan_dist.data.sources import Source, plain
from dcgan_dist.data.sources.folder import image_paths

SYNSET = re.compile(r"n\d{8}")


def open_source(path: str | None) -> Source:
    root = Path(path or "")
    if (root / "train").is_dir():
        root = root / "train"
    synsets = sorted(p for p in root.iterdir() if p.is_dir() and SYNSET.fullmatch(p.name)) if root.is_dir() else []
    if not synsets:
        raise FileNotFoundError(f"--in {path}: no ILSVRC synset folders (train/n01440764/...)")
    paths = [p for synset in synsets for p in image_paths(synset)]
    return Source("imagenet", paths, plain(Image.open))
