"""Checkpoint uploads (dcgan_dist/checkpoint_upload.py): a checkpoint counts only when storage holds
every file its manifests list, so a resume refuses one with a file missing or short, or without
its manifests, and falls back to the one before; the next checkpoint waits for an upload only
while it still runs, counted, and a rank keeps one checkpoint on its disk. Uploads through an
endpoint that stalls part uploads: tests/test_s3_faults.py."""

from __future__ import annotations

import os
import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import ray.train
import torch
from pyarrow import fs
from ray.train import CheckpointUploadMode

from dcgan_dist import checkpoint
from dcgan_dist.checkpoint_upload import CheckpointUploads, check_complete, manifest_file, stored_sizes
from dcgan_dist.restore import RestoreError, newest_readable, older_checkpoints
from dcgan_dist.train import storage
from tests.fault_proxy import FaultProxy
from tests.test_checkpoint import write_checkpoint


class RayReport:
    """ray.train.report's handling of a checkpoint, without Ray (ray/train/v2/_internal/execution/
    context.py): SYNC calls checkpoint_upload_fn in the caller, ASYNC in the one thread of its own
    (Ray's checkpoint_upload_threadpool has one); a report is recorded once its upload returned."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.reported: list[tuple[dict, ray.train.Checkpoint | None]] = []
        self.uploads: list[Future] = []
        self.names: list[str] = []  # each checkpoint's folder name, as Ray Train's timestamps

    def __call__(self, metrics, checkpoint=None, checkpoint_upload_mode=CheckpointUploadMode.SYNC, checkpoint_upload_fn=None,
                 **_):
        name = f"checkpoint_2026-12-07_06-00-{len(self.names):02d}.000001"
        self.names.append(name)

        def upload_and_report():
            persisted = checkpoint_upload_fn(checkpoint, name) if checkpoint is not None else None
            self.reported.append((metrics, persisted))

        if checkpoint_upload_mode == CheckpointUploadMode.ASYNC:
            self.uploads.append(self.pool.submit(upload_and_report))
        else:
            upload_and_report()


def save_small(directory, step: int):
    """Rank 0's part of a one-rank run's checkpoint (21 MB: the 32 px pytorch-examples G, D, Adam) in `directory`."""
    from dcgan_dist.models import Architecture, build_models

    generator, discriminator = build_models("pytorch-examples", 32, "paper")
    opt_g, opt_d = torch.optim.Adam(generator.parameters()), torch.optim.Adam(discriminator.parameters())
    checkpoint.save(directory, rank=0, device=torch.device("cpu"), step=step, generator=generator, discriminator=discriminator,
                    opt_g=opt_g, opt_d=opt_d, mlflow_run_id="r", config={"cluster.num_workers": 1},
                    architecture=Architecture.of("pytorch-examples", 32, "paper"))
    return directory


def cut(path, size: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:size])


DAMAGES = {  # what goes wrong with the latest checkpoint -> what the warning says
    "a file short": (lambda folder: cut(folder / "rng-rank1.pt"), "rng-rank1.pt has 100 of "),
    "a file missing": (lambda folder: (folder / checkpoint.STATE_FILE).unlink(), "state.pt is missing (by manifest-rank0.json)"),
    "a rank's manifest missing": (lambda folder: (folder / manifest_file(1)).unlink(), "manifest-rank1.json is missing: rank 1's upload"),
    "every manifest missing": (lambda folder: [(folder / manifest_file(rank)).unlink() for rank in (0, 1)],
                               "manifest-rank0.json is missing: its upload did not finish"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_resume_refuses_a_checkpoint_whose_files_disagree_with_its_manifests(tmp_path, damage):
    run = tmp_path / "run"
    older = write_checkpoint(run / "checkpoint_2026-12-07_06-00-00.000001", 10)
    latest = write_checkpoint(run / "checkpoint_2026-12-07_06-00-05.000001", 20)
    assert check_complete(fs.LocalFileSystem(), str(latest)) and check_complete(fs.LocalFileSystem(), str(older))
    spoil, problem = DAMAGES[damage]
    spoil(latest)

    candidates = [ray.train.Checkpoint(str(latest))]
    candidates += older_checkpoints(candidates[0])
    index, state = newest_readable(candidates)
    assert index == 1 and state["step"] == 10
    (unreadable,) = state["unreadable_checkpoints"]
    assert unreadable.startswith(str(latest)) and problem in unreadable, unreadable


def test_a_checkpoint_written_before_manifests_is_read_as_before(tmp_path):
    latest = write_checkpoint(tmp_path / "run" / "checkpoint_2026-12-07_06-00-05.000001", 20)
    for rank in (0, 1):
        (latest / manifest_file(rank)).unlink()
    state = torch.load(latest / checkpoint.STATE_FILE, weights_only=True)
    del state[checkpoint.MANIFESTS]
    torch.save(state, latest / checkpoint.STATE_FILE)

    index, state = newest_readable([ray.train.Checkpoint(str(latest))])
    assert index == 0 and state["step"] == 20 and "unreadable_checkpoints" not in state
    (latest / "rng-rank1.pt").unlink()  # its files are still checked: each one loads
    with pytest.raises(RestoreError, match="rng-rank1.pt is missing"):
        newest_readable([ray.train.Checkpoint(str(latest))])


@pytest.fixture
def slow_s3(s3_endpoint, s3_bucket, monkeypatch):
    """The checkpoint filesystem as train.py builds it and Ray's workers receive it (pickled),
    reaching the loopback S3 endpoint through an uplink of 2 MB/s; (filesystem, run folder)."""
    proxy = FaultProxy(s3_endpoint, upload_bytes_per_s=2e6).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    options = storage(f"s3://{s3_bucket}/runs")
    yield pickle.loads(pickle.dumps(options["storage_filesystem"])), f"{options['storage_path']}/test"
    proxy.stop()


def test_the_next_checkpoint_waits_for_an_upload_only_while_it_runs_and_counts_it(slow_s3):
    filesystem, run = slow_s3
    report = RayReport()
    uploads = CheckpointUploads(0, 1, CheckpointUploadMode.ASYNC, filesystem, run, report_fn=report)
    staged = []
    for step in (1, 2, 3):
        staged.append(uploads.stage(step))
        assert list(uploads.root.iterdir()) == [staged[-1]]  # the one being written, alone on this disk
        (staged[-1] / "state.pt").write_bytes(os.urandom(1_500_000))  # 0.75 s up at 2 MB/s
        started = time.perf_counter()
        uploads.report({"step": step}, staged[-1], wait=step == 3)
        if step == 1:
            assert time.perf_counter() - started < 0.5  # the step goes on while it uploads
        if step == 2:  # this one ends before the next checkpoint: no wait
            assert report.uploads[-1].result(timeout=30) is None

    assert uploads.waits == 1 and 0.3 < uploads.wait_s < 5  # at step 2, for step 1's upload
    assert uploads.metrics()["checkpoint/upload_waits"] == 1 and uploads.metrics()["checkpoint/upload_s"] > 0.5
    assert [metrics["step"] for metrics, _ in report.reported] == [1, 2, 3]  # the last one waited for
    assert not list(uploads.root.iterdir())
    for (_, persisted), directory in zip(report.reported, staged):
        assert check_complete(filesystem, persisted.path)
        assert stored_sizes(filesystem, persisted.path)["state.pt"] == 1_500_000 and not directory.exists()
