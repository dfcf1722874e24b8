"""The reader at GPU rates: `shards bench` (training's reader, timed), the raw pixel format
(groups of images per tar member) through packing, the epoch plan and reading, and where JPEGs
are decoded (`--decode`)."""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from dcgan_dist import config
from dcgan_dist import shards as shards_cli
from dcgan_dist.config import ConfigError
from dcgan_dist.data import epochs, manifest, pack, raw, split, stream, tar
from dcgan_dist.data.decode import as_tensor, decode, decode_on_device
from dcgan_dist.data.preview import inspect_manifest
from dcgan_dist.data.sources import open_source
from dcgan_dist.train import preflight
from tests.test_data import jpeg, write_shards
from tests.test_epochs import resumed_equals_uninterrupted


@pytest.mark.slow  # DataLoader processes
def test_shards_bench_times_the_training_reader(tmp_path, capsys):
    url = write_shards(str(tmp_path), [40, 25], image_size=8)
    assert shards_cli.main(["bench", url, "--loader-workers", "1", "--batch-size", "16", "--seconds", "0.3",
                        "--step-img-s", "1e9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("65 8 px jpeg images in 2 shards")
    delivered = float(re.fullmatch(r"shards bench: (\d+) img/s with 1 loader processes", lines[-1]).group(1))
    assert delivered > 0
    per_process = next(line for line in lines if line.startswith("per loader process"))
    assert per_process.split()[-2].replace(",", "") == f"{delivered:,.0f}".replace(",", "")  # one process: the same
    busy_rate = next(line for line in lines if line.startswith("per loader CPU second"))  # Linux: from /proc
    if "resolution" not in busy_rate:  # the loader process used at least a clock tick (10 ms)
        assert int(busy_rate.split()[4].replace(",", "")) > 0 and re.search(r"busy \d+%\)$", busy_rate)
    needed = int(re.search(r"to feed 1,000,000,000 img/s +(\d+) loader processes", "\n".join(lines)).group(1))
    assert needed == pytest.approx(1e9 / delivered, rel=1e-3)  # printed img/s is rounded


def test_shards_bench_rejects_bad_input_with_one_line(tmp_path, capsys):
    url = write_shards(str(tmp_path), [40, 25], image_size=8)
    for bad, named in ((["--loader-workers", "-1"], "--loader-workers"), (["--seconds", "0"], "--seconds"),
                       (["--batch-size", "0"], "--batch-size"), (["--step-img-s", "-5"], "--step-img-s"),
                       (["--batch-size", "100"], "larger than a rank's share")):
        assert shards_cli.main(["bench", url, *bad]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and named in err
    assert shards_cli.main(["bench", str(tmp_path / "none" / "manifest.json")]) == 2
    assert "none/manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------- --format raw


def source_pixels(image_size: int) -> list[np.ndarray]:
    """The bundled digits as the packer sees them: cropped, resized, RGB, 3 x H x W uint8."""
    source = open_source("digits", None)
    with source.reader() as load:
        return [np.asarray(pack.preprocess(load(item), image_size).convert("RGB")).transpose(2, 0, 1) for item in source.items]


def test_raw_pack_reads_back_the_source_pixels_in_groups(tmp_path):
    report = pack.pack("digits", None, str(tmp_path), 32, "raw", shard_size=500, progress=False, group_size=64)
    shards = manifest.read(report["manifest"])
    assert shards.image_format == "raw" and [s["num_samples"] for s in shards.shards] == [500, 500, 500, 297]
    with tarfile.open(shards.shard_urls[0]) as tar:  # 7 groups of 64 and one of 52, two members each
        names = tar.getnames()
        assert len(names) == 16 and set(names[:2]) == {"000000000.u8.npy", "000000000.keys.npy"}
        assert np.load(io.BytesIO(tar.extractfile("000000448.u8.npy").read()), allow_pickle=False).shape == (52, 3, 32, 32)
    counters = stream.Counters()
    samples = list(stream.read_shards(({"url": u} for u in shards.shard_urls), counters, shards.expected_samples(), retries=0))
    assert [sample["__key__"] for sample in samples] == [f"{i:09d}" for i in range(1797)]  # the jpeg pack's keys
    images = list(stream.decode_samples(iter(samples), counters, 32))
    assert counters.samples == 1797 and counters.corrupt_samples == counters.bad_shards == 0
    assert all(np.array_equal(image.numpy(), expected) for image, expected in zip(images, source_pixels(32), strict=True))
    assert inspect_manifest(report["manifest"], str(tmp_path / "grid.png"))["problems"] == []
    with pytest.raises(ValueError, match="--group-size must be >= 1, and is for --format raw or jpeg only"):
        pack.pack("digits", None, str(tmp_path / "png"), 32, "png", progress=False, group_size=8)


def test_the_epoch_plan_counts_raw_images_not_groups_and_resumes_exactly(tmp_path, capsys):
    # uneven shards of uneven groups: 1797 = 4 x 450 - 3; 450 = 64 x 7 + 2
    url = pack.pack("digits", None, str(tmp_path), 8, "raw", shard_size=450, progress=False, group_size=64)["manifest"]
    shards = manifest.read(url)
    planned = list(epochs.planned_keys(shards, 0, 0, 16, 16, (split.Segment(0, 2, 2),)))
    keys = [key for _, key in planned]
    assert len(keys) == len(set(keys)) == 1797 // 16 * 16  # each image at most once; the remainder left out
    assert Counter(rank for rank, _ in planned) == {0: 1792 // 2, 1: 1792 // 2}  # balanced by images
    steps = 1797 // 16
    straight = resumed_equals_uninterrupted(shards, 2, 0, steps + 2, cuts=(3, steps - 1))
    read = [key for rank in (0, 1) for batch in straight[rank][:steps] for key in batch]
    assert len(read) == len(set(read)) == steps * 16
    assert shards_cli.main(["plan", url, "--world-size", "2", "--loader-workers", "2", "--batch-size", "16",
                            "--shuffle-buffer", "16"]) == 0
    assert [line.split("\t") for line in capsys.readouterr().out.splitlines()] == [[str(r), k] for r, k in planned]


def read_epoch_images(shards, batch: int, buffer: int, loader_workers: int = 0) -> tuple[list[str], list[np.ndarray], dict]:
    """Every (key, 3 x H x W uint8) of one rank's first epoch (in-process, or through loader
    processes and their shared-memory ring), and the counts."""
    reader = epochs.EpochBatches(shards, batch, 0, 1, 0, 0, 0, loader_workers, buffer, 0)
    batches = stream.ShardBatches(shards, batch, 0, 1, 0, loader_workers=loader_workers, epochs=reader)
    keys, images = [], []
    for _ in range(reader.steps):
        scaled = next(batches)
        keys += batches.keys
        images += list(((scaled + 1) * 127.5).round().to(torch.uint8).numpy())
    return keys, images, batches.counts()


def test_raw_batches_hold_each_planned_keys_pixels_and_a_cut_groups_places_are_filled(tmp_path):
    url = pack.pack("digits", None, str(tmp_path), 8, "raw", shard_size=450, progress=False, group_size=64)["manifest"]
    shards, by_key = manifest.read(url), dict(enumerate(source_pixels(8)))
    planned = [key for _, key in epochs.planned_keys(shards, 0, 0, 16, 100, (split.Segment(0, 1, 1),))]
    keys, images, counts = read_epoch_images(shards, 16, 100)
    assert keys == planned  # the plan's order across groups, shards and shuffle blocks
    assert all(np.array_equal(image, by_key[int(key)]) for key, image in zip(keys, images, strict=True))
    assert counts["samples"] == len(planned) and counts["repeated_samples"] == counts["bad_shards"] == 0

    # the second shard cut inside its third group: two groups (128 images) read, the rest's places filled
    cut = shards.shard_urls[1]
    data = open(cut, "rb").read()
    with tarfile.open(cut) as members:
        third = [m for m in members.getmembers() if m.name.endswith(".u8.npy")][2]
    open(cut, "wb").write(data[:third.offset_data + 1000])
    lost = {key for key in planned if 450 + 128 <= int(key) < 900}
    keys, images, counts = read_epoch_images(shards, 16, 100)
    assert len(keys) == len(planned) and set(keys) == set(planned) - lost
    assert all(np.array_equal(image, by_key[int(key)]) for key, image in zip(keys, images))  # a filled place: the last good one
    assert counts["bad_shards"] == 1 and counts["repeated_samples"] == len(lost) and counts["samples"] == len(planned) - len(lost)


def single_and_grouped_jpegs(tmp_path) -> tuple[manifest.Manifest, manifest.Manifest]:
    """The digits at 8 px as JPEG shards of 450, one image per member and in groups of 64."""
    single = pack.pack("digits", None, str(tmp_path / "single"), 8, "jpeg", shard_size=450, progress=False)["manifest"]
    grouped = pack.pack("digits", None, str(tmp_path / "grouped"), 8, "jpeg", shard_size=450, progress=False, group_size=64)["manifest"]
    return manifest.read(single), manifest.read(grouped)


def test_grouped_jpegs_read_as_one_per_member_jpegs_do_and_a_corrupt_ones_place_is_filled(tmp_path):
    single, shards = single_and_grouped_jpegs(tmp_path)
    with tarfile.open(shards.shard_urls[0]) as members:  # 7 groups of 64 and one of 2, three members each
        names = members.getnames()
        sizes = np.load(io.BytesIO(members.extractfile("000000064.sizes.npy").read()), allow_pickle=False)
        fifth = members.getmember("000000064.jpgs").offset_data + int(sizes[:4].sum())
    assert set(names[:3]) == {"000000000.jpgs", "000000000.sizes.npy", "000000000.keys.npy"} and len(names) == 3 * 8
    assert shards.image_format == "jpeg" and [s["num_samples"] for s in shards.shards] == [450, 450, 450, 447]

    def samples(of):  # (key, JPEG bytes) of every image, the groups handed out one image at a time
        found = stream.read_shards(({"url": u} for u in of.shard_urls), stream.Counters(), of.expected_samples(), retries=0)
        return [(sample["__key__"], sample["jpg"]) for sample in found]

    assert samples(shards) == samples(single)  # the same JPEG files, in the same order
    planned = [key for _, key in epochs.planned_keys(shards, 0, 0, 16, 100, (split.Segment(0, 1, 1),))]
    assert planned == [key for _, key in epochs.planned_keys(single, 0, 0, 16, 100, (split.Segment(0, 1, 1),))]
    keys, images, counts = read_epoch_images(single, 16, 100)
    assert keys == planned and counts["samples"] == len(planned) and counts["corrupt_samples"] == 0
    got_keys, got_images, got_counts = read_epoch_images(shards, 16, 100)  # decoded a batch at a time out of the groups
    assert got_keys == keys and got_counts == counts
    assert all(np.array_equal(a, b) for a, b in zip(got_images, images, strict=True))

    # a corrupt JPEG inside a group: counted, its place filled with the image before it, the rest of its batch as decoded
    data = bytearray(open(shards.shard_urls[0], "rb").read())
    data[fifth:fifth + int(sizes[4])] = bytes(int(sizes[4]))
    open(shards.shard_urls[0], "wb").write(data)
    got_keys, got_images, got_counts = read_epoch_images(shards, 16, 100)
    bad = planned.index("000000068")
    assert got_keys == keys[:bad] + [keys[bad - 1]] + keys[bad + 1:]
    assert all(np.array_equal(a, b) for a, b in zip(got_images, images[:bad] + [images[bad - 1]] + images[bad + 1:], strict=True))
    assert got_counts["corrupt_samples"] == got_counts["repeated_samples"] == 1 and got_counts["samples"] == len(planned) - 1
    npy = pack.npy_bytes
    with pytest.raises(ValueError, match="are not the sum of N sizes beside N keys"):
        raw.read_group({"__key__": "k", "__url__": "u", "jpgs": b"abc", "sizes.npy": npy(np.array([2])), "keys.npy": npy(np.array(["k"]))})


@pytest.mark.slow  # a DataLoader process
def test_grouped_jpeg_and_raw_batches_built_in_a_loader_processs_ring_are_the_in_process_ones(tmp_path):
    single, grouped = single_and_grouped_jpegs(tmp_path)
    raw_shards = manifest.read(pack.pack("digits", None, str(tmp_path / "raw"), 8, "raw", shard_size=450, progress=False)["manifest"])
    for shards in (single, grouped, raw_shards):  # stacked, decoded or copied straight into the shared-memory slot
        keys, images, counts = read_epoch_images(shards, 16, 100)
        got_keys, got_images, got_counts = read_epoch_images(shards, 16, 100, loader_workers=1)
        assert got_keys == keys and got_counts == counts and counts["samples"] == len(keys) == 1792
        assert all(np.array_equal(a, b) for a, b in zip(got_images, images, strict=True))


# ---------------------------------------------------------------- where JPEGs are decoded


def test_decode_gpu_without_cuda_workers_or_jpeg_shards_is_a_preflight_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse(["--decode", "gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--decode: gpu decodes on the training workers' CUDA devices: it needs --use-gpu" in err
    assert config.parse(["--decode", "gpu", "--use-gpu"]).data.decode == "gpu" and config.parse([]).data.decode == "cpu"
    raw = pack.pack("digits", None, str(tmp_path), 32, "raw", shard_size=1000, progress=False)["manifest"]
    with pytest.raises(ConfigError, match=r"--decode: gpu decodes JPEG shards; manifest .*manifest.json holds raw"):
        preflight(config.from_flat({"data": raw, "image_size": 32, "decode": "gpu", "use_gpu": True}))
    with pytest.raises(ConfigError, match="--decode: gpu decodes JPEG shards; --data digits is a bundled set of pixels"):
        preflight(config.from_flat({"data": "digits", "decode": "gpu", "use_gpu": True}))


def test_cpu_decode_gives_each_images_pixels_scaled_and_the_gpu_path_the_same_batches(tmp_path):
    url = write_shards(str(tmp_path), [20, 13, 7], image_size=8)
    shards = manifest.read(url)
    jpegs = {sample["__key__"]: sample["jpg"] for shard_url in shards.shard_urls for sample in tar.samples(open(shard_url, "rb"), shard_url)}

    def first_batches(decode: str):
        reader = epochs.EpochBatches(shards, 8, 0, 1, 0, 0, 0, 0, 16, 0, decode=decode)
        batches = stream.ShardBatches(shards, 8, 0, 1, 0, loader_workers=0, epochs=reader, decode=decode)
        return [(next(batches), batches.keys) for _ in range(4)], batches.counts()

    on_cpu, counts = first_batches("cpu")
    for images, keys in on_cpu:  # what the reader always gave: each image decoded and scaled on its own
        assert images.dtype == torch.float32 and torch.equal(images, torch.stack([decode(jpegs[key], 8) for key in keys]))
    # --decode gpu's path, with the CPU as its device: the loader hands JPEGs, the training process decodes
    encoded, encoded_counts = first_batches("gpu")
    assert all(torch.equal(a, b) and ka == kb for (a, ka), (b, kb) in zip(on_cpu, encoded))
    assert encoded_counts == counts and counts["samples"] == 32


def test_device_decode_fills_a_corrupt_jpegs_place_and_counts_it():
    good = [as_tensor(jpeg((8, 8), (40 * i, 90, 40))) for i in range(3)]
    batch, corrupt = decode_on_device(good, 8, "cpu")
    assert corrupt == 0 and batch.shape == (3, 3, 8, 8) and batch.dtype == torch.uint8
    filled, corrupt = decode_on_device([as_tensor(b"\xff\xd8 broken"), good[0], as_tensor(b"nope"), good[2]], 8, "cpu")
    assert corrupt == 2 and [torch.equal(filled[i], batch[j]) for i, j in ((0, 0), (1, 0), (2, 0), (3, 2))] == [True] * 4
    with pytest.raises(ValueError, match="none of the 1 JPEGs of a batch decodes on cpu"):
        decode_on_device([as_tensor(b"nope")], 8, "cpu")


# ---------------------------------------------------------------- tar members from their headers


def test_tar_samples_equal_webdatasets_for_pax_gnu_and_ustar_tars_and_a_cut_tar_raises(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    long_dir = "d" * 120  # longer than a ustar name field: a pax path record, or a GNU long name
    members = [(f"{long_dir}/000001.jpg", jpeg()), (f"{long_dir}/000001.cls", b"7"), ("000002.jpg", b"x" * 513),
               ("000002.json", b"{}"), ("000003.u8.npy", bytes(1 << 21)),
               # after a large member (longer than a chunk) the reader refills in smaller chunks: a member longer than one
               ("000004.u8.npy", bytes(range(256)) * 625), ("000004.keys.npy", b"k" * 10), ("000005.jpg", b"y" * 700)]
    for tar_format in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
            archive.addfile(tarfile.TarInfo("a-folder/"))  # not a file: passed over
            for name, data in members:
                if tar_format == tarfile.USTAR_FORMAT:
                    name = name.replace(long_dir, "d" * 90)  # ustar's prefix field holds the folder
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1.5  # a float mtime: a pax record per member, as TarWriter's
                archive.addfile(info, io.BytesIO(data))
        raw = buffer.getvalue()
        ours = list(tar.samples(io.BytesIO(raw), "u"))
        assert ours == list(group_by_keys(dict(member, __url__="u") for member in tar_file_iterator(io.BytesIO(raw))))
        folder = long_dir if tar_format != tarfile.USTAR_FORMAT else "d" * 90
        assert [sample["__key__"] for sample in ours] == [f"{folder}/000001", "000002", "000003", "000004", "000005"]
        assert ours[0]["cls"] == b"7" and ours[1]["jpg"] == b"x" * 513 and len(ours[2]["u8.npy"]) == 1 << 21
        assert ours[3]["u8.npy"] == bytes(range(256)) * 625 and ours[3]["keys.npy"] == b"k" * 10 and ours[4]["jpg"] == b"y" * 700
        with pytest.raises(tar.TarError, match="ends .* short"):
            list(tar.samples(io.BytesIO(raw[:len(raw) - 1024 - (1 << 17)]), "u"))  # cut inside a member (000004.u8.npy)
    with pytest.raises(tar.TarError, match="ustar magic"):
        list(tar.samples(io.BytesIO(b"not a tar" * 100), "u"))
