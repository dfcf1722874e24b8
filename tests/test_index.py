"""`shards index`: shards written by webdataset.ShardWriter in img2dataset's layout, indexed from
their tar headers on disk and on a real S3 endpoint (moto's server on 127.0.0.1), read by
training's reader at any --image-size with the packer's crop and resize, `shards plan`, exact
resume and `shards bench` on them; the webdataset library reading `shards pack`'s shards; bad
input exiting 2 with one line."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow import MlflowClient
from PIL import Image

from dcgan_dist import shards as shards_cli
from dcgan_dist.data import decode, epochs, index, manifest, pack, s3, stream
from dcgan_dist.data.resize import decode_resized
from dcgan_dist.data.sample_log import kept_keys
from dcgan_dist.train import main as train_main
from tests.conftest import train_args
from tests.test_data import without_s3_credentials
from tests.test_epochs import resumed_equals_uninterrupted

NO_IMAGE, CORRUPT = 4, 7  # the sample written without an image, and the one whose JPEG is broken


def photo(height: int, width: int, seed: int, image_format: str = "JPEG") -> bytes:
    """A photo-like image (gradients and noise) of any size, encoded."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0, 18, (height, width, 3))
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y + seed * 5) % 64 * 4], -1) + noise
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format=image_format)
    return buffer.getvalue()


def write_img2dataset_shards(folder: Path, count: int = 31, per_shard: int = 12) -> list[str]:
    """Shards as img2dataset writes them (webdataset.ShardWriter, 00000.tar ...): full-size JPEGs
    of several sizes with .cls, .json and .txt beside them; sample NO_IMAGE has no image, sample
    CORRUPT a broken JPEG. Returns the keys of the readable images."""
    folder.mkdir(parents=True, exist_ok=True)
    readable = []
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            key = f"{i:09d}"
            height, width = 40 + (i * 37) % 160, 48 + (i * 53) % 200
            sample = {"__key__": key, "jpg": photo(height, width, i), "cls": i % 10, "txt": f"caption {i}",
                      "json": {"key": key, "width": width, "height": height, "status": "success"}}
            if i == NO_IMAGE:
                del sample["jpg"]
                sample["json"]["status"] = "failed_to_download"
            elif i == CORRUPT:
                sample["jpg"] = b"\xff\xd8\xff\xe0 a cut download"
            else:
                readable.append(key)
            sink.write(sample)
    return readable


def one_epoch(shards: manifest.Manifest, batch: int) -> tuple[list[str], list[torch.Tensor], dict]:
    reader = epochs.EpochBatches(shards, batch, 0, 1, 0, 0, 0, 0, 8, 0)
    batches = stream.ShardBatches(shards, batch, 0, 1, 0, loader_workers=0, epochs=reader)
    keys, images = [], []
    for _ in range(reader.steps):
        images.append(next(batches))
        keys += batches.keys
    return keys, images, batches.counts()


def test_img2dataset_shards_are_indexed_from_their_headers_and_each_readable_image_read_once_an_epoch(tmp_path, capsys):
    readable = write_img2dataset_shards(tmp_path / "shards")  # 31 samples: 30 with a JPEG, 29 of them readable
    out = tmp_path / "manifest.json"
    assert shards_cli.main(["index", str(tmp_path / "shards" / "{00000..00002}.tar"), "--out", str(out), "--no-progress"]) == 0
    assert "30 images in 3 shards (3 indexed now, 0 unreadable shards skipped, 1 samples without" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["original_size"] is True and doc["image_size"] == 0 and doc["image_keys"] == ["jpg", "jpeg", "png", "webp"]
    assert [shard["num_samples"] for shard in doc["shards"]] == [11, 12, 7]
    assert [shard["bytes"] for shard in doc["shards"]] == [(tmp_path / "shards" / f"{i:05d}.tar").stat().st_size for i in range(3)]
    assert doc["report"]["samples_without_image"] == 1 and doc["report"]["unreadable_shards"] == []
    # the counts are webdataset's own: its reader, grouping members by key, finds as many samples with a jpg
    for shard in doc["shards"]:
        assert sum("jpg" in sample for sample in wds.WebDataset(shard["url"], shardshuffle=False)) == shard["num_samples"]

    shards = manifest.read(str(out)).at_size(16)
    keys, images, counts = one_epoch(shards, 10)  # 30 // 10 = 3 steps: every image of the epoch
    assert set(keys) == set(readable) and len(keys) == 30  # the corrupt one's place is filled by another image
    assert counts["corrupt_samples"] == 1 and counts["repeated_samples"] == 1 and counts["bad_shards"] == 0
    assert all(batch.shape == (10, 3, 16, 16) for batch in images)
    # each image is the packer's crop and resize of the original: the same function on the same bytes
    originals = {sample["__key__"]: sample.get("jpg") for sample in wds.WebDataset(str(tmp_path / "shards" / "00000.tar"), shardshuffle=False)}
    at = keys.index(readable[0])
    expected = decode.to_unit_range(decode_resized(originals[readable[0]], 16))
    assert torch.equal(images[at // 10][at % 10], expected)


def test_indexed_and_packed_copies_train_on_the_same_pixels(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with wds.TarWriter(str(tmp_path / "full.tar")) as sink:
        for i, (height, width) in enumerate([(90, 120), (120, 70), (33, 33), (200, 150), (12, 20), (64, 64)]):
            data = photo(height, width, i, "PNG")  # lossless: the packer's PNG holds exactly its resized pixels
            (folder / f"{i:03d}.png").write_bytes(data)
            sink.write({"__key__": f"{i:03d}", "png": data})
    packed = manifest.read(pack.pack("folder", str(folder), str(tmp_path / "packed"), 32, "png", shard_size=10, progress=False)["manifest"])
    index.index([str(tmp_path / "full.tar")], str(tmp_path / "indexed.json"), progress=False)
    indexed = manifest.read(str(tmp_path / "indexed.json")).at_size(32)
    packed_images = torch.cat(list(stream.read_once(packed, 6)))
    indexed_images = torch.cat(list(stream.read_once(indexed, 6)))
    assert packed_images.shape == indexed_images.shape == (6, 3, 32, 32) and torch.equal(packed_images, indexed_images)


def test_device_decode_resizes_as_the_packer_does_within_a_level():
    jpegs = [photo(height, width, seed) for seed, (height, width) in enumerate([(375, 500), (500, 333), (40, 90), (20, 24), (64, 64)])]
    on_device, corrupt = decode.decode_on_device([decode.as_tensor(data) for data in jpegs], 32, "cpu", resize=True)
    assert corrupt == 0 and on_device.shape == (5, 3, 32, 32)
    for image, data in zip(on_device, jpegs):
        difference = (image.int() - decode_resized(data, 32).int()).abs()  # torch's antialiased bicubic against PIL's
        assert difference.max() <= 2 and difference.float().mean() < 0.3
    mixed = [decode.as_tensor(jpegs[0]), decode.as_tensor(b"\xff\xd8 broken"), decode.as_tensor(jpegs[2])]
    filled, corrupt = decode.decode_on_device(mixed, 32, "cpu", resize=True)
    assert corrupt == 1 and torch.equal(filled[1], filled[0])


def test_index_on_s3_lists_unreadable_shards_reads_large_members_by_ranges_and_resumes(s3_bucket, tmp_path, capsys):
    write_img2dataset_shards(tmp_path / "shards", count=24)
    bucket = boto3.client("s3")
    for i in range(2):
        bucket.upload_file(str(tmp_path / "shards" / f"{i:05d}.tar"), s3_bucket, f"train/{i:05d}.tar")
    with wds.TarWriter(str(tmp_path / "large.tar")) as sink:  # 400 kB images: their bytes are jumped over
        for i in range(6):
            sink.write({"__key__": f"large{i}", "jpg": bytes(400_000), "json": b"{}"})
    bucket.upload_file(str(tmp_path / "large.tar"), s3_bucket, "train/00002.tar")
    bucket.put_object(Bucket=s3_bucket, Key="train/00003.tar", Body=(tmp_path / "large.tar").read_bytes()[:512_000])  # cut in a member
    pattern, out = f"s3://{s3_bucket}/train/{{00000..00001}}.tar", f"s3://{s3_bucket}/index/manifest.json"
    assert index.index([pattern], out, progress=False)["indexed_now"] == 2
    listed = f"s3://{s3_bucket}/lists/shards.txt"  # a list file: a pattern, relative names and a comment
    s3.write_bytes(listed, f"# img2dataset output\n{pattern}\n../train/00002.tar\n../train/00003.tar\n../train/00004.tar\n".encode())
    report = index.index([listed], out, progress=False)
    assert report["indexed_now"] == 3 and report["shards"] == 3 and report["samples"] == 23 + 6, report
    assert [(shard["url"].rsplit("/", 1)[1], "not found" in shard["error"]) for shard in report["unreadable_shards"]] == \
        [("00003.tar", False), ("00004.tar", True)]
    assert "the tar stream ends" in report["unreadable_shards"][0]["error"] and "short of a member" in report["unreadable_shards"][0]["error"]
    state = json.loads(s3.read_bytes(index.state_url(out)))["shards"]
    large = state[f"s3://{s3_bucket}/train/00002.tar"]
    assert large["num_samples"] == 6 and large["bytes_read"] < large["bytes"] / 4 and large["requests"] <= 8
    small = state[f"s3://{s3_bucket}/train/00000.tar"]
    assert small["requests"] < small["num_samples"]  # small members: a few growing ranges, not a GET per header
    doc = json.loads(s3.read_bytes(out))
    assert [shard["url"] for shard in doc["shards"]] == [f"s3://{s3_bucket}/train/{i:05d}.tar" for i in range(3)]
    assert doc["report"]["shards_listed"] == 5 and len(doc["report"]["unreadable_shards"]) == 2
    # the prefix of the shards indexes the same; the trainer's reader reads them at 8 px
    prefix = index.index([f"s3://{s3_bucket}/train/"], f"s3://{s3_bucket}/other/manifest.json", progress=False)
    assert prefix["samples"] == report["samples"]
    keys, _, counts = one_epoch(manifest.read(out).at_size(8), 29)
    assert len(set(keys)) == 22 and counts["corrupt_samples"] == 1 + 6 and counts["bad_shards"] == 0  # the large shard holds no real JPEG


def test_bad_index_input_and_data_naming_shards_exit_2_with_one_line(tmp_path, s3_bucket, monkeypatch, capsys, mlflow_sqlite):
    write_img2dataset_shards(tmp_path / "shards", count=5)
    out = str(tmp_path / "manifest.json")
    for sources, named in (([""], "an empty shard pattern"), ([str(tmp_path / "none-{000..003}.tar")], "no shard could be read: 4 of 4"),
                           ([str(tmp_path / "shards" / "{00000..}.tar")], "a malformed brace pattern"),
                           ([str(tmp_path / "shards" / "{00000..00001.tar")], "unbalanced braces"),
                           ([str(tmp_path / "empty") + "/"], "no .tar shards there"), ([str(tmp_path / "nolist.txt")], "nolist.txt")):
        assert shards_cli.main(["index", *sources, "--out", out, "--no-progress"]) == 2, sources
        err = capsys.readouterr().err.strip()
        assert named in err and err.count("\n") == 0 and "Traceback" not in err, err
    assert shards_cli.main(["index", str(tmp_path / "shards" / "00000.tar"), "--out", out, "--image-key", "jpg,tiff"]) == 2
    assert "--image-key takes some of jpg,jpeg,png,webp" in capsys.readouterr().err
    # --data naming shards: told to index them, before any shard is listed or read
    for data in (f"s3://{s3_bucket}/train-{{000000..001023}}.tar", str(tmp_path / "shards" / "00000.tar")):
        assert train_main(train_args(tmp_path, mlflow_sqlite, data=data)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "names shards without a manifest" in err and "python -m dcgan_dist.shards index" in err
    # an S3 prefix without credentials: one line saying so, not a shard-by-shard failure
    without_s3_credentials(monkeypatch, tmp_path)
    s3._clients.clear()
    for source in (f"s3://{s3_bucket}/train/", f"s3://{s3_bucket}/train/{{00000..00002}}.tar"):
        assert shards_cli.main(["index", source, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no S3 credentials found" in err and "no shard could be read" not in err and err.count("\n") == 0, err


def test_plan_resume_and_bench_work_on_an_indexed_manifest(tmp_path, capsys):
    write_img2dataset_shards(tmp_path / "shards", count=49, per_shard=10)
    out = str(tmp_path / "manifest.json")
    index.index([str(tmp_path / "shards") + "/"], out, progress=False)
    shards = manifest.read(out).at_size(8)
    assert shards.num_samples == 48
    straight = resumed_equals_uninterrupted(shards, 2, 0, 4, cuts=(1, 3))  # 48 // 16 = 3 steps: the whole epoch
    assert shards_cli.main(["plan", out, "--world-size", "2", "--loader-workers", "1", "--batch-size", "16", "--shuffle-buffer", "16"]) == 0
    planned = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    read = [[str(rank), key] for rank in (0, 1) for batch in straight[rank][:3] for key in batch]
    differ = [planned_key for planned_key, read_key in zip(planned, read) if planned_key != read_key]
    assert len(planned) == len(read) == 48 and differ == [[differ[0][0], f"{CORRUPT:09d}"]]  # the reader fills the broken JPEG's place
    assert shards_cli.main(["bench", out, "--image-size", "32", "--loader-workers", "0", "--batch-size", "8", "--seconds", "0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("48 32 px original images (original-size images, resized as read) in 5 shards")
    assert float(re.fullmatch(r"shards bench: (\d+) img/s with 0 loader processes", lines[-1]).group(1)) > 0
    assert shards_cli.main(["bench", out, "--loader-workers", "0"]) == 2
    assert "is one: give training's --image-size" in capsys.readouterr().err
    assert shards_cli.main(["inspect", out]) == 2 and "is an indexed manifest" in capsys.readouterr().err
    assert pickle.loads(pickle.dumps(shards)) == shards and shards.image_keys == ("jpg", "jpeg", "png", "webp")  # loader processes get it pickled


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_webdataset_reads_packed_shards(tmp_path, image_format):
    url = pack.pack("digits", None, str(tmp_path), 16, image_format, shard_size=700, progress=False)["manifest"]
    packed = manifest.read(url)
    images = [sample[0] for sample in wds.WebDataset(packed.shard_urls, shardshuffle=False).decode("rgb8").to_tuple("jpg;png")]
    assert len(images) == packed.num_samples == 1797 and all(image.shape == (16, 16, 3) for image in images)


@pytest.mark.slow
def test_training_from_indexed_s3_shards_sees_each_readable_image_once_an_epoch(ray_local, mlflow_sqlite, s3_bucket, tmp_path):
    readable = write_img2dataset_shards(tmp_path / "shards", count=33)  # 32 with a JPEG: 2 steps of 16 an epoch
    bucket = boto3.client("s3")
    for path in sorted((tmp_path / "shards").glob("*.tar")):
        bucket.upload_file(str(path), s3_bucket, f"img2dataset/{path.name}")
    out = f"s3://{s3_bucket}/img2dataset/manifest.json"
    index.index([f"s3://{s3_bucket}/img2dataset/{{00000..00002}}.tar"], out, progress=False)
    args = train_args(tmp_path, mlflow_sqlite, data=out, batch_size=16, max_epochs=2,
                      loader_workers=1, shuffle_buffer=8, eval_every=0, sample_log=str(tmp_path / "samples"),
                      checkpoint_every=4, sample_every=4, log_every=2, max_corrupt_fraction=0.2)
    del args[args.index("--max-steps"):args.index("--max-steps") + 2]
    assert train_main(args) == 0
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "data/corrupt_samples")) == 2  # the broken JPEG, once an epoch
    kept = kept_keys(tmp_path / "samples")
    assert sorted(kept) == [1, 2, 3, 4]
    for epoch in (0, 1):
        seen = [key for step in (2 * epoch + 1, 2 * epoch + 2) for key in kept[step]]
        assert set(seen) == set(readable) and len(seen) == 32  # the corrupt image's place filled by another
