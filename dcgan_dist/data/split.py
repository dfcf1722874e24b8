"""The epoch plan: which samples each rank and loader worker reads, in which order (pure, no I/O).

For an epoch, from the manifest's per-shard sample counts alone:

1. the shard list is shuffled with a seed every rank shares (seed, epoch) and read as one
   sequence of samples;
2. every rank takes the same quota, `steps * per_rank_batch` samples, as one contiguous span of
   that sequence (so ranks are balanced by samples, not shards: a shard may be split between two
   ranks). `steps = num_samples // global_batch` is the same for every rank and world size; the
   last `num_samples % global_batch` samples of the sequence (the global remainder, fewer than one
   global batch) are not read this epoch, and since the shard order changes every epoch, they are
   other samples each epoch;
3. a rank's span is cut into `L` streams, one per loader worker: stream `j` feeds the rank's
   steps `j, j+L, j+2L, ...` (torch's DataLoader takes batches from its workers round-robin), so
   it holds exactly `len(range(j, steps, L)) * per_rank_batch` samples;
4. each stream is read in shard order and shuffled in consecutive blocks of `shuffle_buffer`
   samples (the memory of a shuffle buffer of that size). The shuffle is computed here on sample
   positions, never on bytes, so the whole reading order is known before a byte is read:
   `shards plan` prints it, and a resumed reader starts at the block it stopped in (passing over
   at most one block, plus the start of its shard, without decoding). A shuffle buffer that
   keeps a sample for an unbounded time would make it re-read every shard since the epoch began.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate


class SplitError(ValueError):
    """An epoch cannot be split as asked (too few samples for one batch per rank, ...)."""


@dataclass(frozen=True)
class Piece:
    """Samples `start`..`stop - 1` (in tar order) of shard `shard` (its index in the manifest)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class Stream:
    """What one loader worker of one rank reads in one epoch."""

    epoch: int
    rank: int
    index: int  # j: feeds the rank's steps j, j+L, ...
    pieces: tuple[Piece, ...]
    num_batches: int

    @property
    def num_samples(self) -> int:
        return sum(piece.stop - piece.start for piece in self.pieces)


def rank_batches(global_batch: int, world_size: int) -> list[int]:
    """Each rank's share of the global batch: global_batch // world_size, the first
    global_batch % world_size ranks one more (the global batch is the same at every world size)."""
    return [global_batch // world_size + (rank < global_batch % world_size) for rank in range(world_size)]


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Steps every rank takes per epoch (the same for any world size)."""
    return num_samples // global_batch


def batches_of_stream(steps: int, loader_streams: int, index: int) -> int:
    return len(range(index, steps, loader_streams))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order; a str seed is hashed with sha512, the same in every process."""
    order = list(range(num_shards))
    random.Random(f"dcgan-dist shards {seed} {epoch}").shuffle(order)
    return order


def check(counts: list[int], world_size: int, loader_streams: int, per_rank_batch: int) -> int:
    """The steps per epoch; SplitError naming the problem when the split is impossible."""
    if world_size < 1:
        raise SplitError(f"the world size must be >= 1 (got {world_size})")
    if loader_streams < 1:
        raise SplitError(f"the number of loader streams must be >= 1 (got {loader_streams})")
    if per_rank_batch < 1:
        raise SplitError(f"the per-rank batch must be >= 1 (got {per_rank_batch})")
    steps = steps_per_epoch(sum(counts), world_size * per_rank_batch)
    if steps < 1:
        raise SplitError(f"a batch of {per_rank_batch} per rank is larger than a rank's share ({sum(counts) // world_size} "
                         f"of {sum(counts)} samples over {world_size} ranks); use a smaller batch or fewer ranks")
    return steps


def stream(counts: list[int], seed: int, epoch: int, world_size: int, loader_streams: int, per_rank_batch: int,
           rank: int, index: int) -> Stream:
    """Stream `index` of `rank` in `epoch`. `counts`: samples per shard, in manifest order."""
    steps = check(counts, world_size, loader_streams, per_rank_batch)
    order = shard_order(len(counts), seed, epoch)
    ends = list(accumulate(counts[shard] for shard in order))  # where each shard ends in the epoch's sequence
    start = rank * steps * per_rank_batch + per_rank_batch * sum(
        batches_of_stream(steps, loader_streams, j) for j in range(index))
    num_batches = batches_of_stream(steps, loader_streams, index)
    return Stream(epoch, rank, index, span(order, ends, start, start + num_batches * per_rank_batch), num_batches)


def span(order: list[int], ends: list[int], start: int, stop: int) -> tuple[Piece, ...]:
    """Positions start..stop-1 of the epoch's sequence of samples, as pieces of shards."""
    pieces = []
    position = bisect.bisect_right(ends, start)  # the shard holding `start`
    while start < stop:
        shard_start = ends[position - 1] if position else 0
        end = min(stop, ends[position])
        if end > start:
            pieces.append(Piece(order[position], start - shard_start, end - shard_start))
        start, position = end, position + 1
    return tuple(pieces)


def reading_order(num_samples: int, shuffle_buffer: int, seed: int, epoch: int, rank: int, index: int) -> list[int]:
    """The order a stream hands out its samples (positions in its pieces' sequence): each block
    of `shuffle_buffer` consecutive positions in a random order, block after block."""
    order = list(range(num_samples))
    if shuffle_buffer > 1:
        rng = random.Random(f"dcgan-dist stream {seed} {epoch} {rank} {index}")
        for start in range(0, num_samples, shuffle_buffer):
            block = order[start:start + shuffle_buffer]
            rng.shuffle(block)
            order[start:start + shuffle_buffer] = block
    return order


def stream_of_worker(worker: int, epoch: int, steps: int, loader_streams: int, start_epoch: int, start_step: int) -> int:
    """Which stream DataLoader worker `worker` serves in `epoch`, for a reader started at step
    `start_step` of `start_epoch`: the DataLoader hands out worker 0's batch first, then worker
    1's, ..., across epoch boundaries, so worker w gives the run's batches w, w+L, w+2L, ..."""
    return (worker + start_epoch * steps + start_step - epoch * steps) % loader_streams


def batches_before(index: int, loader_streams: int, step: int) -> int:
    """How many of stream `index`'s batches feed steps before `step` of the epoch."""
    return len(range(index, step, loader_streams))


@dataclass(frozen=True)
class Position:
    """Where a rank is in its epochs: the next batch it reads is step `step` of epoch `epoch`."""

    epoch: int
    step: int
    steps_per_epoch: int

    def next(self) -> Position:
        epoch, step = divmod(self.epoch * self.steps_per_epoch + self.step + 1, self.steps_per_epoch)
        return Position(epoch, step, self.steps_per_epoch)

    @property
    def epochs_done(self) -> float:
        """Epochs read so far, fractional (2.0 right after the last step of the second epoch)."""
        return self.epoch + self.step / self.steps_per_epoch

    def state(self, sampling: str, world_size: int, loader_workers: int, per_rank_batch: int) -> dict:
        """The checkpoint's `data_position`: every rank has read `samples_read_per_rank` of its
        share of this epoch (the ranks take equal steps)."""
        return {"sampling": sampling, "epoch": self.epoch, "step_in_epoch": self.step, "steps_per_epoch": self.steps_per_epoch,
                "world_size": world_size, "loader_workers": loader_workers, "samples_read_per_rank": self.step * per_rank_batch}


def resume_position(state: dict | None, start_step: int, steps: int, sampling: str, world_size: int,
                    loader_workers: int) -> tuple[Position, str]:
    """Where a (resumed) reader starts: the checkpoint's `data_position` (`state`) when it has one
    for the same steps per epoch, else step `start_step` in epochs of `steps`; and why the epoch
    does not continue exactly ("" when it does)."""
    if not state:
        return Position(*divmod(start_step, steps), steps), ""
    if state.get("steps_per_epoch") != steps:
        return (Position(*divmod(start_step, steps), steps),
                f"the checkpoint's data position is for {state.get('steps_per_epoch')} steps per epoch, not {steps}")
    position = Position(state["epoch"], state["step_in_epoch"], steps)
    now = {"sampling": sampling, "world_size": world_size, "loader_workers": loader_workers}
    changed = [f"{name} {state.get(name)} -> {value}" for name, value in now.items() if state.get(name) != value]
    return position, ", ".join(changed)
