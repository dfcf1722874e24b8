"""The epoch plan: which samples each rank and loader worker reads, in which order (pure, no I/O).

For an epoch, from the manifest's per-shard sample counts alone:

1. the shard list is shuffled with a seed every rank shares (seed, epoch) and read as one
   sequence of samples;
2. rank `r` of `W` takes `steps * rank_batches(B, W)[r]` samples as one contiguous span of that
   sequence, rank after rank: the global batch `B` is `B // W` per rank, one more on the first
   `B % W` ranks, so it is the same at every world size (ranks are balanced by samples, not
   shards: a shard may be split between two ranks). `steps = num_samples // B` for any world
   size; the last `num_samples % B` samples of the sequence (the global remainder, fewer than one
   global batch) are not read this epoch, and since the shard order changes every epoch, they are
   other samples each epoch;
3. a rank's span is cut into `L` streams, one per loader worker: stream `j` feeds the rank's
   steps `j, j+L, j+2L, ...` (torch's DataLoader takes batches from its workers round-robin), so
   it holds exactly `len(range(j, steps, L))` of the rank's batches;
4. each stream is read in shard order and shuffled in consecutive blocks of `shuffle_buffer`
   samples (the memory of a shuffle buffer of that size). The shuffle is computed here on sample
   positions, never on bytes, so the whole reading order is known before a byte is read:
   `shards plan` prints it, and a resumed reader starts at the block it stopped in (passing over
   at most one block, plus the start of its shard, without decoding). A shuffle buffer that
   keeps a sample for an unbounded time would make it re-read every shard since the epoch began.

A resize (an elastic run restarted with another world size or loader count mid-epoch) starts a
new *segment* of the epoch: `Segment(from_step, world_size, loader_streams)`. An epoch's first
segment starts at step 0 and is planned as above over the whole sequence; a later one is planned
the same way (spans per rank, streams, blocks, its own shuffle seed) over the samples no stream of
an earlier segment had read by its `from_step`, in sequence order: each of its ranks takes its
batch times the steps left. So across any chain of resizes every planned sample of the epoch is
read exactly once. What a stream had read depends only on its reading order and how many batches
it gave (`batches_before`), so the remaining plan is computed here too, without I/O, by
`remaining()`, a window at a time: a reader's stream needs only the streams of the earlier
segments it continues, and the whole epoch at 3 M samples over 1,024 ranks x 8 streams takes
seconds (benchmarks/epoch_plan_scale.py).
"""

from __future__ import annotations

import bisect
import gc
import random
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from itertools import accumulate, repeat
from typing import NamedTuple

import numpy as np


class SplitError(ValueError):
    """An epoch cannot be split as asked (too few samples for one global batch, ...)."""


class Piece(NamedTuple):
    """Samples `start`..`stop - 1` (in tar order) of shard `shard` (its index in the manifest)
    (a tuple: a plan after a resize may hold a million of them)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class Segment:
    """Steps `from_step`.. of an epoch, read by `world_size` ranks of `loader_streams` streams each."""

    from_step: int
    world_size: int
    loader_streams: int


@dataclass(frozen=True)
class Stream:
    """What one loader worker of one rank reads in one segment of an epoch."""

    epoch: int
    rank: int
    index: int  # j: feeds the rank's steps from_step + j, from_step + j + L, ...
    pieces: tuple[Piece, ...]
    num_batches: int
    from_step: int = 0  # its segment's first step (0: the epoch's first segment)

    @property
    def num_samples(self) -> int:
        return sum(piece.stop - piece.start for piece in self.pieces)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Steps every rank takes per epoch (the same for any world size)."""
    return num_samples // global_batch


def rank_batches(global_batch: int, world_size: int) -> list[int]:
    """Each rank's batch: `global_batch // world_size`, one more on the first `global_batch % world_size`."""
    if not 1 <= world_size <= global_batch:
        raise SplitError(f"the world size must be between 1 and the global batch {global_batch} (got {world_size})")
    share, extra = divmod(global_batch, world_size)
    return [share + (rank < extra) for rank in range(world_size)]


def batches_of_stream(steps: int, loader_streams: int, index: int) -> int:
    return len(range(index, steps, loader_streams))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order; a str seed is hashed with sha512, the same in every process."""
    order = list(range(num_shards))
    random.Random(f"dcgan-dist shards {seed} {epoch}").shuffle(order)
    return order


def check(counts: Sequence[int], world_size: int, loader_streams: int, global_batch: int) -> int:
    """The steps per epoch; SplitError naming the problem when the split is impossible."""
    if loader_streams < 1:
        raise SplitError(f"the number of loader streams must be >= 1 (got {loader_streams})")
    if global_batch < 1:
        raise SplitError(f"the global batch must be >= 1 (got {global_batch})")
    batches = rank_batches(global_batch, world_size)
    steps = steps_per_epoch(sum(counts), global_batch)
    if steps < 1:
        raise SplitError(f"a batch of {batches[0]} per rank is larger than a rank's share ({sum(counts) // world_size} "
                         f"of {sum(counts)} samples over {world_size} ranks); use a smaller batch or fewer ranks")
    return steps


def check_segments(segments: Sequence[Segment], steps: int, global_batch: int) -> None:
    """SplitError unless the first segment starts the epoch and each later one starts later, within it."""
    if not segments or segments[0].from_step != 0:
        raise SplitError(f"an epoch's first segment starts at step 0 (got {list(segments)})")
    for earlier, later in zip(segments, segments[1:]):
        if not earlier.from_step < later.from_step < steps:
            raise SplitError(f"segments must start at increasing steps below {steps} (got {list(segments)})")
    for segment in segments:
        rank_batches(global_batch, segment.world_size)
        if segment.loader_streams < 1:
            raise SplitError(f"the number of loader streams must be >= 1 (got {segment.loader_streams})")


def stream(counts: Sequence[int], seed: int, epoch: int, global_batch: int, shuffle_buffer: int,
           segments: Sequence[Segment], rank: int, index: int) -> Stream:
    """Stream `index` of `rank` in the last of the epoch's `segments`. `counts`: samples per shard,
    in manifest order; `shuffle_buffer` matters only after a resize (what the earlier segments read)."""
    plan = EpochPlan(counts, seed, epoch, global_batch, shuffle_buffer, segments)
    return plan.stream(rank, index)


def streams(counts: Sequence[int], seed: int, epoch: int, global_batch: int, shuffle_buffer: int,
            segments: Sequence[Segment]) -> list[Stream]:
    """Every stream of the last of the epoch's `segments`, rank by rank, stream by stream."""
    return EpochPlan(counts, seed, epoch, global_batch, shuffle_buffer, segments).streams()


class EpochPlan:
    """One epoch's plan over its segments: each segment's streams as index ranges of the samples
    still unread when it begins (`remaining`), and how many each had read when the next began."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int, global_batch: int, shuffle_buffer: int,
                 segments: Sequence[Segment]):
        self.steps = check(counts, segments[-1].world_size, segments[-1].loader_streams, global_batch)
        check_segments(segments, self.steps, global_batch)
        self.seed, self.epoch, self.global_batch, self.shuffle_buffer = seed, epoch, global_batch, shuffle_buffer
        self.segments = tuple(segments)
        self.order = shard_order(len(counts), seed, epoch)
        self.ends = list(accumulate(counts[shard] for shard in self.order))  # where each shard ends in the sequence
        ends = [*(segment.from_step for segment in self.segments[1:]), self.steps]
        self.layouts = [self.layout(segment, until) for segment, until in zip(self.segments, ends)]

    def layout(self, segment: Segment, until: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A segment's streams (rank-major): where each starts among the samples left when it
        begins (n + 1 entries), how many of its samples it reads by step `until`, and where each
        one's unread samples start among those left after it (n + 1 entries)."""
        streams_per_rank = segment.loader_streams
        steps, read_steps = self.steps - segment.from_step, until - segment.from_step
        batches = np.array(rank_batches(self.global_batch, segment.world_size), dtype=np.int64)
        index = np.arange(streams_per_rank)
        size = np.outer(batches, np.maximum(0, (steps - index + streams_per_rank - 1) // streams_per_rank)).ravel()
        read = np.outer(batches, np.maximum(0, (read_steps - index + streams_per_rank - 1) // streams_per_rank)).ravel()
        starts, left_starts = (np.concatenate(([0], np.cumsum(values))) for values in (size, size - read))
        return starts, read, left_starts

    def remaining(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Samples `lo`..`hi - 1` (sequence positions, ascending) of those no stream had read when
        segment `k` began, computed from the streams of segment k - 1 that held them, only."""
        if k == 0:
            return np.arange(lo, hi, dtype=np.int64)
        if lo >= hi:
            return np.zeros(0, dtype=np.int64)
        starts, read, left_starts = self.layouts[k - 1]
        first = int(np.searchsorted(left_starts, lo, side="right")) - 1
        last = int(np.searchsorted(left_starts, hi, side="left"))  # streams first..last-1 hold them
        window = self.remaining(k - 1, int(starts[first]), int(starts[last]))
        unread = np.ones(len(window), dtype=bool)
        for number in range(first, last):
            at = int(starts[number] - starts[first])
            whole, scattered = self.read_positions(k - 1, number, int(read[number]))
            unread[at:at + whole] = False
            unread[at + scattered] = False
        base = int(left_starts[first])
        return window[unread][lo - base:hi - base]

    def read_positions(self, k: int, number: int, consumed: int) -> tuple[int, np.ndarray]:
        """Which of its positions stream `number` of segment `k` had handed out after `consumed`
        samples: the first `whole` (whole shuffle blocks), and the first `consumed - whole` of the
        next block's reading order (`scattered`)."""
        segment, buffer = self.segments[k], self.shuffle_buffer
        if buffer <= 1 or consumed % buffer == 0:
            return consumed, NOTHING
        rank, index = divmod(number, segment.loader_streams)
        rng = random.Random(order_seed(self.seed, self.epoch, rank, index, segment.from_step))
        whole = consumed // buffer * buffer
        for _ in range(0, whole, buffer):  # the blocks before, shuffled as the reader did, for the generator's state
            rng.shuffle([0] * buffer)
        size = int(self.layouts[k][0][number + 1] - self.layouts[k][0][number])
        block = list(range(whole, min(whole + buffer, size)))
        rng.shuffle(block)
        return whole, np.array(block[:consumed - whole], dtype=np.int64)

    def stream(self, rank: int, index: int) -> Stream:
        k, segment = len(self.segments) - 1, self.segments[-1]
        number = rank * segment.loader_streams + index
        start, stop = (int(at) for at in self.layouts[k][0][number:number + 2])
        num_batches = batches_of_stream(self.steps - segment.from_step, segment.loader_streams, index)
        pieces = span(self.order, self.ends, start, stop) if k == 0 else self.pieces(self.remaining(k, start, stop), [0, stop - start])[0]
        return Stream(self.epoch, rank, index, pieces, num_batches, segment.from_step)

    def streams(self) -> list[Stream]:
        k, segment = len(self.segments) - 1, self.segments[-1]
        numbers = range(segment.world_size * segment.loader_streams)
        if k == 0:
            return [self.stream(*divmod(number, segment.loader_streams)) for number in numbers]
        starts = self.layouts[k][0]
        pieces = self.pieces(self.remaining(k, 0, int(starts[-1])), starts)
        steps = self.steps - segment.from_step
        return [Stream(self.epoch, *divmod(number, segment.loader_streams), pieces[number],
                       batches_of_stream(steps, segment.loader_streams, number % segment.loader_streams), segment.from_step)
                for number in numbers]

    def pieces(self, positions: np.ndarray, bounds) -> list[tuple[Piece, ...]]:
        """Sequence positions (ascending) as pieces of shards, one tuple per stream: stream n's
        are positions[bounds[n]:bounds[n + 1]]."""
        bounds = np.asarray(bounds, dtype=np.int64)
        if not len(positions):
            return [() for _ in range(len(bounds) - 1)]
        ends = np.asarray(self.ends, dtype=np.int64)
        at = np.searchsorted(ends, positions, side="right")  # which shard of the epoch's order holds each
        members = positions - np.concatenate(([0], ends[:-1]))[at]
        first = np.ones(len(positions), dtype=bool)  # where a piece begins: a gap, another shard, another stream
        first[1:] = (np.diff(positions) != 1) | (np.diff(at) != 0)
        first[bounds[bounds < len(positions)]] = True
        firsts = np.flatnonzero(first)
        lasts = np.append(firsts[1:], len(positions)) - 1
        shards = np.asarray(self.order, dtype=np.int64)[at[firsts]]
        gc_was_on = gc.isenabled()
        gc.disable()  # collections while a million tuples are made would walk them all again and again (6x the time)
        try:
            made = list(map(tuple.__new__, repeat(Piece), zip(shards.tolist(), members[firsts].tolist(), (members[lasts] + 1).tolist())))
        finally:
            if gc_was_on:
                gc.enable()
        cuts = np.searchsorted(firsts, bounds).tolist()
        return [tuple(made[a:b]) for a, b in zip(cuts, cuts[1:])]


NOTHING = np.zeros(0, dtype=np.int64)


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


def order_seed(seed: int, epoch: int, rank: int, index: int, from_step: int = 0) -> str:
    """The seed of a stream's shuffle (a later segment's streams have their own)."""
    return f"dcgan-dist stream {seed} {epoch} {rank} {index}" + (f" from {from_step}" if from_step else "")


def reading_order(num_samples: int, shuffle_buffer: int, seed: int, epoch: int, rank: int, index: int,
                  from_step: int = 0) -> list[int]:
    """The order a stream hands out its samples (positions in its pieces' sequence): each block
    of `shuffle_buffer` consecutive positions in a random order, block after block."""
    order = list(range(num_samples))
    if shuffle_buffer > 1:
        rng = random.Random(order_seed(seed, epoch, rank, index, from_step))
        for start in range(0, num_samples, shuffle_buffer):
            block = order[start:start + shuffle_buffer]
            rng.shuffle(block)
            order[start:start + shuffle_buffer] = block
    return order


def stream_of_worker(worker: int, epoch: int, steps: int, loader_streams: int, start_epoch: int, start_step: int,
                     from_step: int = 0) -> int:
    """Which stream DataLoader worker `worker` serves in `epoch`, for a reader started at step
    `start_step` of `start_epoch`, whose segment there began at `from_step`: the DataLoader hands
    out worker 0's batch first, then worker 1's, ..., across epoch boundaries, so worker w gives
    the run's batches w, w+L, w+2L, ..."""
    shift = from_step if epoch == start_epoch else 0
    return (worker + start_epoch * steps + start_step - epoch * steps - shift) % loader_streams


def batches_before(index: int, loader_streams: int, step: int) -> int:
    """How many of stream `index`'s batches feed steps before `step` of its segment."""
    return len(range(index, step, loader_streams))


def segments_in(epoch: int, start_epoch: int, segments: Sequence[Segment]) -> tuple[Segment, ...]:
    """The segments of `epoch` for a reader that started in `start_epoch`'s last one of `segments`:
    a later epoch is one segment with that split."""
    if epoch == start_epoch:
        return tuple(segments)
    return (Segment(0, segments[-1].world_size, segments[-1].loader_streams),)


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

    def state(self, sampling: str, global_batch: int, segments: Sequence[Segment]) -> dict:
        """The checkpoint's `data_position`: this epoch's segments ([from_step, world_size,
        loader_workers] each) say what every stream has read of it, so a reader at any world size
        continues it exactly."""
        return {"sampling": sampling, "epoch": self.epoch, "step_in_epoch": self.step, "steps_per_epoch": self.steps_per_epoch,
                "global_batch": global_batch, "world_size": segments[-1].world_size,
                "loader_workers": segments[-1].loader_streams, "segments": [list(astuple(segment)) for segment in segments]}


def resume_position(state: dict | None, start_step: int, steps: int, global_batch: int, world_size: int,
                    loader_streams: int) -> tuple[Position, tuple[Segment, ...], str]:
    """Where a (resumed) `--sampling epochs` reader starts, the segments of that epoch (the
    checkpoint's, and a new one from there when the world size or loader count changed), and why
    the epoch does not continue exactly ("" when it does): the checkpoint's `data_position`
    (`state`) for another steps per epoch or global batch (step `start_step` in epochs of `steps`
    is read with a fresh split then), or one of --sampling resampled."""
    fresh = (Segment(0, world_size, loader_streams),)
    if not state:
        return Position(*divmod(start_step, steps), steps), fresh, ""
    # a data position from before elastic runs: one segment, and a batch of samples_read_per_rank / step per rank
    old_batch = state.get("global_batch") or (state["samples_read_per_rank"] // state["step_in_epoch"] * state["world_size"]
                                              if state.get("step_in_epoch") else global_batch)
    if state.get("steps_per_epoch") != steps or old_batch != global_batch:
        return (Position(*divmod(start_step, steps), steps), fresh,
                f"the checkpoint's data position is for {state.get('steps_per_epoch')} steps per epoch of {old_batch} "
                f"samples, not {steps} of {global_batch}")
    position = Position(state["epoch"], state["step_in_epoch"], steps)
    if state.get("sampling") != "epochs":
        return position, fresh, f"sampling {state.get('sampling')} -> epochs"
    if position.step == 0:
        return position, fresh, ""
    segments = tuple(Segment(*segment) for segment in state.get("segments") or [[0, state["world_size"], state["loader_workers"]]])
    if (segments[-1].world_size, segments[-1].loader_streams) != (world_size, loader_streams):
        segments = (*(segment for segment in segments if segment.from_step < position.step),
                    Segment(position.step, world_size, loader_streams))
    return position, segments, ""
