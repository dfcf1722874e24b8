"""Any folder of images, searched recursively, in sorted path order."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dcgan_dist.data.sources import Source, plain

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def open_source(path: str | None) -> Source:
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"--in {path}: not a folder")
    paths = image_paths(Path(path))
    if not paths:
        raise FileNotFoundError(f"--in {path}: no images ({', '.join(sorted(EXTENSIONS))})")
    return Source("folder", paths, plain(Image.open))
