"""Training data: a source of images in [-1, 1] (3 x H x W), and an endless, rank-sharded
stream of batches from it.

`--data digits` (scikit-learn's bundled 8x8 digits) is the default; it needs no download, and
split.py plans its epochs as it does a manifest's (each image a shard of one), so a resume
continues the epoch exactly, at any world size. `--data PATH/manifest.json` or `s3://bucket/prefix/manifest.json`
streams WebDataset shards written by `python -m dcgan_dist.shards pack`, or indexed by `shards
index` (see stream.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, TensorDataset

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
    if shards.original_size:  # indexed shards: resized as they are read
        shards = shards.at_size(image_size)
    if shards.image_size != image_size:
        raise ValueError(f"{data}: its images are {shards.image_size} px, not {image_size}")
    yield from stream.read_once(shards, batch_size, loader_workers)


def batch_stream(dataset: TensorDataset, global_batch: int, rank: int, world_size: int, seed: int, start_step: int = 0,
                 pin_memory: bool = False, segments: tuple[split.Segment, ...] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, their indices) batches of a bundled data set for one rank, from `start_step` on: split.py's plan
    with each image as a shard of one sample (the shard order shuffles the whole set every epoch;
    one stream per rank, no block shuffle on top), so every rank takes the same steps, the global
    batch is the same at any world size, and the start epoch's `segments` (split.resume_position)
    continue it exactly after a resize. Nothing is drawn from the global RNG."""
    images = dataset.tensors[0]
    counts = [1] * len(images)
    steps = split.check(counts, world_size, 1, global_batch)
    segments = segments or (split.Segment(0, world_size, 1),)
    start_epoch, step = divmod(start_step, steps)
    for epoch in itertools.count(start_epoch):
        in_epoch = split.segments_in(epoch, start_epoch, segments)
        plan = split.stream(counts, seed, epoch, global_batch, 1, in_epoch, rank, 0)
        indices = torch.tensor([piece.shard for piece in plan.pieces])  # one-sample shards: the image indices, in order
        batch = split.rank_batches(global_batch, world_size)[rank]
        skip = step - in_epoch[-1].from_step if epoch == start_epoch else 0
        for first in range(skip * batch, plan.num_batches * batch, batch):
            chosen = indices[first:first + batch]
            selected = images[chosen]
            yield (selected.pin_memory() if pin_memory else selected), chosen


class InMemoryBatches:
    """batch_stream() over a bundled data set; nothing there is ever skipped."""

    def __init__(self, dataset: TensorDataset, global_batch: int, rank: int, world_size: int, seed: int, position: Position,
                 segments: tuple[split.Segment, ...], pin_memory: bool = False):
        start_step = position.epoch * position.steps_per_epoch + position.step
        self._batches = batch_stream(dataset, global_batch, rank, world_size, seed, start_step, pin_memory, segments)
        self.position, self.start_epoch, self.segments = position, position.epoch, segments
        self.steps_per_epoch, self.global_batch = position.steps_per_epoch, global_batch
        self.batch_size = split.rank_batches(global_batch, world_size)[rank]
        self.keys: list[str] = []  # the last batch's image indices, as --sample-log records them

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        images, indices = next(self._batches)
        self.keys = [str(index) for index in indices.tolist()]
        self.position = self.position.next()
        return images

    def counts(self) -> dict[str, int]:
        from dcgan_dist.data.stream import COUNT_NAMES  # the names the loop reduces, whatever the source

        return dict.fromkeys(COUNT_NAMES, 0)

    def data_position(self) -> dict:
        return self.position.state("epochs", self.global_batch, split.segments_in(self.position.epoch, self.start_epoch, self.segments))


def open_batches(cfg, rank: int, world_size: int, start_step: int = 0, data_position: dict | None = None,
                 device: str | torch.device = "cpu"):
    """The batch iterator the training loop uses for `cfg.data.data`: an iterator of NCHW
    batches of this rank's share of the global batch (`batch_size`: split.rank_batches) with
    `counts()` ({"corrupt_samples", "bad_shards", "samples", "repeated_samples"} so far),
    `position` (a split.Position: epoch and step of the next batch) and `data_position()` (the
    checkpoint's entry). A resumed run passes its checkpoint's `data_position` and its step: the
    bundled sets and `--sampling epochs` continue the epoch exactly from it, at any world size and
    loader count. Shard batches arrive on `device` (scaled there from uint8)."""
    # Pinned host memory lets the loop's .to(device, non_blocking=True) copy without a host sync.
    pin_memory, global_batch = cfg.cluster.use_gpu, cfg.loop.batch_size
    if cfg.data.data in SOURCES:
        dataset = open_dataset(cfg.data.data, cfg.model.image_size)
        position, segments = resume(data_position, start_step, len(dataset), global_batch, world_size, 1)
        return InMemoryBatches(dataset, global_batch, rank, world_size, cfg.loop.seed, position, segments, pin_memory)
    from dcgan_dist.data import epochs, manifest, stream

    shards = manifest.read(cfg.data.data)
    if shards.original_size:  # indexed shards (`shards index`): every image centre-cropped and resized as it is read
        shards = shards.at_size(cfg.model.image_size)
    epoch_batches = None
    if cfg.data.sampling == "epochs":
        position, segments = resume(data_position, start_step, shards.num_samples, global_batch, world_size,
                                    max(cfg.data.loader_workers, 1))
        epoch_batches = epochs.EpochBatches(shards, global_batch, rank, world_size, cfg.loop.seed, position.epoch, position.step,
                                            cfg.data.loader_workers, cfg.data.shuffle_buffer, cfg.data.shard_retries, cfg.data.decode,
                                            segments)
    return stream.ShardBatches(
        shards, global_batch, rank, world_size, cfg.loop.seed, start_step,
        loader_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        shard_retries=cfg.data.shard_retries, pin_memory=pin_memory, epochs=epoch_batches, device=device,
        decode=cfg.data.decode, prefetch_batches=cfg.data.prefetch_batches,
    )


def resume(data_position: dict | None, start_step: int, num_samples: int, global_batch: int, world_size: int,
           loader_streams: int) -> tuple[Position, tuple[split.Segment, ...]]:
    """split.resume_position(), warning when the epoch cannot continue exactly."""
    steps = split.steps_per_epoch(num_samples, global_batch)
    position, segments, changed = split.resume_position(data_position, start_step, steps, global_batch, world_size, loader_streams)
    if changed:
        log.warning("resuming at epoch %d step %d, but %s: this epoch's split differs from the interrupted one's "
                    "(some of its samples may be read twice or not at all)", position.epoch, position.step, changed)
    return position, segments
