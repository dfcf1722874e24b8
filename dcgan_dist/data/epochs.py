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
one would from there on, without decoding what came before. A reader resumed after a resize
reads its stream of the epoch's new segment (split.py: the samples no rank had read, split over
the new ranks and loader workers); such a stream may hold many scattered pieces of a shard, read
in one pass over it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import IterableDataset

from dcgan_dist.data import raw, split, stream
from dcgan_dist.data.decode import decode_jpeg_batch, stack_images
from dcgan_dist.data.manifest import Manifest


class EpochBatches(IterableDataset):
    """Endless (images, counts, keys) batches of one rank, in plan order, from (start_epoch, start_step) on.

    `global_batch` is split over the ranks (split.rank_batches); `segments`: the start epoch's
    (split.resume_position), by default one from step 0 with this world size and loader count;
    the last must be this reader's."""

    def __init__(self, manifest: Manifest, global_batch: int, rank: int, world_size: int, seed: int,
                 start_epoch: int = 0, start_step: int = 0, loader_workers: int = 2, shuffle_buffer: int = 1000,
                 shard_retries: int = 3, decode: str = "cpu", segments: tuple[split.Segment, ...] | None = None):
        self.urls, self.expected = manifest.shard_urls, manifest.expected_samples()
        self.counts = [shard["num_samples"] for shard in manifest.shards]
        self.image_size, self.global_batch, self.rank, self.world_size, self.seed = manifest.image_size, global_batch, rank, world_size, seed
        self.loader_streams = max(loader_workers, 1)
        self.steps = split.check(self.counts, world_size, self.loader_streams, global_batch)
        self.batch = split.rank_batches(global_batch, world_size)[rank]
        self.segments = segments or (split.Segment(0, world_size, self.loader_streams),)
        if (self.segments[-1].world_size, self.segments[-1].loader_streams) != (world_size, self.loader_streams) or \
                self.segments[-1].from_step > start_step:
            raise split.SplitError(f"the last segment {self.segments[-1]} is not one of {world_size} ranks x {self.loader_streams} "
                                   f"streams begun by step {start_step}")
        self.start_epoch, self.start_step = start_epoch, start_step
        self.shuffle_buffer, self.shard_retries, self.decode = shuffle_buffer, shard_retries, decode
        self.image_keys, self.resize = manifest.image_keys, manifest.original_size  # an indexed manifest's (original-size images)
        # Where a batch is built: `batch_buffer(channels_last)` gives an N x 3 x H x W uint8 tensor
        # (handover.HandedOver sets it to the ring's `claim`: a loader worker builds each batch in
        # the shared-memory slot it hands over); None: a new tensor per batch.
        self.batch_buffer = None

    def plan(self, epoch: int, index: int) -> split.Stream:
        segments = split.segments_in(epoch, self.start_epoch, self.segments)
        return split.stream(self.counts, self.seed, epoch, self.global_batch, self.shuffle_buffer, segments, self.rank, index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, counters = stream._worker_id(), stream.Counters()
        from_step = self.segments[-1].from_step  # the start epoch's steps count from there
        for epoch in itertools.count(self.start_epoch):
            index = split.stream_of_worker(worker, epoch, self.steps, self.loader_streams, self.start_epoch, self.start_step, from_step)
            skip = split.batches_before(index, self.loader_streams, self.start_step - from_step) if epoch == self.start_epoch else 0
            for images, keys in self.stream_batches(self.plan(epoch, index), skip, counters):
                yield images, stream.counts_row(counters), "\n".join(keys)  # one string: the DataLoader converts each item

    def stream_batches(self, plan: split.Stream, skip: int, counters: stream.Counters) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """The stream's batches from batch `skip` on."""
        order = split.reading_order(plan.num_samples, self.shuffle_buffer, self.seed, plan.epoch, plan.rank, plan.index, plan.from_step)
        wanted = bytearray(plan.num_samples)  # positions still to hand out
        for position in order[skip * self.batch:]:
            wanted[position] = 1
        held = Held(read_positions(plan, wanted, self.urls, self.expected, counters, self.shard_retries, self.image_keys),
                    wanted, self.image_size)
        fill = Filler(self.batch, counters, plan, partial(stack_images, new_batch=self.batch_buffer) if self.decode == "cpu" else list)
        for first in range(skip * self.batch, plan.num_batches * self.batch, self.batch):
            positions = order[first:first + self.batch]
            held.read_through(max(positions))
            # a batch of grouped images is built where it is handed over, unless the filler still
            # holds places before it (it is then split into images, which must not live in the next slot)
            grouped = held.take_grouped(positions, self.batch_buffer if not fill.ready else None) if self.decode == "cpu" else None
            if grouped is not None:  # out of its groups: nothing to read, hold or check per image
                counters.samples += len(positions)
                yield from fill.add_batch(*grouped)
                continue
            samples = held.take_samples(positions)
            if self.decode == "cpu":  # a batch's JPEGs decoded in one call
                images = stream.decode_batch(samples, counters, self.image_size, self.resize)
            else:  # --decode gpu: the JPEGs go out encoded, the training process decodes them
                images = [sample and stream.encoded_jpeg(sample, counters) for sample in samples]
            yield from fill.add([sample and sample["__key__"] for sample in samples], images)
        fill.finish()


def read_positions(plan: split.Stream, wanted: bytearray, urls: list[str], expected: dict[str, int], counters: stream.Counters,
                   retries: int, image_keys: tuple[str, ...] | None = None) -> Iterator[tuple[int, dict | raw.Group | None]]:
    """(position, sample) for every wanted position of the stream, in position order; a grouped
    member's images in a piece that holds a wanted one come as one (first position, raw.Group);
    None for a sample its shard could not give. Shards with nothing wanted are not opened, and a
    shard is opened once for the consecutive pieces the stream has of it (after a resize, a
    stream may hold many scattered pieces of one shard)."""
    offset = 0
    for shard, pieces in itertools.groupby(plan.pieces, key=lambda piece: piece.shard):
        spans = []  # (piece, its first position) of the shard's pieces that hold a wanted position
        for piece in pieces:
            if any(wanted[offset:offset + piece.stop - piece.start]):
                spans.append((piece, offset))
            offset += piece.stop - piece.start
        if spans:
            yield from read_pieces(urls[shard], spans, wanted, expected, counters, retries, image_keys)


def read_pieces(url: str, spans: list[tuple[split.Piece, int]], wanted: bytearray, expected: dict[str, int], counters: stream.Counters,
                retries: int, image_keys: tuple[str, ...] | None = None) -> Iterator[tuple[int, dict | raw.Group | None]]:
    """read_positions() of one shard's pieces (in member order, each with its first position)."""
    done = member = 0  # pieces finished; images of the shard passed
    samples = stream.read_shards(iter([{"url": url}]), counters, expected, retries, groups=True, image_keys=image_keys)
    try:
        for sample in samples:
            count = len(sample) if isinstance(sample, raw.Group) else 1
            for piece, first in spans[done:]:  # a group may hold images of several pieces
                low, high = max(member, piece.start), min(member + count, piece.stop)  # its images in the piece
                if high > low:
                    position = first + low - piece.start
                    if count == 1:
                        if wanted[position]:
                            yield position, sample
                    elif any(wanted[position:position + high - low]):
                        yield position, sample.part(low - member, high - member)
                if piece.stop > member + count:
                    break
                done += 1
            member += count
            if done == len(spans):
                break
    finally:
        samples.close()  # the pieces may end before the shard does
    for piece, first in spans[done:]:  # what the shard could not give
        yield from ((position, None) for position in range(first + max(member, piece.start) - piece.start,
                                                           first + piece.stop - piece.start) if wanted[position])


class Run:
    """A held group's images: its first position, the group, a raw group's images as rows of
    bytes (None for JPEGs), and how many of them are still to hand out."""

    __slots__ = ("start", "group", "rows", "left")

    def __init__(self, start: int, group: raw.Group, left: int):
        self.start, self.group, self.left = start, group, left
        self.rows = group.pixels.reshape(len(group), -1).numpy() if type(group) is raw.RawGroup else None


class Held:
    """What a stream has read and not yet handed out, by position: samples (None for one its
    shard could not give) and runs of a group's images, each held from when it is read to its
    turn (at most a shuffle block, a batch and a group)."""

    def __init__(self, positioned: Iterator[tuple[int, dict | raw.Group | None]], wanted: bytearray, image_size: int):
        self.positioned, self.wanted, self.image_size = positioned, wanted, image_size
        self.samples: dict[int, dict | None] = {}
        self.runs: list[Run] = []  # in position order
        self.run_starts: list[int] = []
        self.read_to = 0  # every wanted position before it has been read

    def read_through(self, last: int) -> None:
        while self.read_to <= last:
            position, item = next(self.positioned)
            if not isinstance(item, raw.Group):
                self.samples[position], self.read_to = item, position + 1
                continue
            self.read_to = position + len(item)
            if type(item) is raw.RawGroup and item.pixels.shape[-2:] != (self.image_size, self.image_size):  # one by one: counted as corrupt
                self.samples.update((at, sample) for at, sample in enumerate(item.images(), position) if self.wanted[at])
            else:
                self.runs.append(Run(position, item, self.wanted[position:self.read_to].count(1)))
                self.run_starts.append(position)

    def run_of(self, position: int) -> Run:
        return self.runs[bisect.bisect_right(self.run_starts, position) - 1]

    def take_grouped(self, positions: list[int], batch_buffer=None) -> tuple[torch.Tensor, list[str]] | None:
        """The positions' images as one N x 3 x H x W batch, when every one is in a held run of
        groups of one kind, built in `batch_buffer(channels_last)` when given: raw rows copied
        (no tensor, dict or check per image), or JPEGs decoded in one call and stacked. None
        otherwise, and when a JPEG among them does not decode to the image size (take_samples
        then decodes them one by one, counting it)."""
        if not self.runs or self.samples and any(position in self.samples for position in positions):
            return None
        runs = [self.run_of(position) for position in positions]
        kinds = {type(run.group) for run in runs}
        if kinds == {raw.JpegGroup}:
            batch = decode_jpeg_batch([run.group.jpegs[position - run.start] for run, position in zip(runs, positions)],
                                      self.image_size, batch_buffer)
            if batch is None:
                return None
        elif kinds == {raw.RawGroup}:
            batch = batch_buffer(False) if batch_buffer is not None else \
                torch.empty((len(positions), 3, self.image_size, self.image_size), dtype=torch.uint8)
            rows = batch.view(len(positions), -1).numpy()
            for i, (run, position) in enumerate(zip(runs, positions)):
                rows[i] = run.rows[position - run.start]
        else:
            return None
        keys = []
        for run, position in zip(runs, positions):
            keys.append(run.group.keys[position - run.start])
            run.left -= 1
        self.release()
        return batch, keys

    def take_samples(self, positions: list[int]) -> list[dict | None]:
        """The positions' samples (a grouped image as a sample of its own: raw.Group.sample)."""
        samples = []
        for position in positions:
            if position in self.samples:
                samples.append(self.samples.pop(position))
                continue
            run = self.run_of(position)
            samples.append(run.group.sample(position - run.start))
            run.left -= 1
        self.release()
        return samples

    def release(self) -> None:
        """Drop the runs whose images have all been handed out (positions not wanted never are:
        a run is counted down from its wanted ones)."""
        if any(run.left <= 0 for run in self.runs):
            self.runs = [run for run in self.runs if run.left > 0]
            self.run_starts = [run.start for run in self.runs]


class Filler:
    """Full batches, a missing image's place taken by the last good one (the first, before any),
    across a stream's batches."""

    def __init__(self, batch: int, counters: stream.Counters, plan: split.Stream, collate):
        self.batch, self.counters, self.plan, self.collate = batch, counters, plan, collate
        self.ready: list[tuple[str, torch.Tensor] | None] = []
        self.last_good: tuple[str, torch.Tensor] | None = None

    def add_batch(self, images: torch.Tensor, keys: list[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """A batch with every image good, as it is (unless places before it still wait)."""
        if self.ready:
            yield from self.add(keys, list(images))
            return
        self.last_good = keys[-1], images[-1].clone()  # the batch may live in a ring slot, rewritten later
        yield images, keys

    def add(self, keys: list[str | None], images: list[torch.Tensor | None]) -> Iterator[tuple[torch.Tensor, list[str]]]:
        for key, image in zip(keys, images):
            if image is None:
                self.counters.repeated_samples += 1
                self.ready.append(self.last_good)
            else:
                if self.last_good is None:
                    self.ready = [entry or (key, image) for entry in self.ready]
                self.last_good = (key, image)
                self.ready.append(self.last_good)
        while self.last_good is not None and len(self.ready) >= self.batch:
            chunk, self.ready = self.ready[:self.batch], self.ready[self.batch:]
            yield self.collate([image for _, image in chunk]), [key for key, _ in chunk]

    def finish(self) -> None:
        if self.ready:
            plan = self.plan
            raise stream.DataError(f"no readable image among the {plan.num_samples} samples that rank {plan.rank} reads "
                                   f"in stream {plan.index} of epoch {plan.epoch}; check the shards with `shards inspect`")


def shard_keys(url: str, expected: dict[str, int], retries: int = 3, image_keys: tuple[str, ...] | None = None) -> list[str]:
    """The sample keys of one shard, in tar order (the images are not decoded; `image_keys`: an indexed manifest's)."""
    counters = stream.Counters()
    keys = [sample["__key__"] for sample in stream.read_shards(iter([{"url": url}]), counters, expected, retries, image_keys=image_keys)]
    if counters.bad_shards:
        raise ValueError(f"shard {url} gave {len(keys)} of the {expected.get(url)} samples its manifest lists; "
                         "check it with `python -m dcgan_dist.shards inspect`")
    return keys


def planned_keys(manifest: Manifest, seed: int, epoch: int, global_batch: int, shuffle_buffer: int,
                 segments: tuple[split.Segment, ...]) -> Iterator[tuple[int, str]]:
    """(rank, key) of every sample read in `epoch` from the start of the last of its `segments`
    (the whole epoch: one segment from step 0) by a run started there, per rank, per loader
    worker (worker 0 first), each in reading order. Reads the shards' tar headers."""
    counts = [shard["num_samples"] for shard in manifest.shards]
    urls, expected = manifest.shard_urls, manifest.expected_samples()
    place = {shard: at for at, shard in enumerate(split.shard_order(len(counts), seed, epoch))}
    keys: dict[int, list[str]] = {}
    for plan in split.streams(counts, seed, epoch, global_batch, shuffle_buffer, segments):  # worker w reads stream w from there
        if plan.pieces:  # the streams go through the epoch's shard sequence in order: drop the keys of shards behind
            keys = {shard: held for shard, held in keys.items() if place[shard] >= place[plan.pieces[0].shard]}
        positions = [(piece.shard, member) for piece in plan.pieces for member in range(piece.start, piece.stop)]
        for position in split.reading_order(plan.num_samples, shuffle_buffer, seed, epoch, plan.rank, plan.index, plan.from_step):
            shard, member = positions[position]
            if shard not in keys:
                keys[shard] = shard_keys(urls[shard], expected, image_keys=manifest.image_keys)
            yield plan.rank, keys[shard][member]
