"""Elastic runs' data: each rank's share of the global batch at any world size, and the epoch
continued exactly across resizes (data/split.py's segments) by the plan, the shard reader on real
tar shards in tmp_path (loader streams read in-process), the bundled digits and `shards plan
--resume-step`."""

from __future__ import annotations

import itertools
import random
import sys
from collections import Counter

import pytest
import torch

from dcgan_dist import config, data, shards
from dcgan_dist.data import epochs, manifest, split, stream
from tests.test_data import write_shards

UNEVEN = [50, 7, 3, 0, 30, 11]  # 101 samples; one empty shard


# ---------------------------------------------------------------- the plan (pure)


def test_rank_batches_split_the_global_batch_and_a_dividing_world_size_plans_as_before():
    for global_batch in range(1, 20):
        for world_size in range(1, global_batch + 1):
            batches = split.rank_batches(global_batch, world_size)
            share = global_batch // world_size
            assert sum(batches) == global_batch and len(batches) == world_size
            assert batches == [share + 1] * (global_batch % world_size) + [share] * (world_size - global_batch % world_size)
    for world_size in (0, 9):
        with pytest.raises(split.SplitError, match="world size must be between 1 and the global batch 8"):
            split.rank_batches(8, world_size)
    # the plan built as it was before elastic runs: rank r's span of the epoch's sample sequence
    # is r * steps * b.. (b = B / W), cut into its streams' batches in stream order; and each
    # stream's reading order is the seeded block shuffle of its positions
    rng = random.Random(5)
    for _ in range(40):
        counts = [rng.choice([0, 1, 3, 17, 40]) for _ in range(rng.randint(1, 7))]
        world_size, streams, batch = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 5)
        if sum(counts) < world_size * batch:
            continue
        steps = sum(counts) // (world_size * batch)
        sequence = [(shard, member) for shard in split.shard_order(len(counts), 2, 1) for member in range(counts[shard])]
        for rank in range(world_size):
            start = rank * steps * batch
            for index in range(streams):
                size = len(range(index, steps, streams)) * batch
                plan = split.stream(counts, 2, 1, world_size * batch, 16, [split.Segment(0, world_size, streams)], rank, index)
                assert [(p.shard, m) for p in plan.pieces for m in range(p.start, p.stop)] == sequence[start:start + size]
                assert plan.num_batches == size // batch
                start += size
    order = list(range(70))
    generator = random.Random("dcgan-dist stream 3 1 2 0")
    for block in range(0, 70, 16):
        part = order[block:block + 16]
        generator.shuffle(part)
        order[block:block + 16] = part
    assert split.reading_order(70, 16, 3, 1, 2, 0) == order
    # a world size that does not divide the batch: ranks still take contiguous spans, rank by rank
    counts = [30, 12, 25]
    sequence = [(shard, member) for shard in split.shard_order(3, 0, 0) for member in range(counts[shard])]
    read = [(p.shard, m) for plan in split.streams(counts, 0, 0, 8, 0, [split.Segment(0, 3, 2)])
            for p in plan.pieces for m in range(p.start, p.stop)]
    assert read == sequence[:67 // 8 * 8]


def epoch_reads(counts, seed, epoch, global_batch, buffer, segments) -> list[tuple[int, int]]:
    """(shard, member) of every sample the chain of segments reads in the epoch: each segment's
    streams, in their reading order, up to the next segment's first step."""
    steps = sum(counts) // global_batch
    read = []
    for k, segment in enumerate(segments):
        until = segments[k + 1].from_step if k + 1 < len(segments) else steps
        plans = split.streams(counts, seed, epoch, global_batch, buffer, segments[:k + 1])
        assert len(plans) == segment.world_size * segment.loader_streams
        for plan in plans:
            batch = split.rank_batches(global_batch, segment.world_size)[plan.rank]
            assert plan.num_samples == plan.num_batches * batch == len(range(plan.index, steps - segment.from_step,
                                                                             segment.loader_streams)) * batch
            assert plan == split.stream(counts, seed, epoch, global_batch, buffer, segments[:k + 1], plan.rank, plan.index)
            positions = [(piece.shard, member) for piece in plan.pieces for member in range(piece.start, piece.stop)]
            order = split.reading_order(plan.num_samples, buffer, seed, epoch, plan.rank, plan.index, plan.from_step)
            read += [positions[at] for at in order[:split.batches_before(plan.index, segment.loader_streams, until - segment.from_step) * batch]]
    return read


def test_a_chain_of_resizes_reads_every_planned_sample_of_the_epoch_once():
    rng = random.Random(3)
    for trial in range(150):
        counts = [rng.choice([0, 1, 2, 5, 17, 40, 120]) for _ in range(rng.randint(1, 9))]
        global_batch = rng.randint(1, 12)
        steps = sum(counts) // global_batch
        if steps < 2:
            continue
        starts = sorted(rng.sample(range(1, steps), min(rng.randint(0, 3), steps - 1)))
        segments = [split.Segment(start, rng.randint(1, global_batch), rng.randint(1, 3)) for start in [0, *starts]]
        buffer = rng.choice([0, 1, 2, 3, 7, 1000])
        read = epoch_reads(counts, 4, trial % 3, global_batch, buffer, segments)
        assert len(read) == len(set(read)) == steps * global_batch, (counts, global_batch, buffer, segments)
        # the same samples as an uninterrupted epoch: all but the global remainder
        assert set(read) == set(epoch_reads(counts, 4, trial % 3, global_batch, buffer, segments[:1]))
    with pytest.raises(split.SplitError, match="increasing steps below 12"):
        split.streams([100], 0, 0, 8, 0, [split.Segment(0, 2, 1), split.Segment(12, 3, 1)])


# ---------------------------------------------------------------- the reader on real shards


def segment_reads(shards, global_batch, segments, until, buffer=16) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: keys}} of the last segment's ranks from its first step to `until`: each of
    its loader streams read in-process by EpochBatches, as a DataLoader worker would."""
    last, reads = segments[-1], {}
    for rank in range(last.world_size):
        reader = epochs.EpochBatches(shards, global_batch, rank, last.world_size, 0, 0, last.from_step, last.loader_streams,
                                     buffer, 0, segments=tuple(segments))
        reads[rank] = {}
        for index in range(last.loader_streams):
            count = split.batches_before(index, last.loader_streams, until - last.from_step)
            for k, (images, keys) in enumerate(itertools.islice(reader.stream_batches(reader.plan(0, index), 0, stream.Counters()), count)):
                assert len(images) == len(keys) == split.rank_batches(global_batch, last.world_size)[rank]
                reads[rank][last.from_step + index + k * last.loader_streams] = keys
        assert sorted(reads[rank]) == list(range(last.from_step, until))
    return reads


def resized(state: dict, step: int, global_batch: int, world_size: int, loader_streams: int) -> tuple[split.Segment, ...]:
    """The segments a reader resumed from a checkpoint's data position gets, at another world size."""
    position, segments, note = split.resume_position(state, step, state["steps_per_epoch"], global_batch, world_size, loader_streams)
    assert note == "" and position == split.Position(0, step, state["steps_per_epoch"])
    return segments


def test_three_then_two_then_three_ranks_with_two_loader_streams_read_each_sample_of_the_epoch_once(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), UNEVEN, image_size=8))
    global_batch, steps = 8, 101 // 8  # 3 ranks take 3, 3 and 2 a step; 2 ranks 4 each; 5 samples left out
    first = (split.Segment(0, 3, 2),)
    before = segment_reads(shards, global_batch, first, 5)
    # the checkpoint at step 5 (its data position), resumed by 2 ranks; at step 9, by 3 again
    second = resized(split.Position(0, 5, steps).state("epochs", global_batch, first), 5, global_batch, 2, 2)
    middle = segment_reads(shards, global_batch, second, 9)
    third = resized(split.Position(0, 9, steps).state("epochs", global_batch, second), 9, global_batch, 3, 2)
    after = segment_reads(shards, global_batch, third, steps)
    read = [key for reads in (before, middle, after) for rank in reads.values() for keys in rank.values() for key in keys]
    uninterrupted = [key for _, key in epochs.planned_keys(shards, 0, 0, global_batch, 16, first)]
    assert len(read) == len(set(read)) == steps * global_batch == len(uninterrupted)
    assert set(read) == set(uninterrupted)
    # a resume inside the resized segment with the same world size goes on with it: the reader's
    # DataLoader worker 0 (the only one in-process) serves the batches of steps 6, 8, 10 and 12
    reader = epochs.EpochBatches(shards, global_batch, 1, 2, 0, 0, 6, 2, 16, 0, segments=second)
    batches = [keys.split("\n") for _, _, keys in itertools.islice(reader, 2)]
    assert batches == [middle[1][6], middle[1][8]]


@pytest.mark.slow  # DataLoader processes
def test_loader_processes_after_a_resize_hand_out_the_planned_batches_in_step_order(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), UNEVEN, image_size=8))
    segments = (split.Segment(0, 3, 2), split.Segment(5, 2, 2))
    planned = segment_reads(shards, 8, segments, 12)
    for rank in range(2):
        for start in (5, 6):  # at the resize, and resumed a step into its segment (the other worker's turn first)
            reader = epochs.EpochBatches(shards, 8, rank, 2, 0, 0, start, 2, 16, 0, segments=segments)
            batches = stream.ShardBatches(shards, 8, rank, 2, 0, start, loader_workers=2, epochs=reader)
            keys = []
            for _ in range(12 - start):
                next(batches)
                keys.append(batches.keys)
                if len(keys) == 1:
                    assert batches.data_position()["segments"] == [[0, 3, 2], [5, 2, 2]]
            assert keys == [planned[rank][step] for step in range(start, 12)]
            next(batches)  # the next epoch: one segment, this split
            assert batches.data_position()["segments"] == [[0, 2, 2]] and len(batches.keys) == 4
            del batches  # stops its DataLoader workers


OPENED: list[str] | None = None  # the tar files opened while read_all() records them


def record_opened(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and str(args[0]).endswith(".tar"):
        OPENED.append(str(args[0]))


sys.addaudithook(record_opened)  # an audit hook sees every open(); it cannot be removed, so it records only while OPENED is a list


def read_all(batches) -> tuple[list, list[str]]:
    """Every item of `batches`, and the tar files opened while they were read, once per open."""
    global OPENED
    OPENED = []
    try:
        return list(batches), OPENED
    finally:
        OPENED = None


def test_a_resized_stream_opens_each_shard_once_for_its_scattered_pieces(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), [40, 40, 40], image_size=8))
    # a shuffle buffer larger than a stream: the first 2 ranks read a random half of theirs by step
    # 7, so the 3 ranks after the resize each hold many scattered pieces of the same shards
    segments = (split.Segment(0, 2, 1), split.Segment(7, 3, 1))
    for rank in range(3):
        reader = epochs.EpochBatches(shards, 8, rank, 3, 0, 0, 7, 1, 1000, 0, segments=segments)
        plan = reader.plan(0, 0)
        batches, opened = read_all(reader.stream_batches(plan, 0, stream.Counters()))
        assert len(batches) == plan.num_batches == 15 - 7
        held = {piece.shard for piece in plan.pieces}
        assert len(plan.pieces) > 2 * len(held)
        assert sorted(opened) == sorted(shards.shard_urls[shard] for shard in held)
    # resumed at its last batch, a stream opens only the shards that hold that batch's samples
    shards = manifest.read(write_shards(str(tmp_path / "small"), [10] * 12, image_size=8))
    for rank in range(3):
        reader = epochs.EpochBatches(shards, 8, rank, 3, 0, 0, 14, 1, 4, 0, segments=segments)
        plan = reader.plan(0, 0)
        batches, opened = read_all(reader.stream_batches(plan, plan.num_batches - 1, stream.Counters()))
        assert len(batches) == 1
        positions = [(piece.shard, member) for piece in plan.pieces for member in range(piece.start, piece.stop)]
        order = split.reading_order(plan.num_samples, 4, 0, 0, rank, 0, 7)
        last = {positions[at][0] for at in order[(plan.num_batches - 1) * reader.batch:]}
        assert len(last) < len({piece.shard for piece in plan.pieces})
        assert sorted(opened) == sorted(shards.shard_urls[shard] for shard in last)


# ---------------------------------------------------------------- the bundled digits


def digits_epoch(cfg, chain: list[tuple[int, int]], steps: int) -> tuple[list[bytes], dict]:
    """Every image the ranks read in epoch 0 (its bytes), read by `chain`'s (from_step, world
    size) in turn, each resumed from the last one's data position; and that position at the end."""
    images, state = [], None
    for (start, world_size), (until, _) in zip(chain, [*chain[1:], (steps, 0)]):
        positions = []
        for rank in range(world_size):
            batches = data.open_batches(cfg, rank, world_size, start, state)
            for _ in range(start, until):
                batch = next(batches)
                assert len(batch) == split.rank_batches(cfg.loop.batch_size, world_size)[rank]
                images += [image.numpy().tobytes() for image in batch]
            positions.append(batches.data_position())
        assert all(position == positions[0] for position in positions)  # every rank writes the same
        state = positions[0]
    return images, state


def test_the_digits_continue_the_epoch_across_world_sizes_and_give_each_rank_its_batch():
    cfg = config.from_flat({"batch_size": 16})
    steps = 1797 // 16
    whole, state = digits_epoch(cfg, [(0, 1)], steps)
    assert len(whole) == steps * 16 and state["epoch"] == 1 and state["segments"] == [[0, 1, 1]]
    resized_images, state = digits_epoch(cfg, [(0, 3), (40, 2), (41, 3), (90, 5)], steps)
    assert Counter(resized_images) == Counter(whole)  # the same images, each as often (the set has duplicates)
    assert state == {"sampling": "epochs", "epoch": 1, "step_in_epoch": 0, "steps_per_epoch": steps, "global_batch": 16,
                     "world_size": 5, "loader_workers": 1, "segments": [[0, 5, 1]]}
    # a resume at the same world size replays the uninterrupted batches exactly, into the next epoch
    straight = data.open_batches(cfg, 1, 3)
    for _ in range(20):
        next(straight)
    state = straight.data_position()
    expected = [next(straight) for _ in range(steps)]
    resumed = data.open_batches(cfg, 1, 3, 20, state)
    assert all(torch.equal(next(resumed), batch) for batch in expected)


# ---------------------------------------------------------------- shards plan --resume-step


def test_shards_plan_after_a_resize_prints_what_the_new_ranks_read_and_rejects_bad_input(tmp_path, capsys):
    url = write_shards(str(tmp_path), UNEVEN, image_size=8)
    shards_read = manifest.read(url)
    common = ["plan", url, "--loader-workers", "2", "--batch-size", "8", "--shuffle-buffer", "16"]
    assert shards.main([*common, "--world-size", "3", "--resume-step", "5", "--from-world-size", "2", "--from-loader-workers", "1"]) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    segments = (split.Segment(0, 2, 1), split.Segment(5, 3, 2))
    after = segment_reads(shards_read, 8, segments, 12)
    # rank by rank, loader worker by worker (worker w reads stream w from the resize on), each in reading order
    assert lines == [[str(rank), key] for rank in range(3) for index in range(2)
                     for step in range(5 + index, 12, 2) for key in after[rank][step]]
    before = segment_reads(shards_read, 8, segments[:1], 5)
    earlier = {key for rank in before.values() for keys in rank.values() for key in keys}
    assert earlier.isdisjoint(key for _, key in lines) and len(earlier) + len(lines) == 96
    assert "epoch 0 from step 5, after 2 ranks x 1 loader streams read steps 0 to 4: 7 steps of 2-3 samples on each of 3 ranks" in err
    # --pieces: the same plan as pieces of shards, from the manifest alone: the members each rank's
    # loader workers read are the keys above (the keys' order within a piece is the shuffle's)
    assert shards.main([*common, "--world-size", "3", "--resume-step", "5", "--from-world-size", "2", "--from-loader-workers", "1",
                        "--pieces"]) == 0
    pieces = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    members = {url: epochs.shard_keys(url, shards_read.expected_samples()) for url in shards_read.shard_urls}
    by_pieces = sorted((int(rank), key) for rank, _, url, first, stop in pieces for key in members[url][int(first):int(stop)])
    assert by_pieces == sorted((int(rank), key) for rank, key in lines)
    assert {(rank, index) for rank, index, *_ in pieces} == {(str(rank), str(index)) for rank in range(3) for index in range(2)}
    for bad, named in ((["--world-size", "3", "--from-world-size", "2"], "--from-world-size need --resume-step"),
                       (["--world-size", "3", "--resume-step", "0"], "--resume-step 0 is not a step inside the epoch"),
                       (["--world-size", "3", "--resume-step", "12"], "--resume-step 12 is not a step inside the epoch"),
                       (["--world-size", "3", "--resume-step", "4", "--from-world-size", "9"], "--from-world-size must be from 1 to"),
                       (["--world-size", "9"], "--world-size 9 is more ranks than --batch-size 8")):
        assert shards.main([*common, *bad]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and named in err, (bad, err)
    with pytest.raises(SystemExit) as exit_info:  # spelt out in full, as every flag
        shards.main([*common, "--world-size", "3", "--resume", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --resume" in capsys.readouterr().err
