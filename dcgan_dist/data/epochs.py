"""The epoch reader (`--sampling epochs`): each loader worker reads its stream of split.py's plan,
epoch after epoch, and hands out exactly the batches the plan gives it.

Per stream: open only the shards that still hold samples to hand out (through stream.read_shards:
retries, bad and truncated shards counted), pass over the tar members before a piece's start
without decoding them, keep each sample's bytes until its turn in the planned reading order (at
most --shuffle-buffer of them), decode a batch's samples together when their turn comes
(stream.decode_batch: the JPEGs in one call; corrupt images counted), and batch. A sample that
cannot be had (a corrupt image, an unreadable or short shard) keeps its place: the last good image
of the stream fills it (the first good one, at a stream's start), counted in `repeated_samples`. So
every stream gives exactly its planned number of batches, every rank the same number of steps (DDP
never waits on a rank that ran dry), and batch k of a stream is always made of the same planned
positions: a reader started at step t of an epoch (a resumed run) hands out what an uninterrupted
one would from there on, without decoding what came before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from dcgan_dist.data import split, stream
from dcgan_dist.data.decode import stack_images
from dcgan_dist.data.manifest import Manifest


class EpochBatches(IterableDataset):
    """Endless (images, counts, keys) batches of one rank, in plan order, from (start_epoch, start_step) on."""

    def __init__(self, manifest: Manifest, per_rank_batch: int, rank: int, world_size: int, seed: int,
                 start_epoch: int = 0, start_step: int = 0, loader_workers: int = 2, shuffle_buffer: int = 1000,
                 shard_retries: int = 3, decode: str = "cpu"):
        self.urls, self.expected = manifest.shard_urls, manifest.expected_samples()
        self.counts = [shard["num_samples"] for shard in manifest.shards]
        self.image_size, self.batch, self.rank, self.world_size, self.seed = manifest.image_size, per_rank_batch, rank, world_size, seed
        self.loader_streams = max(loader_workers, 1)
        self.steps = split.check(self.counts, world_size, self.loader_streams, per_rank_batch)
        self.start_epoch, self.start_step = start_epoch, start_step
        self.shuffle_buffer, self.shard_retries, self.decode = shuffle_buffer, shard_retries, decode

    def plan(self, epoch: int, index: int) -> split.Stream:
        return split.stream(self.counts, self.seed, epoch, self.world_size, self.loader_streams, self.batch, self.rank, index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, counters = stream._worker_id(), stream.Counters()
        for epoch in itertools.count(self.start_epoch):
            index = split.stream_of_worker(worker, epoch, self.steps, self.loader_streams, self.start_epoch, self.start_step)
            skip = split.batches_before(index, self.loader_streams, self.start_step) if epoch == self.start_epoch else 0
            for images, keys in self.stream_batches(self.plan(epoch, index), skip, counters):
                yield images, stream.counts_row(counters), "\n".join(keys)  # one string: the DataLoader converts each item

    def stream_batches(self, plan: split.Stream, skip: int, counters: stream.Counters) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """The stream's batches from batch `skip` on."""
        order = split.reading_order(plan.num_samples, self.shuffle_buffer, self.seed, plan.epoch, plan.rank, plan.index)
        first = skip * self.batch
        wanted = bytearray(plan.num_samples)  # positions still to hand out
        for position in order[first:]:
            wanted[position] = 1
        samples = in_turn(order, first, read_positions(plan, wanted, self.urls, self.expected, counters, self.shard_retries))
        chunks = iter(lambda: list(itertools.islice(samples, self.batch)), [])  # a batch's samples decoded together
        if self.decode == "cpu":
            decoded = ((sample and sample["__key__"], image) for chunk in chunks
                       for sample, image in zip(chunk, stream.decode_batch(chunk, counters, self.image_size)))
            yield from fill_batches(decoded, self.batch, counters, plan)
        else:  # --decode gpu: the JPEGs go out encoded, the training process decodes them
            encoded = ((sample and sample["__key__"], sample and stream.encoded_jpeg(sample, counters))
                       for chunk in chunks for sample in chunk)
            yield from fill_batches(encoded, self.batch, counters, plan, collate=list)


def read_positions(plan: split.Stream, wanted: bytearray, urls: list[str], expected: dict[str, int],
                   counters: stream.Counters, retries: int) -> Iterator[tuple[int, dict | None]]:
    """(position, sample) for every wanted position of the stream, in position order; None for a
    sample its shard could not give. Shards with nothing wanted are not opened."""
    offset = 0
    for piece in plan.pieces:
        size = piece.stop - piece.start
        if any(wanted[offset:offset + size]):
            reached = 0  # members of the piece passed so far
            samples = stream.read_shards(iter([{"url": urls[piece.shard]}]), counters, expected, retries)
            try:
                for member, sample in enumerate(samples):
                    if member >= piece.start:
                        reached = member - piece.start + 1
                        if wanted[offset + reached - 1]:
                            yield offset + reached - 1, sample
                        if reached == size:
                            break
            finally:
                samples.close()  # a piece may end before its shard does
            yield from ((position, None) for position in range(offset + reached, offset + size) if wanted[position])
        offset += size


def in_turn(order: list[int], first: int, positioned: Iterator[tuple[int, dict | None]]) -> Iterator[dict | None]:
    """Samples in the planned order from turn `first` on, each held from when it is read to its turn."""
    held: dict[int, dict | None] = {}
    turn = first
    for position, sample in positioned:
        held[position] = sample
        while turn < len(order) and order[turn] in held:
            yield held.pop(order[turn])
            turn += 1


def fill_batches(decoded: Iterator[tuple[str | None, torch.Tensor | None]], batch: int, counters: stream.Counters,
                 plan: split.Stream, collate=stack_images) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Full batches, a missing image's place taken by the last good one (the first, before any)."""
    ready: list[tuple[str, torch.Tensor] | None] = []
    last_good = None
    for key, image in decoded:
        if image is None:
            counters.repeated_samples += 1
            ready.append(last_good)
        else:
            if last_good is None:
                ready = [entry or (key, image) for entry in ready]
            last_good = (key, image)
            ready.append(last_good)
        while last_good is not None and len(ready) >= batch:
            chunk, ready = ready[:batch], ready[batch:]
            yield collate([image for _, image in chunk]), [key for key, _ in chunk]
    if ready:
        raise stream.DataError(f"no readable image among the {plan.num_samples} samples that rank {plan.rank} reads "
                               f"in stream {plan.index} of epoch {plan.epoch}; check the shards with `shards inspect`")


def shard_keys(url: str, expected: dict[str, int], retries: int = 3) -> list[str]:
    """The sample keys of one shard, in tar order (the images are not decoded)."""
    counters = stream.Counters()
    keys = [sample["__key__"] for sample in stream.read_shards(iter([{"url": url}]), counters, expected, retries)]
    if counters.bad_shards:
        raise ValueError(f"shard {url} gave {len(keys)} of the {expected.get(url)} samples its manifest lists; "
                         "check it with `python -m dcgan_dist.shards inspect`")
    return keys


def planned_keys(manifest: Manifest, seed: int, epoch: int, world_size: int, loader_workers: int, per_rank_batch: int,
                 shuffle_buffer: int) -> Iterator[tuple[int, str]]:
    """(rank, key) of every sample read in `epoch` by a run started at its beginning, per rank,
    per loader worker (worker 0 first), each in reading order. Reads the shards' tar headers."""
    reader = EpochBatches(manifest, per_rank_batch, 0, world_size, seed, epoch, 0, loader_workers, shuffle_buffer)
    keys: dict[int, list[str]] = {}
    for rank in range(world_size):
        reader.rank = rank
        for worker in range(reader.loader_streams):
            plan = reader.plan(epoch, split.stream_of_worker(worker, epoch, reader.steps, reader.loader_streams, epoch, 0))
            positions = [(piece.shard, member) for piece in plan.pieces for member in range(piece.start, piece.stop)]
            for position in split.reading_order(plan.num_samples, shuffle_buffer, seed, epoch, rank, plan.index):
                shard, member = positions[position]
                if shard not in keys:
                    keys[shard] = shard_keys(reader.urls[shard], reader.expected)
                yield rank, keys[shard][member]
