"""Any folder of images, searched recursively, in sorted path order."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from dcgan_dist.data.sources import Source, plain

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(root: Path) -> list[str]:
    """The image files under `root` as path strings, sorted. os.walk, not Path.rglob: rglob keeps a
    set of every path it yielded (400 B each, 1.2 GB for 3 M files) and stats each file."""
    paths: list[str] = []
    for folder, _, names in os.walk(root, followlinks=True):
        paths += [os.path.join(folder, name) for name in names if os.path.splitext(name)[1].lower() in EXTENSIONS]
    paths.sort()
    return paths


def open_source(path: str | None) -> Source:
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"--in {path}: not a folder")
    paths = image_paths(Path(path))
    if not paths:
        raise FileNotFoundError(f"--in {path}: no images ({', '.join(sorted(EXTENSIONS))})")
    return Source("folder", paths, plain(Image.open))
