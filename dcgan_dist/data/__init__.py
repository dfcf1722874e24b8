"""Training data: a source of images in [-1, 1] (3 x H x W), and an endless, rank-sharded,
resumable stream of batches from it.

`--data digits` (scikit-learn's bundled 8x8 digits) is the default; it needs no download.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dcgan_dist.data.digits import digits_dataset

SOURCES = {"digits": digits_dataset}


def open_dataset(data: str, image_size: int) -> Dataset:
    """The dataset named by --data. Unknown names raise KeyError (the preflight names it)."""
    return SOURCES[data](image_size)


def batch_stream(
    dataset: Dataset, per_worker_batch: int, rank: int, world_size: int, seed: int, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Endless batches for one rank. Every rank takes the same number of steps per epoch
    (DistributedSampler pads to equal shards; drop_last keeps batches full), and starting at
    `start_step` replays the exact order an uninterrupted run would have seen."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, which
    # would shift the latents of a resumed run against an uninterrupted one.
    loader = DataLoader(dataset, batch_size=per_worker_batch, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {per_worker_batch} on each of {world_size} workers")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        for (images,) in itertools.islice(loader, skip, None):
            yield images
        epoch, skip = epoch + 1, 0
