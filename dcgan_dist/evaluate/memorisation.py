"""The memorisation check: are generated samples copies of training images?

For each sample, the L2 distance (in pixels) to its nearest image in the whole training set,
compared with the same distance for real images (their nearest *other* training image). A
generator that memorises puts its samples much closer to the training images than real images
are to each other (ratio well below 1); the picture shows the closest sample/neighbour pairs, so
a person can judge.

The training set is streamed: batches of it are compared with every query and a running minimum
kept (distance, position in the stream, the image itself), so a set of any size (LSUN's 3 million
bedrooms) needs memory for one batch and the queries only. The cost is one read of the set and
queries x images x pixels multiply-adds (benchmarks/evaluation.py measures it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from dcgan_dist.util import grid_uint8

# Two images closer than this are the same image: one 8-bit step (2/255 in [-1, 1]) in a single
# pixel is already 0.0078 away, and float64 distances of identical images are ~1e-5.
SAME_IMAGE = 1e-3
REFERENCE_BATCH = 1024  # training images compared at once when the set is given as one tensor


@dataclass
class Nearest:
    """Each query's nearest training image: distance, position in the stream, the image."""

    distance: torch.Tensor  # float64, (queries,)
    index: torch.Tensor  # int64, (queries,): the image's place in the order the set was read
    image: torch.Tensor  # (queries, C, H, W), on the CPU
    compared: int  # training images read


def nearest_training_images(queries: torch.Tensor, training_batches: Iterable[torch.Tensor], other_than_itself: torch.Tensor | None = None,
                            device: torch.device | str = "cpu") -> Nearest:
    """The nearest training image of each query, over batches of the training set read once
    (a chunked nearest-neighbour search with a running minimum). Distances in float64 so that an
    identical image is at ~0. Queries marked in `other_than_itself` (real images, which are in the
    training set) skip images identical to them: their nearest *other* image."""
    flat_queries = queries.flatten(1).to(device, torch.float64)
    best = Nearest(torch.full((len(queries),), torch.inf, dtype=torch.float64, device=device),
                   torch.full((len(queries),), -1, dtype=torch.long, device=device), torch.zeros_like(queries, device="cpu"), 0)
    skip = None if other_than_itself is None else other_than_itself.to(device)[:, None]
    for batch in training_batches:
        distances = torch.cdist(flat_queries, batch.flatten(1).to(device, torch.float64))
        if skip is not None:
            distances = distances.masked_fill(skip & (distances < SAME_IMAGE), torch.inf)
        distance, position = distances.min(dim=1)
        closer = distance < best.distance
        best.distance = torch.where(closer, distance, best.distance)
        best.index = torch.where(closer, position + best.compared, best.index)
        closer = closer.cpu()
        best.image[closer] = batch[position.cpu()[closer]].to(best.image.dtype)
        best.compared += len(batch)
    best.distance, best.index = best.distance.cpu(), best.index.cpu()
    return best


def memorisation_check(samples: torch.Tensor, training_images: torch.Tensor | Iterable[torch.Tensor], real_images: torch.Tensor,
                       pairs: int = 16, device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics on the nearest-neighbour distances, and two pictures (HxWx3 uint8): `pairs`, the
    closest (sample, nearest training image) pairs side by side, and `distances`, the histogram
    of both distance distributions. `training_images`: one tensor, or batches of the set read
    once (data.every_image); `real_images`: real images to compare with (in the training set or
    not: images identical to a real one are skipped for it)."""
    if isinstance(training_images, torch.Tensor):
        training_images = training_images.split(REFERENCE_BATCH)
    queries = torch.cat([samples.float().cpu(), real_images.float().cpu()])
    is_real = torch.arange(len(queries)) >= len(samples)
    nearest = nearest_training_images(queries, training_images, is_real, device)
    sample_distance, real_distance = nearest.distance[~is_real], nearest.distance[is_real]
    real_distance = real_distance[torch.isfinite(real_distance)]  # a set of one image has no other
    metrics = {
        "nn_distance_median": float(sample_distance.median()),
        "nn_distance_p05": float(sample_distance.quantile(0.05)),
        "real_nn_distance_median": float(real_distance.median()),
        "nn_distance_ratio": float(sample_distance.median() / real_distance.median()),
        "training_images": float(nearest.compared),
    }
    closest = sample_distance.argsort()[:pairs]
    tiles = torch.stack([image for i in closest for image in (samples[i].float().cpu(), nearest.image[i])])
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
