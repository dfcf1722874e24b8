"""Epochs without replacement (`--sampling epochs`): the plan (data/split.py) on synthetic
manifests, the reader (data/epochs.py) on real tar shards in tmp_path or on the loopback S3
endpoint, exact resume by sample keys, `shards plan`, `--max-epochs`."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dcgan_dist import config, shards
from dcgan_dist.config import ConfigError
from dcgan_dist.data import epochs, manifest, split, stream
from tests.test_data import write_shards

UNEVEN = [50, 7, 3, 0, 30, 11]  # 101 samples; one empty shard


# ---------------------------------------------------------------- the plan (pure)


def planned_positions(counts, seed, epoch, world_size, streams, batch):
    """{rank: [[(shard, member), ...] per stream]} of one epoch."""
    plan = {}
    for rank in range(world_size):
        plan[rank] = []
        for index in range(streams):
            part = split.stream(counts, seed, epoch, world_size * batch, 0, [split.Segment(0, world_size, streams)], rank, index)
            plan[rank].append([(p.shard, m) for p in part.pieces for m in range(p.start, p.stop)])
            assert part.num_samples == part.num_batches * batch
    return plan


def test_every_rank_reads_the_same_number_of_samples_and_each_sample_at_most_once():
    rng = random.Random(1)
    for trial in range(60):
        counts = [rng.choice([0, 1, 2, 5, 17, 40, 120]) for _ in range(rng.randint(1, 9))]
        world_size, streams = trial % 5 + 1, trial % 3 + 1
        batch = rng.randint(1, 6)
        if sum(counts) < world_size * batch:
            with pytest.raises(split.SplitError, match="larger than a rank's share"):
                split.check(counts, world_size, streams, world_size * batch)
            continue
        steps = split.check(counts, world_size, streams, world_size * batch)
        assert steps == sum(counts) // (world_size * batch)
        for epoch in (0, 1):
            plan = planned_positions(counts, 7, epoch, world_size, streams, batch)
            read = [s for rank in plan.values() for part in rank for s in part]
            assert len(read) == len(set(read)), "a sample planned twice"
            assert all(0 <= member < counts[shard] for shard, member in read)
            # equal steps: every rank reads steps * batch samples; stream j feeds steps j, j+L, ...
            for rank in plan.values():
                assert sum(len(part) for part in rank) == steps * batch
                assert [len(part) // batch for part in rank] == [len(range(j, steps, streams)) for j in range(streams)]
            remainder = sum(counts) - len(read)
            assert remainder == sum(counts) % (world_size * batch) < world_size * batch


def test_the_remainder_is_other_samples_each_epoch_and_the_plan_is_deterministic():
    counts = [10] * 12  # 120 samples, global batch 16: 8 left out per epoch
    left_out = []
    for epoch in range(6):
        plan = planned_positions(counts, 3, epoch, 2, 2, 8)
        assert plan == planned_positions(counts, 3, epoch, 2, 2, 8)
        read = {s for rank in plan.values() for part in rank for s in part}
        left_out.append({(shard, m) for shard in range(12) for m in range(10)} - read)
        assert len(left_out[-1]) == 8
    assert len(set(map(frozenset, left_out))) > 1
    assert split.shard_order(12, 3, 0) != split.shard_order(12, 3, 1) != split.shard_order(12, 4, 1)


def test_reading_order_shuffles_within_blocks_of_the_shuffle_buffer():
    for n, buffer in ((0, 5), (3, 5), (50, 1), (200, 16), (203, 16), (200, 1000)):
        order = split.reading_order(n, buffer, 0, 1, 2, 3)
        assert sorted(order) == list(range(n))
        # a sample stays in its block: a resumed reader passes over at most one block
        assert all(turn // buffer == position // buffer for turn, position in enumerate(order))
        assert buffer == 1 or n < 3 or order != sorted(order)
    assert split.reading_order(200, 16, 0, 1, 2, 3) != split.reading_order(200, 16, 0, 1, 2, 4)
    assert split.reading_order(200, 16, 0, 1, 2, 3) == split.reading_order(200, 16, 0, 1, 2, 3)
    assert split.reading_order(9, 1, 0, 0, 0, 0) == list(range(9))


def test_loader_workers_in_round_robin_give_the_batches_in_step_order_from_any_start():
    """DataLoader hands out worker 0's next batch, then worker 1's, ...: with each worker serving
    stream_of_worker() and skipping batches_before(), the run sees (epoch, step) in order, also
    when the start epoch's last segment (a resize) began before the start step."""
    for steps in (1, 2, 5, 6, 7):
        for streams in (1, 2, 3):
            for start_epoch, start_step in ((0, 0), (1, min(3, steps - 1)), (2, steps - 1)):
                for from_step in sorted({0, start_step // 2, start_step}):
                    queues = []
                    for worker in range(streams):
                        queue = []
                        for epoch in range(start_epoch, start_epoch + 4):
                            first = from_step if epoch == start_epoch else 0  # the segment's stream j feeds first + j, ...
                            index = split.stream_of_worker(worker, epoch, steps, streams, start_epoch, start_step, from_step)
                            skip = split.batches_before(index, streams, start_step - first) if epoch == start_epoch else 0
                            queue += [(epoch, step) for step in range(first + index, steps, streams)][skip:]
                        queues.append(queue)
                    handed_out = [queues[d % streams][d // streams] for d in range(2 * steps)]
                    expected = [divmod(start_epoch * steps + start_step + d, steps) for d in range(2 * steps)]
                    assert handed_out == expected, (steps, streams, start_epoch, start_step, from_step)


def test_position_counts_epochs_and_resumes_from_the_checkpoint_entry():
    position = split.Position(0, 0, 3)
    for _ in range(7):
        position = position.next()
    assert (position.epoch, position.step, position.epochs_done) == (2, 1, 2 + 1 / 3)
    one = (split.Segment(0, 2, 2),)
    state = position.state("epochs", 16, one)
    assert state == {"sampling": "epochs", "epoch": 2, "step_in_epoch": 1, "steps_per_epoch": 3, "global_batch": 16,
                     "world_size": 2, "loader_workers": 2, "segments": [[0, 2, 2]]}
    assert split.resume_position(state, 999, 3, 16, 2, 2) == (split.Position(2, 1, 3), one, "")
    # another world size or loader count: a new segment from the step, which continues the epoch exactly
    assert split.resume_position(state, 7, 3, 16, 4, 2) == (split.Position(2, 1, 3), (*one, split.Segment(1, 4, 2)), "")
    assert split.resume_position(state, 7, 3, 16, 2, 1) == (split.Position(2, 1, 3), (*one, split.Segment(1, 2, 1)), "")
    # another steps per epoch or global batch cannot continue it: step 7 with a fresh split, and why
    assert split.resume_position(state, 7, 5, 16, 2, 2) == (
        split.Position(1, 2, 5), (split.Segment(0, 2, 2),), "the checkpoint's data position is for 3 steps per epoch of 16 samples, not 5 of 16")
    assert "3 steps per epoch of 16 samples, not 3 of 15" in split.resume_position(state, 7, 3, 15, 2, 2)[2]
    assert split.resume_position(None, 7, 3, 16, 2, 2) == (split.Position(2, 1, 3), one, "")
    resampled = split.Position(2, 1, 3).state("resampled", 16, one)  # a resampled run's position: no epoch to continue
    assert split.resume_position(resampled, 7, 3, 16, 2, 2) == (split.Position(2, 1, 3), one, "sampling resampled -> epochs")
    # a data position written before elastic runs: one segment, and the per-rank samples read
    old = {"sampling": "epochs", "epoch": 2, "step_in_epoch": 1, "steps_per_epoch": 3, "world_size": 2, "loader_workers": 2,
           "samples_read_per_rank": 8}
    assert split.resume_position(old, 7, 3, 16, 2, 2) == (split.Position(2, 1, 3), one, "")
    assert split.resume_position(old, 7, 3, 16, 3, 2)[1] == (*one, split.Segment(1, 3, 2))
    assert split.resume_position(old, 7, 3, 24, 2, 2)[2] != ""  # 8 per rank was a global batch of 16
    # a chain: a later resize adds a segment; one at the same step (no step taken since) replaces the last
    chain = split.Position(2, 2, 3).state("epochs", 16, (*one, split.Segment(1, 4, 2)))
    assert split.resume_position(chain, 8, 3, 16, 3, 2)[1] == (*one, split.Segment(1, 4, 2), split.Segment(2, 3, 2))
    again = split.Position(2, 1, 3).state("epochs", 16, (*one, split.Segment(1, 4, 2)))
    assert split.resume_position(again, 7, 3, 16, 3, 2)[1] == (*one, split.Segment(1, 3, 2))
    assert split.resume_position(again, 7, 3, 16, 2, 2)[1] == (*one, split.Segment(1, 2, 2))
    # at an epoch's first step nothing of it was read: one fresh segment
    assert split.resume_position(split.Position(3, 0, 3).state("epochs", 16, one), 9, 3, 16, 4, 1)[1] == (split.Segment(0, 4, 1),)


# ---------------------------------------------------------------- the reader, in-process


def read_keys(shards, rank, world_size, loader_workers, start, count, batch=8, buffer=16):
    """The keys of `count` batches one rank reads from `start` (epoch, step), and where it ends."""
    reader = epochs.EpochBatches(shards, batch * world_size, rank, world_size, 0, *start, loader_workers, buffer, 0)
    batches = stream.ShardBatches(shards, batch * world_size, rank, world_size, 0, loader_workers=loader_workers, epochs=reader)
    keys = []
    for _ in range(count):
        assert next(batches).shape == (batch, 3, 8, 8)
        keys.append(batches.keys)
    position, counts = batches.position, batches.counts()
    del batches  # stops its DataLoader workers
    return keys, position, counts


def resumed_equals_uninterrupted(shards, world_size, loader_workers, total, cuts) -> dict[int, list[list[str]]]:
    """Each rank's keys of `total` batches straight, checked against reading `cut` batches, then
    the rest from where that reader stopped. Returns the straight ones, by rank."""
    straight = {}
    for rank in range(world_size):
        straight[rank] = read_keys(shards, rank, world_size, loader_workers, (0, 0), total)[0]
        for cut in cuts:
            first, position, _ = read_keys(shards, rank, world_size, loader_workers, (0, 0), cut)
            rest, _, _ = read_keys(shards, rank, world_size, loader_workers, (position.epoch, position.step), total - cut)
            assert first + rest == straight[rank], (rank, cut)
    return straight


def test_in_process_reader_resumes_exactly_and_covers_the_epoch(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), UNEVEN, image_size=8))
    steps = 101 // 16
    straight = resumed_equals_uninterrupted(shards, 2, 0, 2 * steps + 2, cuts=(1, steps, steps + 3))
    epoch0 = [key for rank in (0, 1) for batch in straight[rank][:steps] for key in batch]
    assert len(epoch0) == len(set(epoch0)) == steps * 16  # each sample once; 101 % 16 = 5 left out


def test_corrupt_images_and_a_lost_shard_keep_their_places_and_are_counted(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), [20, 20, 20], corrupt_per_shard=2, image_size=8))
    (tmp_path / "shard-000001.tar").unlink()  # one shard gone: its samples are counted, not read
    keys, position, counts = read_keys(shards, 0, 1, 0, (0, 0), 7)  # 60 // 8 = 7 steps: one whole epoch
    assert position == split.Position(1, 0, 7)
    (planned,) = planned_positions([20, 20, 20], 0, 0, 1, 1, 8)[0]
    lost = sum(shard == 1 for shard, _ in planned)
    corrupt = sum(shard != 1 and member < 2 for shard, member in planned)
    assert lost >= 16 and corrupt >= 2
    assert counts["bad_shards"] == 1 and counts["corrupt_samples"] == corrupt
    assert counts["repeated_samples"] == lost + corrupt and counts["samples"] == 56 - lost - corrupt
    flat = [key for batch in keys for key in batch]
    assert not any(key.startswith("001") for key in flat)  # the lost shard's places hold other images
    assert len(flat) == 56


# ---------------------------------------------------------------- the reader with loader processes


@pytest.mark.slow
def test_two_ranks_with_two_loader_workers_cover_the_epoch_and_resume_exactly(tmp_path):
    shards = manifest.read(write_shards(str(tmp_path), UNEVEN, image_size=8))
    steps = 101 // 16  # 6 steps of 8 per rank; 5 samples left out
    planned = list(epochs.planned_keys(shards, 0, 0, 16, 16, (split.Segment(0, 2, 2),)))
    for rank in (0, 1):
        straight, _, _ = read_keys(shards, rank, 2, 2, (0, 0), steps + 3)
        # a reader started where an interrupted one stopped (mid-epoch on the odd worker, and in
        # the next epoch) hands out exactly what the uninterrupted one did from there
        for cut in (3, steps + 1):
            rest, _, _ = read_keys(shards, rank, 2, 2, divmod(cut, steps), steps + 3 - cut)
            assert rest == straight[cut:], (rank, cut)
        # the plan `shards plan` prints: the same keys per loader worker, in reading order
        by_worker = [key for worker in (0, 1) for batch in straight[worker:steps:2] for key in batch]
        assert by_worker == [key for planned_rank, key in planned if planned_rank == rank]
    # each sample of the epoch once across both ranks, but the remainder
    keys = [key for rank, key in planned]
    assert len(keys) == len(set(keys)) == 96


# ---------------------------------------------------------------- shards plan


def test_shards_plan_prints_each_ranks_keys_and_rejects_bad_input(tmp_path, capsys):
    url = write_shards(str(tmp_path), UNEVEN, image_size=8)
    assert shards.main(["plan", url, "--world-size", "2", "--loader-workers", "0", "--batch-size", "16",
                        "--shuffle-buffer", "16"]) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert Counter(rank for rank, _ in lines) == {"0": 48, "1": 48}
    # exactly what the reader hands out, in its order
    for rank in ("0", "1"):
        read = [key for batch in read_keys(manifest.read(url), int(rank), 2, 0, (0, 0), 6)[0] for key in batch]
        assert read == [key for r, key in lines if r == rank]
    assert "5 of 101 samples not read this epoch" in err

    assert shards.main(["plan", url, "--world-size", "2", "--loader-workers", "2", "--epoch", "1", "--seed", "4"]) == 2
    assert "larger than a rank's share (50 of 101 samples over 2 ranks)" in capsys.readouterr().err  # batch 128
    for bad in (["--world-size", "0", "--loader-workers", "1"], ["--world-size", "17", "--loader-workers", "1", "--batch-size", "16"]):
        assert shards.main(["plan", url, *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--world-size" in err
    assert shards.main(["plan", str(tmp_path / "none" / "manifest.json"), "--world-size", "1", "--loader-workers", "1"]) == 2
    assert "none/manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------- the stop rule


def test_max_epochs_or_max_steps_decides_never_both(tmp_path):
    assert config.parse(["--max-epochs", "2"]).loop.max_epochs == 2
    assert config.parse([]).data.sampling == "epochs"
    with pytest.raises(SystemExit):
        config.parse(["--max-epochs", "2", "--max-steps", "10"])
    (tmp_path / "run.yaml").write_text("loop: {max_steps: 10}\n")
    with pytest.raises(ConfigError, match="--max-epochs: 3 and --max-steps both given"):
        config.from_args(config_args(["--config", str(tmp_path / "run.yaml"), "--max-epochs", "3"]))
    with pytest.raises(ConfigError, match="--max-epochs: must be >= 0"):
        config.validate(config.from_flat({"max_epochs": -1}))
    # the preflight turns epochs into steps (tests/test_data.py::test_preflight_names_the_url_or_field_at_fault), and
    # a 2-worker run ends at the last step of its last epoch and logs `epoch` (test_two_workers_train_from_s3_...)


def config_args(argv):
    parser = config.OneLineErrorParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)
