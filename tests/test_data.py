"""Shards: packing from every source, streaming from a real S3 endpoint on 127.0.0.1 (moto's
server), skipping and counting bad data, equal steps per rank, and the preflight's errors."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import lmdb
import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow import MlflowClient
from PIL import Image

from dcgan_dist import checkpoint, config
from dcgan_dist.config import ConfigError
from dcgan_dist.data import epochs, manifest, pack, s3, split, stream
from dcgan_dist.data.decode import decode
from dcgan_dist.data.preview import inspect_manifest as inspect
from dcgan_dist.data.sources import lsun
from dcgan_dist.train import main, preflight
from tests.conftest import train_args


def jpeg(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(out: str, sizes: list[int], corrupt_per_shard: int = 0, image_size: int = 32) -> str:
    """Hand-made shards (good JPEGs, optionally some corrupt ones) + manifest under `out`."""
    records = []
    for index, size in enumerate(sizes):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as sink:
            for i in range(size):
                data = b"\xff\xd8 not a jpeg" if i < corrupt_per_shard else jpeg((image_size, image_size), (i * 7 % 255, 90, 40))
                sink.write({"__key__": f"{index:03d}{i:06d}", "jpg": data})
        s3.write_bytes(s3.join(out, pack.shard_name(index)), buffer.getvalue())
        records.append({"url": pack.shard_name(index), "num_samples": size})
    url = s3.join(out, "manifest.json")
    manifest.write(url, manifest.Manifest(url, "test", image_size, "jpeg", records), "test")
    return url


# ---------------------------------------------------------------- packing


@pytest.mark.slow
def test_pack_digits_to_s3_and_read_back_the_exact_count(s3_bucket, tmp_path):
    report = pack.pack("digits", None, f"s3://{s3_bucket}/digits32", 32, shard_size=400, workers=2, progress=False)
    assert report == {"manifest": f"s3://{s3_bucket}/digits32/manifest.json", "shards": 5, "packed_now": 5,
                      "samples": 1797, "skipped": []}
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {f"digits32/shard-00000{i}.tar" for i in range(5)} <= keys

    shards = manifest.read(report["manifest"])
    assert (shards.source, shards.image_size, shards.num_samples) == ("digits", 32, 1797)
    assert [s["num_samples"] for s in shards.shards] == [400, 400, 400, 400, 197]
    assert all(len(s["sha256"]) == 64 for s in shards.shards)

    result = inspect(report["manifest"], str(tmp_path / "preview.png"))
    assert result["samples_read"] == 1797 and result["problems"] == []  # sha256 and counts agree
    assert Image.open(tmp_path / "preview.png").size == (8 * 34 + 2, 8 * 34 + 2)


def test_shards_cli_packs_and_inspects(tmp_path, capsys):
    from dcgan_dist import shards

    out = tmp_path / "cli"
    assert shards.main(["pack", "--source", "digits", "--out", str(out), "--image-size", "32",
                        "--shard-size", "1000", "--format", "png", "--no-progress"]) == 0
    assert "1797 images in 2 shards" in capsys.readouterr().out
    assert shards.main(["inspect", str(out / "manifest.json"), "--preview", str(tmp_path / "grid.png")]) == 0
    printed = capsys.readouterr().out
    assert "samples_read    1797" in printed and "image_format    png" in printed
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:5000])  # truncate
    assert shards.main(["inspect", str(out / "manifest.json"), "--preview", str(tmp_path / "grid.png")]) == 1
    assert "shard-000001.tar: sha256 differs" in capsys.readouterr().out
    assert shards.main(["inspect", str(tmp_path / "nothing" / "manifest.json")]) == 2
    assert "nothing/manifest.json" in capsys.readouterr().err


def test_pack_resumes_without_redoing_finished_shards(tmp_path):
    out = tmp_path / "digits"
    pack.pack("digits", None, str(out), 32, shard_size=600, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    # an interrupted pack: one shard and the manifest never got written
    (out / "shard-000001.tar").unlink()
    (out / "manifest.json").unlink()
    time.sleep(0.01)
    report = pack.pack("digits", None, str(out), 32, shard_size=600, progress=False)
    assert report["packed_now"] == 1 and report["samples"] == 1797
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert inspect(str(out / "manifest.json"))["problems"] == []
    with pytest.raises(ValueError, match="other settings"):
        pack.pack("digits", None, str(out), 64, shard_size=600, progress=False)


def tiny_cifar_archive(path: Path, count: int = 12) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, (count, 3072), dtype=np.uint8)
    batch = pickle.dumps({b"data": pixels, b"labels": list(range(count))})
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(batch)
        archive.addfile(info, io.BytesIO(batch))
    return pixels


def test_pack_cifar10_from_its_python_archive(tmp_path):
    pixels = tiny_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    report = pack.pack("cifar10", str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "out"), 32,
                       image_format="png", shard_size=5, progress=False)
    assert (report["shards"], report["samples"]) == (3, 12)
    # PNG is lossless and CIFAR is 32 px already: the first image comes back bit for bit
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as shard:
        first = shard.extractfile("000000000.png").read()
    expected = pixels[0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), expected)


def test_pack_lsun_from_lmdb_centre_crops(tmp_path):
    env = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=2**24)
    with env.begin(write=True) as txn:
        for i in range(5):  # 60x40 landscape: green bands left and right of a red 40x40 centre
            image = Image.new("RGB", (60, 40), (0, 255, 0))
            image.paste((255, 0, 0), (10, 0, 50, 40))
            buffer = io.BytesIO()
            image.save(buffer, format="WEBP", lossless=True)
            txn.put(f"{i:040x}".encode(), buffer.getvalue())
    env.close()
    report = pack.pack("lsun", str(tmp_path / "bedroom_train_lmdb"), str(tmp_path / "out"), 32, progress=False)
    assert report["samples"] == 5
    shards = manifest.read(report["manifest"])
    with tarfile.open(shards.shard_urls[0]) as shard:
        image = decode(shard.extractfile("000000000.jpg").read(), 32)
    assert image.shape == (3, 32, 32)
    # only the red centre survives the crop (JPEG blurs the edges a little)
    assert image[0].mean() > 0.9 and image[1].mean() < -0.8


def write_lmdb(path: Path, values: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=2**27)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()


def test_lsun_listing_reads_keys_only(tmp_path, monkeypatch):
    # small values sit beside their keys in the leaf pages, large ones on overflow pages of their own
    rng = np.random.default_rng(0)
    values = {f"{i * 7919 % 5000:040x}".encode(): rng.bytes(64 * 2**10 if i % 60 == 0 else 100) for i in range(3000)}
    write_lmdb(tmp_path / "lmdb", values)
    env = lmdb.open(str(tmp_path / "lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        tree = txn.stat()
    env.close()
    assert tree["depth"] >= 2 and tree["overflow_pages"] >= 50 * 16
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: reads.append(offset) or real_pread(fd, size, offset))
    assert lsun.list_keys(str(tmp_path / "lmdb")) == sorted(values)  # the cursor's order
    pages_read = {offset // 4096 for offset in reads}
    assert len(pages_read) == 2 + tree["branch_pages"] + tree["leaf_pages"]  # the two meta pages, no value's page


def test_pack_lsun_writes_each_key_once_in_order_across_shards(tmp_path):
    colours = [(i * 20, 255 - i * 20, 100) for i in range(11)]
    values = {f"{i:040x}".encode(): jpeg((48, 36), colour) for i, colour in enumerate(colours)}
    values[f"{5:040x}".encode()] = b"not an image"  # skipped and reported, the rest keep their places
    write_lmdb(tmp_path / "lmdb", values)
    report = pack.pack("lsun", str(tmp_path / "lmdb"), str(tmp_path / "out"), 32, shard_size=4, progress=False)
    assert (report["shards"], report["samples"]) == (3, 10)
    assert len(report["skipped"]) == 1 and f"{5:040x}" in report["skipped"][0]
    shards = manifest.read(report["manifest"])
    assert [shard["num_samples"] for shard in shards.shards] == [4, 3, 3]
    read = {}
    for url in shards.shard_urls:
        with tarfile.open(url) as shard:
            read |= {Path(m.name).stem: decode(shard.extractfile(m).read(), 32) for m in shard.getmembers()}
    assert sorted(read) == [f"{i:09d}" for i in range(11) if i != 5]
    for key, image in read.items():  # sample i is the lmdb's i-th key, its colour
        expected = torch.tensor(colours[int(key)], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.05), key


def test_pack_imagenet_folder_and_any_folder_skip_unreadable_images(tmp_path):
    for synset, count in (("n01440764", 3), ("n01443537", 2)):
        folder = tmp_path / "ILSVRC" / "train" / synset
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{synset}_{i}.JPEG").write_bytes(jpeg((50, 70)))
    (tmp_path / "ILSVRC" / "train" / "n01443537" / "broken.JPEG").write_bytes(b"not an image")
    report = pack.pack("imagenet", str(tmp_path / "ILSVRC"), str(tmp_path / "inet"), 32, progress=False)
    assert report["samples"] == 5
    assert len(report["skipped"]) == 1 and "broken.JPEG" in report["skipped"][0]  # reported, not hidden

    report = pack.pack("folder", str(tmp_path / "ILSVRC"), str(tmp_path / "any"), 64, progress=False)
    assert report["samples"] == 5 and len(report["skipped"]) == 1
    assert manifest.read(report["manifest"]).image_size == 64


# ---------------------------------------------------------------- streaming


def test_corrupt_image_truncated_and_missing_shards_are_skipped_and_counted(s3_bucket):
    out = f"s3://{s3_bucket}/bad"
    url = write_shards(out, [10, 10, 10, 10], corrupt_per_shard=0)
    client = boto3.client("s3")
    # shard 1: one corrupt image and one sample without an image key
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        sink.write({"__key__": "c0", "jpg": b"\xff\xd8 broken"})
        sink.write({"__key__": "c1", "txt": "no image here"})
        for i in range(8):
            sink.write({"__key__": f"g{i}", "jpg": jpeg()})
    client.put_object(Bucket=s3_bucket, Key="bad/shard-000001.tar", Body=buffer.getvalue())
    # shard 2: truncated mid-file; shard 3: vanished
    whole = client.get_object(Bucket=s3_bucket, Key="bad/shard-000002.tar")["Body"].read()
    client.put_object(Bucket=s3_bucket, Key="bad/shard-000002.tar", Body=whole[: len(whole) // 2 + 100])
    client.delete_object(Bucket=s3_bucket, Key="bad/shard-000003.tar")

    shards = manifest.read(url)
    counters = stream.Counters()
    samples = stream.read_shards(({"url": u} for u in shards.shard_urls), counters, shards.expected_samples(), retries=1)
    images = list(stream.decode_samples(samples, counters, 32))
    assert counters.corrupt_samples == 2 and counters.bad_shards == 2
    assert len(images) == counters.samples and 18 <= counters.samples < 28
    assert all(image.shape == (3, 32, 32) for image in images)


def test_corrupt_share_above_the_limit_stops_with_a_clear_error():
    stream.check_corrupt_share(1, 99, 0.01)  # exactly 1 %: allowed
    with pytest.raises(stream.DataError, match=r"2 of 100 images .* --max-corrupt-fraction 0.01"):
        stream.check_corrupt_share(2, 98, 0.01)


def test_reading_shards_leaves_the_global_rng_to_the_training_loop(tmp_path):
    """The loop restores the global RNG from a checkpoint, then opens the stream, then draws each
    step's latents from that RNG: opening the reader, and starting each nominal epoch, must not
    draw from it, or a resumed run's latents shift against an uninterrupted run's."""
    shards = manifest.read(write_shards(str(tmp_path), [20, 12], image_size=8))  # 32 images: 4 steps of 8 per epoch
    for sampling in ("resampled", "epochs"):
        reader = epochs.EpochBatches(shards, 8, 0, 1, 0, 0, 0, 0, 8, 0) if sampling == "epochs" else None
        torch.manual_seed(0)
        before = torch.get_rng_state()
        batches = stream.ShardBatches(shards, 8, 0, 1, seed=0, loader_workers=0, shuffle_buffer=8, epochs=reader)
        taken = [next(batches) for _ in range(10)]  # across two epoch ends
        assert batches.position == split.Position(2, 2, 4), sampling
        assert torch.equal(torch.get_rng_state(), before), sampling
        again = stream.ShardBatches(shards, 8, 0, 1, seed=0, loader_workers=0, shuffle_buffer=8,
                                    epochs=epochs.EpochBatches(shards, 8, 0, 1, 0, 0, 0, 0, 8, 0) if reader else None)
        assert all(torch.equal(next(again), batch) for batch in taken), sampling  # the order still follows the seed


@pytest.mark.slow
def test_two_ranks_on_uneven_shards_take_the_same_number_of_steps(s3_bucket):
    url = write_shards(f"s3://{s3_bucket}/uneven", [50, 7, 3, 30])  # 90 images, 4 very uneven shards
    shards = manifest.read(url)
    steps = []
    for rank in (0, 1):
        batches = stream.ShardBatches(shards, 16, rank, 2, seed=0, loader_workers=2, shuffle_buffer=16)
        assert batches.steps_per_epoch == 90 // 16
        # one nominal epoch of this rank, each batch taken off its shared-memory slot (which frees it)
        steps.append(sum(1 for ticket, *_ in batches.loader if batches.ring.take(ticket, "cpu") is not None))
        assert all(next(batches).shape == (8, 3, 32, 32) for _ in range(20))  # and it never runs dry
    assert steps[0] == steps[1] >= 90 // 16


# ---------------------------------------------------------------- preflight


def cfg_for(data: str, **overrides) -> config.Config:
    return config.from_flat({"data": data, "batch_size": 16} | overrides)


def test_preflight_names_the_url_or_field_at_fault(s3_bucket, mlflow_sqlite, monkeypatch):
    url = write_shards(f"s3://{s3_bucket}/ok", [20, 20])
    assert preflight(cfg_for(url, tracking_uri=mlflow_sqlite)).data.data == url  # a good manifest passes
    # --max-epochs becomes steps: an epoch is 40 // 16 steps, on any number of workers
    assert preflight(cfg_for(url, tracking_uri=mlflow_sqlite, max_epochs=3, num_workers=2)).loop.max_steps == 3 * (40 // 16)
    with pytest.raises(ConfigError, match="--batch-size: s3://.* has 40 images, too few"):
        preflight(cfg_for(url, batch_size=64, tracking_uri=mlflow_sqlite))

    missing = f"s3://{s3_bucket}/nowhere/manifest.json"
    with pytest.raises(ConfigError, match=f"--data: {missing}: not found"):
        preflight(cfg_for(missing))
    with pytest.raises(ConfigError, match="no such bucket"):
        preflight(cfg_for(f"s3://no-such-bucket-{s3_bucket}/manifest.json"))
    with pytest.raises(ConfigError, match=r"--image-size: 64 disagrees with field 'image_size' = 32 of manifest s3://"):
        preflight(cfg_for(url, image_size=64))
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="ok/shard-000000.tar")
    with pytest.raises(ConfigError, match="first shard s3://.*shard-000000.tar is missing"):
        preflight(cfg_for(url))

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3._clients.clear()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"--data: s3://.*manifest.json: endpoint http://127.0.0.1:9 unreachable"):
        preflight(cfg_for(url))
    assert time.perf_counter() - started < 15


# boto3's credential chain, beyond the files and the metadata service the test below points elsewhere
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def without_s3_credentials(monkeypatch, tmp_path) -> Path:
    """No S3 credentials anywhere boto3 looks: environment, empty credential and config files, no
    instance metadata (never ask 169.254.169.254)."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return empty


def test_preflight_without_credentials_says_none_were_found_and_where_it_looked(s3_bucket, mlflow_sqlite, tmp_path,
                                                                                monkeypatch, capsys):
    url = write_shards(f"s3://{s3_bucket}/nocredentials", [20])
    empty = without_s3_credentials(monkeypatch, tmp_path)
    s3._clients.clear()
    assert main(train_args(tmp_path, mlflow_sqlite, data=url)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error and "unreachable" not in error
    assert f"--data: {url}: no S3 credentials found; boto3 looks in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile " \
           f"'default' (AWS_PROFILE) in {empty} (AWS_SHARED_CREDENTIALS_FILE) and {empty} (AWS_CONFIG_FILE), " \
           "AWS_WEB_IDENTITY_TOKEN_FILE, container credentials, the EC2 instance metadata service" in error

    monkeypatch.setenv("AWS_PROFILE", "nowhere")  # a profile in neither file
    s3._clients.clear()
    assert main(train_args(tmp_path, mlflow_sqlite, data=url)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unreachable" not in error
    assert f"--data: {url}: S3 credentials: The config profile (nowhere) could not be found; boto3 looks in " \
           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile 'nowhere' (AWS_PROFILE)" in error

    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # half a key pair
    s3._clients.clear()
    assert main(train_args(tmp_path, mlflow_sqlite, data=url)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unreachable" not in error
    assert f"--data: {url}: S3 credentials: Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY; boto3 " \
           "looks in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in error
    s3._clients.clear()


@pytest.mark.slow
def test_missing_manifest_exits_2_naming_the_url(s3_bucket, tmp_path):
    missing = f"s3://{s3_bucket}/gone/manifest.json"
    result = subprocess.run([sys.executable, "-m", "dcgan_dist.train", "--data", missing,
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert missing in result.stderr and "not found" in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # rejected before Ray starts


# ---------------------------------------------------------------- training from S3


@pytest.mark.slow
def test_two_workers_train_from_s3_on_uneven_shards_and_log_counts(ray_local, mlflow_sqlite, s3_bucket, tmp_path,
                                                                   monkeypatch, capsys):
    import ray.train

    secret = "s3cr3t-never-logged"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any; the workers need it too
    # uneven shards, one corrupt image in each: every shard read adds to data/corrupt_samples
    url = write_shards(f"s3://{s3_bucket}/train", [40, 40, 13, 5], corrupt_per_shard=1)
    # --max-epochs 2: 98 images are 3 steps of 32 per epoch (2 left out), so the run ends at step 6
    args = train_args(tmp_path, mlflow_sqlite, data=url, num_workers=2, max_epochs=2, log_every=3,
                      sample_every=6, checkpoint_every=6, loader_workers=1, shuffle_buffer=20,
                      max_corrupt_fraction=0.3)
    del args[args.index("--max-steps"):args.index("--max-steps") + 2]
    assert main(args) == 0

    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.data"] == url
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_d")) == list(range(1, 7))
    assert run.data.params["derived.stop_rule"] == "max_epochs" and run.data.params["loop.max_steps"] == "6"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [(3, 1.0), (6, 2.0)]
    with ray.train.Result.from_path(str(tmp_path / "ray_results" / "test")).checkpoint.as_directory() as directory:
        assert checkpoint.load_state(directory)["data_position"] == {
            "sampling": "epochs", "epoch": 2, "step_in_epoch": 0, "steps_per_epoch": 3, "global_batch": 32, "world_size": 2,
            "loader_workers": 1, "segments": [[0, 2, 1]]}
    # the corrupt first image of each shard read keeps its place, filled by another image
    repeated = client.get_metric_history(run.info.run_id, "data/repeated_samples")
    assert max(m.value for m in repeated) == max(m.value for m in client.get_metric_history(run.info.run_id, "data/corrupt_samples"))
    corrupt = client.get_metric_history(run.info.run_id, "data/corrupt_samples")
    assert sorted(m.step for m in corrupt) == [3, 6]
    assert max(m.value for m in corrupt) >= 2  # both ranks read at least one shard
    assert client.get_metric_history(run.info.run_id, "data/bad_shards") == []  # none: a zero counter is not logged
    # the credentials reached the workers but no param, tag, checkpoint, artifact or log file
    assert not any(secret in str(value) for value in {**run.data.params, **run.data.tags}.values())
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []

    # 1 corrupt image in 40 (or in 5) is more than a 0.1 % limit allows: the run stops, saying why
    strict = train_args(tmp_path, mlflow_sqlite, data=url, max_steps=3, log_every=3, run_name="strict",
                        loader_workers=0, shuffle_buffer=20, max_corrupt_fraction=0.001)
    capsys.readouterr()
    assert main(strict) == 1
    [summary] = [line for line in capsys.readouterr().err.splitlines() if "training failed (" in line]  # one line
    assert "training failed (rank 0: " in summary and "more than --max-corrupt-fraction 0.001" in summary, summary
    assert "re-run the same command to resume" in summary


def test_every_source_counts_what_the_loop_reduces():
    """The loop sums counts()[name] for each of the reader's COUNT_NAMES on every rank; the
    bundled digits must have each of them (at 0), or every digits run fails at its first window."""
    from dcgan_dist import config, data
    from dcgan_dist.data.stream import COUNT_NAMES

    batches = data.open_batches(config.Config(), rank=0, world_size=1)
    next(batches)
    assert set(batches.counts()) == set(COUNT_NAMES) and not any(batches.counts().values())
