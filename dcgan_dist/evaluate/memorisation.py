"""The memorisation check: are generated samples copies of training images?

For each sample, the L2 distance (in pixels) to its nearest training image, compared with the
same distance for real images the reference set does not contain. A generator that memorises
puts its samples much closer to the training images than new real images are (ratio well
below 1); the picture shows the closest sample/neighbour pairs, so a person can judge.
"""

from __future__ import annotations

import numpy as np
import torch

from dcgan_dist.util import grid_uint8


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


def memorisation_check(
    samples: torch.Tensor, train_images: torch.Tensor, held_out: torch.Tensor, pairs: int = 16
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics on the nearest-neighbour distances, and two pictures (HxWx3 uint8): `pairs`, the
    closest (sample, nearest training image) pairs side by side, and `distances`, the histogram
    of both distance distributions."""
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
    pictures = {"pairs": grid_uint8(tiles, nrow=8),  # 4 pairs a row
                "distances": histogram(sample_distance.numpy(), real_distance.numpy())}
    return metrics, pictures


def histogram(sample_distance: np.ndarray, real_distance: np.ndarray) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3), dpi=100)
    bins = np.linspace(0, max(sample_distance.max(), real_distance.max()), 40)
    axis.hist(sample_distance, bins=bins, alpha=0.6, density=True, label="generated -> nearest training image")
    axis.hist(real_distance, bins=bins, alpha=0.6, density=True, label="held-out real -> nearest training image")
    axis.set_xlabel("pixel L2 distance")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
