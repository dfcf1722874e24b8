"""scikit-learn's bundled 8x8 digits (no --in needed)."""

from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from dcgan_dist.data.sources import Source, plain


def _load(pixels: np.ndarray, index: int) -> Image.Image:
    return Image.fromarray((pixels[index] * (255 / 16)).round().astype(np.uint8), mode="L")


def open_source(path: str | None) -> Source:
    pixels = load_digits().images  # (1797, 8, 8) in 0..16
    return Source("digits", list(range(len(pixels))), plain(partial(_load, pixels)))
