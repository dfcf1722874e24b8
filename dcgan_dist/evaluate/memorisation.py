"""The memorisation check: are generated samples copies of training images?

For each sample, the L2 distance (in pixels) to its nearest training image, compared with the
same distance for real images the reference set does not contain. A generator that memorises
puts its samples much closer to the training images than new real images are (ratio well
below 1); the picture shows the closest sample/neighbour pairs, so a person can judge.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest reference image, in pixel L2."""
    flat_reference = reference.flatten(1).float()
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        block = torch.cdist(queries[start : start + batch_size].flatten(1).float(), flat_reference)
        distance, index = block.min(dim=1)
        distances.append(distance)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def memorisation_check(samples: torch.Tensor, train_images: torch.Tensor, held_out: torch.Tensor, pairs: int = 16) -> tuple[dict[str, float], np.ndarray]:
    """Metrics on the nearest-neighbour distances, and an image of the `pairs` closest
    (sample, nearest training image) pairs, side by side, as HxWx3 uint8."""
    sample_distance, sample_index = nearest_distances(samples, train_images)
    real_distance, _ = nearest_distances(held_out, train_images)
    metrics = {
        "nn_distance_median": float(sample_distance.median()),
        "nn_distance_p05": float(sample_distance.quantile(0.05)),
        "real_nn_distance_median": float(real_distance.median()),
        "nn_distance_ratio": float(sample_distance.median() / real_distance.median()),
    }
    closest = sample_distance.argsort()[:pairs]
    tiles = torch.stack([image for i in closest for image in (samples[i], train_images[sample_index[i]])])
    grid = make_grid(tiles.float(), nrow=8, padding=2, normalize=True, value_range=(-1, 1))  # 4 pairs a row
    return metrics, (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
