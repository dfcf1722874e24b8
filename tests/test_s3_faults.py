"""Object-store faults, through a fault-injecting proxy (tests/fault_proxy.py) in front of the
loopback S3 endpoint: throttling (503 SlowDown), bodies cut mid-read and stalls, during the
preflight's manifest read, shard streaming and checkpoint writes and reads (pyarrow); retried,
counted, and an endpoint that stays down fails with one line naming it. A shard replaced while
it is read is never spliced."""

from __future__ import annotations

import io
import logging
import pickle
import random
import time

import boto3
import pytest
import webdataset as wds
from mlflow import MlflowClient

from dcgan_dist.checkpoint_upload import staging_root
from dcgan_dist.data import manifest, s3, stream
from dcgan_dist.train import check_manifest, main, storage
from tests.conftest import start_local_ray, train_args
from tests.fault_proxy import Fault, FaultProxy
from tests.test_data import cfg_for, write_shards


@pytest.fixture
def fault_proxy(s3_endpoint, s3_bucket, monkeypatch):
    """The proxy in front of the session's S3 endpoint; boto3 and pyarrow reach S3 through it."""
    proxy = FaultProxy(s3_endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3._clients.clear()
    yield proxy
    proxy.stop()
    s3._clients.clear()


def samples_of(shards: manifest.Manifest, counters: stream.Counters, retries: int = 3) -> list[tuple[str, bytes]]:
    samples = stream.read_shards(({"url": url} for url in shards.shard_urls), counters, shards.expected_samples(), retries)
    return [(sample["__key__"], sample["jpg"]) for sample in samples]


# ---------------------------------------------------------------- the preflight's manifest read


def test_manifest_read_survives_throttling_and_a_cut_body(fault_proxy, s3_bucket):
    url = write_shards(f"s3://{s3_bucket}/faults", [20, 20])
    clean = s3.read_bytes(url, fast=True)
    fault_proxy.schedule(Fault("slowdown", times=2, method="GET", path="manifest"),
                         Fault("cut", times=1, method="GET", path="manifest", after_bytes=len(clean) // 2))
    retries_before = s3.retry_count()
    assert check_manifest(cfg_for(url)) == 40  # the preflight's read; it used to stop the job (IncompleteReadError)
    assert fault_proxy.injected == {"slowdown": 2, "cut": 1}
    assert s3.retry_count() - retries_before == 3  # two botocore retries, one resumed body
    assert s3.read_bytes(url, fast=True) == clean


def test_a_body_stalled_past_the_read_timeout_is_resumed(fault_proxy, s3_bucket):
    url = write_shards(f"s3://{s3_bucket}/stall", [20])
    clean = s3.read_bytes(url, fast=True)
    fault_proxy.schedule(Fault("stall", method="GET", path="manifest", after_bytes=100, seconds=s3.FAST.read_timeout + 2))
    started = time.monotonic()
    assert s3.read_bytes(url, fast=True) == clean
    assert fault_proxy.injected == {"stall": 1}
    assert time.monotonic() - started < s3.FAST.read_timeout + 2  # given up on at the read timeout, not waited out


def test_an_endpoint_that_stays_down_fails_the_preflight_in_one_line(fault_proxy, s3_bucket, mlflow_sqlite, tmp_path, capsys):
    url = write_shards(f"s3://{s3_bucket}/down", [20, 20])
    fault_proxy.schedule(Fault("slowdown", times=None))  # throttled for good
    assert main(train_args(tmp_path, mlflow_sqlite, data=url)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert f"--data: {url}: endpoint {fault_proxy.url} failing: SlowDown 503, still after {s3.FAST_RETRIES} retries" in error
    assert fault_proxy.injected["slowdown"] == s3.FAST_RETRIES + 1

    fault_proxy.stop()  # gone: connections refused
    assert main(train_args(tmp_path, mlflow_sqlite, data=url)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"--data: {url}: endpoint {fault_proxy.url} unreachable" in error
    assert "check AWS_ENDPOINT_URL" in error


# ---------------------------------------------------------------- shard streaming


def test_shard_stream_survives_throttling_and_cuts_mid_shard_reading_every_sample_once(fault_proxy, s3_bucket, monkeypatch):
    shards = manifest.read(write_shards(f"s3://{s3_bucket}/stream", [30, 30, 30]))
    clean = samples_of(shards, stream.Counters())
    assert fault_proxy.injected == {} and len(clean) == 90
    shard_bytes = len(s3.read_bytes(shards.shard_urls[2]))
    # Cheaper than the shipped 5 resumes; the seventh cut of shard 2 leaves the s3 layer's
    # resumes behind, and read_shard opens the shard again, going on after what it yielded.
    monkeypatch.setattr(s3, "BODY_RESUMES", 1)
    fault_proxy.schedule(Fault("slowdown", times=3, method="GET", path="shard-000000"),
                         Fault("cut", times=1, method="GET", path="shard-000001", after_bytes=20_000),
                         Fault("cut", times=3, method="GET", path="shard-000002", after_bytes=shard_bytes // 4))
    counters = stream.Counters()
    assert samples_of(shards, counters) == clean  # nothing lost, nothing twice, same order
    assert fault_proxy.injected == {"slowdown": 3, "cut": 4}
    assert counters.bad_shards == 0
    assert counters.s3_retries == 3 + 1 + 3  # botocore's, the resumed bodies, the shard opened again


def test_a_shard_whose_reads_keep_failing_is_counted_bad_after_its_retries(fault_proxy, s3_bucket, monkeypatch):
    shards = manifest.read(write_shards(f"s3://{s3_bucket}/cutoff", [30, 30]))
    monkeypatch.setattr(s3, "BODY_RESUMES", 0)
    fault_proxy.schedule(Fault("cut", times=None, method="GET", path="shard-000001", after_bytes=100))
    counters = stream.Counters()
    samples = samples_of(shards, counters, retries=2)
    assert len(samples) == 30 and counters.bad_shards == 1  # shard 1: cut every time, skipped and counted
    assert fault_proxy.injected["cut"] == 3 and counters.s3_retries == 2


def test_shard_batches_report_the_s3_retries(fault_proxy, s3_bucket):
    shards = manifest.read(write_shards(f"s3://{s3_bucket}/batches", [20, 20]))
    fault_proxy.schedule(Fault("slowdown", times=2, method="GET", path="shard-"))
    batches = stream.ShardBatches(shards, 8, rank=0, world_size=1, seed=0, loader_workers=0, shuffle_buffer=1)
    assert all(next(batches).shape == (8, 3, 32, 32) for _ in range(6))
    assert batches.counts()["s3_retries"] == 2 and batches.counts()["bad_shards"] == 0


# ---------------------------------------------------------------- a shard replaced while it is read

MEMBER_BYTES = 256 * 1024  # the reader reads 1 MiB ahead: members this large are yielded before a cut at 3/4
INVERTED = bytes(255 - value for value in range(256))


def write_large_shard(url: str, members: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A shard of `members` samples of random bytes (read, not decoded, here): its bytes and (key, bytes) samples."""
    rng = random.Random(url)
    samples = [(f"{index:06d}", rng.randbytes(MEMBER_BYTES)) for index in range(members)]
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for key, data in samples:
            sink.write({"__key__": key, "jpg": data})
    s3.write_bytes(url, buffer.getvalue())
    return buffer.getvalue(), samples


def replaced(shard: bytes, samples: list[tuple[str, bytes]]) -> bytes:
    """The same tar headers at the same offsets, every sample's bytes inverted: old bytes up to
    any offset and new ones after it still parse, so a splice would be read, not rejected."""
    for _, data in samples:
        shard = shard.replace(data, data.translate(INVERTED))
    return shard


def put_object(endpoint: str, url: str, data: bytes):
    """Writes `data` to `url` straight to the endpoint, not through the proxy (run by the proxy mid-answer)."""
    bucket, key = s3.split(url)
    return lambda: boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)


def read_one_shard(url: str, counters: stream.Counters, expected: int) -> list[tuple[str, bytes]]:
    samples = stream.read_shards(iter([{"url": url}]), counters, {url: expected}, retries=3)
    return [(sample["__key__"], bytes(sample["jpg"])) for sample in samples]


def read_replaced_at_a_cut(fault_proxy, s3_endpoint, url: str, caplog):
    """A shard's body cut at 3/4, the object replaced right then: (old samples, new bytes,
    counters, samples delivered), after checking that only old samples came, in order."""
    shard, old = write_large_shard(url, 8)
    new = replaced(shard, old)
    fault_proxy.schedule(Fault("cut", method="GET", path="shard-000000", after_bytes=len(shard) * 3 // 4,
                               then=put_object(s3_endpoint, url, new)))
    counters = stream.Counters()
    with caplog.at_level(logging.WARNING, logger=stream.__name__):
        delivered = read_one_shard(url, counters, len(old))
    assert fault_proxy.injected == {"cut": 1} and s3.read_bytes(url) == new
    assert 0 < len(delivered) < len(old) and delivered == old[:len(delivered)]  # old samples only, in order: no splice
    return old, new, counters, delivered


def test_a_shard_replaced_between_a_cut_and_its_resumed_get_is_not_spliced(fault_proxy, s3_endpoint, s3_bucket, caplog):
    url = f"s3://{s3_bucket}/replaced/shard-000000.tar"
    # the object is replaced before the s3 layer asks for the rest
    old, new, counters, delivered = read_replaced_at_a_cut(fault_proxy, s3_endpoint, url, caplog)
    assert counters.bad_shards == 1  # and not opened again: a pinned GET would be refused again
    assert counters.s3_retries == 1 and fault_proxy.requests["GET"] == 1 + 1 + 1  # cut, refused resume, the check above
    assert f"skipping bad shard {url} (read {len(delivered)} of 8 samples: {url}: the object was replaced while it " \
           "was being read (its ETag changed))" in caplog.text


def test_a_shard_replaced_before_read_shard_opens_it_again_is_not_spliced(fault_proxy, s3_endpoint, s3_bucket, monkeypatch,
                                                                         caplog):
    url = f"s3://{s3_bucket}/reopened/shard-000000.tar"
    monkeypatch.setattr(s3, "BODY_RESUMES", 0)  # the cut fails the read at once: read_shard opens the shard again
    old, new, counters, delivered = read_replaced_at_a_cut(fault_proxy, s3_endpoint, url, caplog)
    assert counters.bad_shards == 1 and "the object was replaced while it was being read" in caplog.text
    assert counters.s3_retries == 1 and fault_proxy.requests["GET"] == 1 + 1 + 1  # cut, refused reopen, the check above

    # unchanged, the same cut: the shard opened again goes on after the samples read, every sample once
    fault_proxy.schedule(Fault("cut", method="GET", path="shard-000000", after_bytes=len(new) * 3 // 4))
    counters = stream.Counters()
    assert read_one_shard(url, counters, len(old)) == [(key, data.translate(INVERTED)) for key, data in old]
    assert fault_proxy.injected == {"cut": 2} and counters.bad_shards == 0 and counters.s3_retries == 1


# ---------------------------------------------------------------- checkpoints (pyarrow)


@pytest.mark.parametrize("received", [False, True], ids=["as-built", "pickled"])
def test_checkpoint_filesystem_rides_out_throttling_stalls_and_cuts(fault_proxy, s3_bucket, received):
    """The pyarrow S3FileSystem Ray Train writes checkpoints with, as the driver built it and as
    Ray's controller and workers receive it (pickled): three 503s in a row are more than
    pyarrow's default 3 attempts allow; a stall of 4 s is past its default 3 s request timeout."""
    options = storage(f"s3://{s3_bucket}/checkpoints")
    filesystem, root = options["storage_filesystem"], options["storage_path"]
    if received:
        filesystem = pickle.loads(pickle.dumps(filesystem))
    payload = bytes(range(256)) * 800  # 200 KiB
    fault_proxy.schedule(Fault("slowdown", times=3, method="PUT"), Fault("stall", times=1, method="POST", seconds=4),
                         Fault("cut", times=1, method="GET", after_bytes=50_000))
    with filesystem.open_output_stream(f"{root}/checkpoint_000000/state.pt") as sink:
        sink.write(payload)
    with filesystem.open_input_stream(f"{root}/checkpoint_000000/state.pt") as source:
        assert source.read() == payload
    assert fault_proxy.injected == {"slowdown": 3, "stall": 1, "cut": 1}
    # The upload's create and complete: the stalled one waited out, not given up at 3 s and sent again.
    assert fault_proxy.requests["POST"] == 2

    from pyarrow import fs

    defaults = fs.S3FileSystem(endpoint_override=fault_proxy.url, access_key="testing", secret_key="testing", region="us-east-1")
    fault_proxy.schedule(Fault("slowdown", times=3, method="PUT"))
    with pytest.raises(OSError, match="SLOW_DOWN"):  # what the settings are for
        with defaults.open_output_stream(f"{root}/checkpoint_000001/state.pt") as sink:
            sink.write(payload)


def write_objects(filesystem, folder: str, count: int) -> list[str]:
    """`count` small objects written through `filesystem` (one upload each); their paths."""
    paths = [f"{folder}/object-{index}" for index in range(count)]
    for path in paths:
        with filesystem.open_output_stream(path) as sink:
            sink.write(path.encode() * 100)
    return paths


# ---------------------------------------------------------------- checkpoint uploads through stalled part uploads

STALL_S = 2.0  # then the proxy drops the part upload unanswered; a stall past the request timeout ends the same way


def stalling_checkpoint_storage(monkeypatch, bucket: str) -> tuple:
    """(the checkpoint filesystem as train.py builds it and Ray's workers receive it: pickled, its
    run folder). Its SDK gives a part up after one attempt: the shipped 10 take minutes through stalls."""
    import dcgan_dist.train

    monkeypatch.setattr(dcgan_dist.train, "S3_MAX_ATTEMPTS", 1)
    options = storage(f"s3://{bucket}/checkpoints")
    return pickle.loads(pickle.dumps(options["storage_filesystem"])), f"{options['storage_path']}/test"


def stall_part_uploads(name: str, times: int | None) -> Fault:
    return Fault("stall_upload", times=times, method="PUT", path=rf"/{name}\?partNumber=", after_bytes=64 * 1024, seconds=STALL_S)


def test_a_stalled_part_upload_that_copy_files_swallows_is_caught_by_the_listing_and_sent_again(fault_proxy, s3_bucket, monkeypatch,
                                                                                             tmp_path, capfd, caplog):
    from pyarrow import fs

    from dcgan_dist.checkpoint_upload import check_complete, manifest_file, stored_sizes, upload_verified

    filesystem, run = stalling_checkpoint_storage(monkeypatch, s3_bucket)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "state.pt").write_bytes(random.randbytes(3_000_000))
    (staged / "rng-rank0.pt").write_bytes(random.randbytes(2_000))

    # pyarrow alone, as Ray Train copies a checkpoint: the part upload fails, copy_files returns
    fault_proxy.schedule(stall_part_uploads("state.pt", times=1))
    fs.copy_files(str(staged), f"{run}/copied", destination_filesystem=filesystem, use_threads=False)
    error = capfd.readouterr().err
    assert "Error ignored when destroying file" in error and "UploadPart" in error, error
    assert stored_sizes(filesystem, f"{run}/copied") == {"rng-rank0.pt": 2_000}  # no state.pt, and no word of it

    fault_proxy.schedule(stall_part_uploads("state.pt", times=1))
    with caplog.at_level(logging.WARNING):
        files = upload_verified(staged, filesystem, f"{run}/checkpoint_1", rank=0, world_size=1)
    assert fault_proxy.injected == {"stall_upload": 2}
    assert "attempt 1 of 3: state.pt is missing, manifest-rank0.json is missing" in caplog.text
    assert files == {"rng-rank0.pt": 2_000, "state.pt": 3_000_000}
    assert stored_sizes(filesystem, f"{run}/checkpoint_1").keys() == {*files, manifest_file(0)}
    assert check_complete(filesystem, f"{run}/checkpoint_1")


def test_a_checkpoint_whose_part_uploads_keep_stalling_is_neither_reported_nor_resumed_from(fault_proxy, s3_bucket, monkeypatch):
    import ray.train
    from ray.train import CheckpointUploadMode

    from dcgan_dist import checkpoint_upload
    from dcgan_dist.checkpoint_upload import CheckpointUploads, UploadError, stored_sizes
    from dcgan_dist.restore import newest_readable, older_checkpoints
    from tests.test_checkpoint_upload import RayReport, save_small

    filesystem, run = stalling_checkpoint_storage(monkeypatch, s3_bucket)
    report = RayReport()
    uploads = CheckpointUploads(0, 1, CheckpointUploadMode.ASYNC, filesystem, run, report_fn=report)
    uploads.report({"step": 10}, save_small(uploads.stage(10), 10))
    report.uploads[-1].result(timeout=60)  # uploaded whole
    fault_proxy.schedule(stall_part_uploads("state.pt", times=None))  # the endpoint stalls every part of it from now on
    uploads.report({"step": 20}, save_small(uploads.stage(20), 20))
    with pytest.raises(UploadError, match="incomplete after 3 attempts: state.pt is missing, manifest-rank0.json is missing"):
        report.uploads[-1].result(timeout=60)  # what Ray Train's upload thread raises: the worker fails
    assert fault_proxy.injected == {"stall_upload": checkpoint_upload.UPLOAD_ATTEMPTS}
    assert [metrics["step"] for metrics, _ in report.reported] == [10]  # not reported
    with pytest.raises(UploadError, match="the previous checkpoint's upload failed"):
        uploads.stage(30)  # nor trained on from here

    (_, first), unfinished = report.reported[0], f"{run}/{report.names[-1]}"
    assert set(stored_sizes(filesystem, unfinished)) == {"rng-rank0.pt"}
    candidates = [ray.train.Checkpoint(unfinished, filesystem=filesystem)]  # as if Ray Train's latest, or a sibling
    candidates += older_checkpoints(candidates[0])
    index, state = newest_readable(candidates)
    assert candidates[index].path == first.path and state["step"] == 10
    assert "state.pt is missing" in state["unreadable_checkpoints"][0]


# ---------------------------------------------------------------- a training run through the faults


@pytest.fixture
def restarted_ray(ray_local):
    """The session's Ray instance started again, before the test's other fixtures change the
    environment and the working directory (every later Ray worker inherits those). In two
    whole-suite runs the controller of the training run below, on the session's instance, never
    reached its worker group; on a fresh instance it passed every time (alone, with its module,
    after test_autoscale)."""
    ray_local.shutdown()
    start_local_ray()
    return ray_local


@pytest.mark.slow
def test_training_with_data_and_checkpoints_on_a_faulty_s3_completes(restarted_ray, fault_proxy, s3_bucket, mlflow_sqlite, tmp_path):
    url = write_shards(f"s3://{s3_bucket}/train", [40, 40, 40])
    fault_proxy.schedule(
        Fault("slowdown", times=2, method="GET", path="shard-"),
        Fault("cut", times=2, method="GET", path="shard-", after_bytes=30_000),
        # Ray Train's controller writes the snapshot with the filesystem it received pickled: three
        # 503s in a row are past pyarrow's default 3 attempts, then a stall past its default 3 s.
        Fault("slowdown", times=3, method="PUT", path="checkpoint_manager_snapshot"),
        Fault("stall", times=1, method="PUT", path="checkpoint_manager_snapshot", seconds=4),
        Fault("slowdown", times=2, method="PUT", path="/checkpoints/test/checkpoint_(?!manager)"),
    )
    args = train_args(tmp_path, mlflow_sqlite, data=url, max_steps=6, log_every=3, sample_every=6, checkpoint_every=3,
                      batch_size=16, loader_workers=0, shuffle_buffer=20, storage_path=f"s3://{s3_bucket}/checkpoints",
                      eval_every=0)
    assert main(args) == 0
    assert fault_proxy.injected == {"slowdown": 2 + 3 + 2, "cut": 2, "stall": 1}
    # both checkpoints uploaded in the background (auto: async to S3), each with its manifest, none left on the node's disk
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/test/checkpoint_2")["Contents"]
    assert sum(item["Key"].endswith("/manifest-rank0.json") for item in listing) == 2, [item["Key"] for item in listing]
    assert not any(staging_root(f"{s3_bucket}/checkpoints/test", 0).iterdir())

    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_d")) == list(range(1, 7))
    retries = client.get_metric_history(run.info.run_id, "data/s3_retries")
    assert max(m.value for m in retries) >= 2 + 2  # every shard fault, retried and counted
    assert client.get_metric_history(run.info.run_id, "data/bad_shards") == []  # none: a zero counter is not logged
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "checkpoint/stall_s")) == [3, 6]
    assert run.data.params["loop.checkpoint_upload"] == "auto"


# Kept after the training run: once, in a whole-suite run, the next Ray Train controller started
# after this test never reached its worker group (not reproduced with the two tests alone).
@pytest.mark.slow
def test_the_controller_and_a_worker_write_through_throttled_uploads(ray_local, fault_proxy, s3_bucket):
    """What Ray Train's controller gets (the RunConfig, pickled, and the StorageContext it builds
    from it) and hands its workers (that StorageContext, pickled again) still retries as the
    driver's filesystem does: every upload answered 503 three times in a row is written."""
    import ray
    from ray.train import RunConfig

    @ray.remote(num_cpus=0)
    def as_a_worker(storage_context, count):
        return write_objects(storage_context.storage_filesystem, f"{storage_context.experiment_fs_path}/worker", count)

    @ray.remote(num_cpus=0)
    def as_the_controller(run_config, count):
        storage_context = run_config.storage_context  # writes Ray Train's marker object, unthrottled
        written = write_objects(storage_context.storage_filesystem, f"{storage_context.experiment_fs_path}/controller", count)
        return written + ray.get(as_a_worker.remote(storage_context, count))

    count = 3
    fault_proxy.schedule(*(Fault("slowdown", times=3, method="PUT", path=rf"/{role}/object-{index}\?partNumber=")
                           for role in ("controller", "worker") for index in range(count)))
    run_config = RunConfig(name="retries", **storage(f"s3://{s3_bucket}/checkpoints"))
    written = ray.get(as_the_controller.remote(run_config, count), timeout=300)
    assert len(written) == 2 * count
    assert fault_proxy.injected == {"slowdown": 3 * 2 * count}  # three in a row per upload, each retried past
    for path in written:
        assert s3.read_bytes(f"s3://{path}") == path.encode() * 100
