"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 0..16), scaled up.

Tiny and offline, so a first run and the tests need no download. Bilinear upscaling of 8x8
images gives soft digits; that is the data, not a bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from dcgan_dist.models import IMAGE_CHANNELS


def digits_dataset(image_size: int) -> TensorDataset:
    pixels = torch.from_numpy(load_digits().images).float().unsqueeze(1)  # (N, 1, 8, 8) in 0..16
    images = pixels / 8.0 - 1.0  # [-1, 1], as tanh outputs
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(-1.0, 1.0).repeat(1, IMAGE_CHANNELS, 1, 1).contiguous()
    return TensorDataset(images)
