"""Training data: a source of images in [-1, 1] (3 x H x W), and an endless, rank-sharded
stream of batches from it.

`--data digits` (scikit-learn's bundled 8x8 digits) is the default; it needs no download and
replays its exact order on resume. `--data PATH/manifest.json` or `s3://bucket/prefix/manifest.json`
streams WebDataset shards written by `python -m dcgan_dist.shards pack` (see stream.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dcgan_dist.data import split
from dcgan_dist.data.digits import digits_dataset
from dcgan_dist.data.split import Position

log = logging.getLogger(__name__)

SOURCES = {"digits": digits_dataset}


def open_dataset(data: str, image_size: int) -> Dataset:
    """The dataset named by --data. Unknown names raise KeyError (the preflight names it)."""
    return SOURCES[data](image_size)


def every_image(data: str, image_size: int, batch_size: int = 1024, loader_workers: int = 0) -> Iterator[torch.Tensor]:
    """The whole training set once, in its stored order, in batches, never all in memory (a
    bundled set is small; a manifest is streamed: stream.read_once). Raises ValueError when a
    manifest's images are not `image_size` px."""
    if data in SOURCES:
        yield from open_dataset(data, image_size).tensors[0].split(batch_size)
        return
    from dcgan_dist.data import manifest, stream

    shards = manifest.read(data)
    if shards.image_size != image_size:
        raise ValueError(f"{data}: its images are {shards.image_size} px, not {image_size}")
    yield from stream.read_once(shards, batch_size, loader_workers)


def batch_stream(
    dataset: Dataset, per_worker_batch: int, rank: int, world_size: int, seed: int, start_step: int = 0,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """Endless batches for one rank. Every rank takes the same number of steps per epoch
    (DistributedSampler pads to equal shards; drop_last keeps batches full), and starting at
    `start_step` replays the exact order an uninterrupted run would have seen."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, which
    # would shift the latents of a resumed run against an uninterrupted one.
    loader = DataLoader(dataset, batch_size=per_worker_batch, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {per_worker_batch} on each of {world_size} workers")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        for (images,) in itertools.islice(loader, skip, None):
            yield images
        epoch, skip = epoch + 1, 0


class InMemoryBatches:
    """batch_stream() over a bundled data set; nothing there is ever skipped."""

    def __init__(self, batches: Iterator[torch.Tensor], position: Position, per_rank_batch: int, world_size: int):
        self._batches, self.position = batches, position
        self.steps_per_epoch = position.steps_per_epoch
        self._state = ("epochs", world_size, 1, per_rank_batch)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        images = next(self._batches)
        self.position = self.position.next()
        return images

    def counts(self) -> dict[str, int]:
        from dcgan_dist.data.stream import COUNT_NAMES  # the names the loop reduces, whatever the source

        return dict.fromkeys(COUNT_NAMES, 0)

    def data_position(self) -> dict:
        return self.position.state(*self._state)


def open_batches(cfg, rank: int, world_size: int, start_step: int = 0, data_position: dict | None = None,
                 device: str | torch.device = "cpu"):
    """The batch iterator the training loop uses for `cfg.data.data`: an iterator of NCHW
    batches with `counts()` ({"corrupt_samples", "bad_shards", "samples", "repeated_samples"}
    so far), `position` (a split.Position: epoch and step of the next batch) and
    `data_position()` (the checkpoint's entry). A resumed run passes its checkpoint's
    `data_position` (shard manifests continue from it) and its step. Shard batches arrive on
    `device` (scaled there from uint8)."""
    # Pinned host memory lets the loop's .to(device, non_blocking=True) copy without a host sync.
    pin_memory = cfg.cluster.use_gpu
    per_rank_batch = split.rank_batches(cfg.loop.batch_size, world_size)[rank]
    if cfg.data.data in SOURCES:
        dataset = open_dataset(cfg.data.data, cfg.model.image_size)
        position = Position(*divmod(start_step, len(dataset) // cfg.loop.batch_size), len(dataset) // cfg.loop.batch_size)
        return InMemoryBatches(batch_stream(dataset, per_rank_batch, rank, world_size, cfg.loop.seed, start_step,
                                            pin_memory), position, per_rank_batch, world_size)
    from dcgan_dist.data import epochs, manifest, stream

    shards = manifest.read(cfg.data.data)
    streams = max(cfg.data.loader_workers, 1)
    epoch_batches = None
    if cfg.data.sampling == "epochs":
        steps = split.steps_per_epoch(shards.num_samples, cfg.loop.batch_size)
        position, changed = split.resume_position(data_position, start_step, steps, "epochs", world_size, streams)
        if changed:
            log.warning("resuming at epoch %d step %d, but %s: this epoch's split differs from the interrupted one's "
                        "(some of its samples may be read twice or not at all)", position.epoch, position.step, changed)
        epoch_batches = epochs.EpochBatches(shards, per_rank_batch, rank, world_size, cfg.loop.seed, position.epoch,
                                            position.step, cfg.data.loader_workers, cfg.data.shuffle_buffer, cfg.data.shard_retries,
                                            cfg.data.decode)
    return stream.ShardBatches(
        shards, per_rank_batch, rank, world_size, cfg.loop.seed, start_step,
        loader_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        shard_retries=cfg.data.shard_retries, pin_memory=pin_memory, epochs=epoch_batches, device=device,
        decode=cfg.data.decode, prefetch_batches=cfg.data.prefetch_batches,
    )
