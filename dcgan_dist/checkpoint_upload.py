"""How every rank hands a checkpoint to Ray Train: off the training step's critical path, and
counted only once all its files are in storage.

Each rank writes its files into a staging directory of its own and reports it with
`checkpoint_upload_fn=CheckpointUploads.upload`, asynchronously (`CheckpointUploadMode.ASYNC`:
Ray Train uploads in a thread of the worker while the steps go on) or synchronously (--checkpoint-
upload; auto: async to remote storage, sync to a local or NFS path, where the copy costs about what
writing the files did). The upload copies the files as Ray Train's own does (`pyarrow.fs.copy_files`),
then lists what storage holds (names and sizes) and only then writes the rank's manifest, last:

    manifest-rank{N}.json   {"rank": N, "files": {"state.pt": 44181734, "rng-rank0.pt": 1637}}
                            rank 0's also has "world_size": the ranks whose manifests must be there

A copy through a stalled endpoint can fail without a word: pyarrow's S3 output stream uploads
parts in the background, and when an UploadPart fails (e.g. "AWS Error NETWORK_CONNECTION during
UploadPart operation: curlCode: 28, Timeout was reached") the error is only printed ("Error
ignored when destroying file") and copy_files returns as if the file were written. So a listing
that disagrees is copied again (UPLOAD_ATTEMPTS in all), then the report fails loudly: the worker
fails, and Ray Train never registers the checkpoint. A reader (restore.py) trusts a checkpoint only
when every manifest is there and storage agrees with it (`check_complete`).

Local disk stays bounded: a staging directory is deleted once its upload is verified, and the next
checkpoint is written only after the previous upload ends, so a rank holds at most the checkpoint
uploading and the one being written. The step waits for an upload only when the previous one is
still running at the next checkpoint; those waits are counted (`metrics()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
from pyarrow import fs
from ray.train import CheckpointUploadMode

from dcgan_dist.util import first_line

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3  # copies of a checkpoint's files before its report fails (each with the filesystem's own retries)
WAIT_LIMIT_S = 3600.0  # the longest the next checkpoint waits for the previous upload before the run fails
COPY_CHUNK_BYTES = 64 * 1024 * 1024  # as Ray Train's own copy
MODES = {"sync": CheckpointUploadMode.SYNC, "async": CheckpointUploadMode.ASYNC}  # choices.CHECKPOINT_UPLOADS, less auto


class UploadError(RuntimeError):
    """A checkpoint's files did not all reach storage."""


class IncompleteCheckpoint(ValueError):
    """A checkpoint in storage lacks a manifest, or a file its manifest lists."""


def manifest_file(rank: int) -> str:
    return f"manifest-rank{rank}.json"


def upload_mode(setting: str, filesystem: fs.FileSystem) -> CheckpointUploadMode:
    """--checkpoint-upload as Ray Train's mode; auto: async unless storage is a local (or NFS) path."""
    if setting == "auto":
        return CheckpointUploadMode.SYNC if isinstance(filesystem, fs.LocalFileSystem) else CheckpointUploadMode.ASYNC
    return MODES[setting]


def stored_sizes(filesystem: fs.FileSystem, directory: str) -> dict[str, int]:
    """The files directly in `directory` on `filesystem` and their sizes ({} when it is absent)."""
    infos = filesystem.get_file_info(fs.FileSelector(directory, allow_not_found=True))
    return {info.base_name: info.size for info in infos if info.type == fs.FileType.File}


def differences(expected: dict[str, int], stored: dict[str, int]) -> list[str]:
    """What storage lacks of `expected` (name -> size), one phrase per file."""
    return [f"{name} is missing" if name not in stored else f"{name} has {stored[name]} of {size} bytes"
            for name, size in expected.items() if stored.get(name) != size]


def upload_verified(local_dir: str | Path, filesystem: fs.FileSystem, destination: str, rank: int, world_size: int,
                    attempts: int = UPLOAD_ATTEMPTS) -> dict[str, int]:
    """Copy the files of `local_dir` to `destination`, check that storage lists each at its size
    (copying what is not again, `attempts` copies in all), then write this rank's manifest and
    check it too. Returns the files (name -> size); UploadError when they never all arrive."""
    files = {path.name: path.stat().st_size for path in sorted(Path(local_dir).iterdir()) if path.is_file()}
    manifest = {"rank": rank, "files": files} | ({"world_size": world_size} if rank == 0 else {})
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    filesystem.create_dir(destination)
    pending, problems = files, []
    for attempt in range(1, attempts + 1):
        copy_error = ""
        try:
            copy(local_dir, pending, filesystem, destination)
            stored = stored_sizes(filesystem, destination)
            pending = {name: size for name, size in files.items() if stored.get(name) != size}
            if not pending:  # every data file is there: the manifest, last
                with filesystem.open_output_stream(posixpath.join(destination, manifest_file(rank))) as sink:
                    sink.write(manifest_bytes)
        except OSError as e:
            copy_error = f" ({type(e).__name__}: {first_line(e)})"
        stored = stored_sizes(filesystem, destination)
        problems = differences(files | {manifest_file(rank): len(manifest_bytes)}, stored)
        if not problems:
            return files
        log.warning("checkpoint upload to %s, attempt %d of %d: %s%s", destination, attempt, attempts, ", ".join(problems), copy_error)
    raise UploadError(f"checkpoint upload to {destination} incomplete after {attempts} attempts: {', '.join(problems)}; "
                      "the checkpoint is not reported (the last complete one stays the latest)")


def copy(local_dir: str | Path, names: dict[str, int], filesystem: fs.FileSystem, destination: str) -> None:
    """The files `names` of `local_dir` to `destination`, as Ray Train copies a checkpoint (one
    file at a time: a failed file is copied again without the others)."""
    for name in names:
        fs.copy_files(str(Path(local_dir) / name), posixpath.join(destination, name), destination_filesystem=filesystem,
                      use_threads=False, chunk_size=COPY_CHUNK_BYTES)  # use_threads: Ray Train's workaround for S3 uploads


def read_manifest(filesystem: fs.FileSystem, directory: str, rank: int) -> dict[str, Any]:
    with filesystem.open_input_stream(posixpath.join(directory, manifest_file(rank))) as source:
        return json.loads(source.read())


def check_complete(filesystem: fs.FileSystem, directory: str) -> bool:
    """True when every rank's manifest is in the checkpoint `directory` and storage lists each
    file they name at its size; False when it has no manifest at all (written before manifests,
    or an upload that never got that far: restore.py tells them apart by state.pt);
    IncompleteCheckpoint naming what is wrong otherwise. Reads the listing and the manifests only."""
    stored = stored_sizes(filesystem, directory)
    if manifest_file(0) not in stored:
        return False
    world_size = int(read_manifest(filesystem, directory, 0)["world_size"])
    for rank in range(world_size):
        if manifest_file(rank) not in stored:
            raise IncompleteCheckpoint(f"{manifest_file(rank)} is missing: rank {rank}'s upload did not finish")
        problems = differences(read_manifest(filesystem, directory, rank)["files"], stored)
        if problems:
            raise IncompleteCheckpoint(f"{', '.join(problems)} (by {manifest_file(rank)})")
    return True


def staging_root(experiment_path: str, rank: int) -> Path:
    """This run's and rank's staging directory on the node: the same after a restart, so a
    restarted worker clears what a failed one left."""
    run = hashlib.sha256(experiment_path.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "dcgan-dist-checkpoints" / f"{run}-rank{rank}"


class CheckpointUploads:
    """One rank's checkpoint uploads over a run: stage, write, report; the waits they cost."""

    def __init__(self, rank: int, world_size: int, mode: CheckpointUploadMode, filesystem: fs.FileSystem,
                 experiment_path: str, report_fn: Callable[..., None] = ray.train.report, clock: Callable[[], float] = time.perf_counter):
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.filesystem, self.experiment_path = filesystem, experiment_path
        self.report_fn, self.clock = report_fn, clock  # report_fn: Ray Train's (tests hand in a stand-in for Ray's thread)
        self.root = staging_root(experiment_path, rank)
        shutil.rmtree(self.root, ignore_errors=True)  # a failed attempt's leftovers (its worker is gone)
        self.root.mkdir(parents=True)
        self.done = threading.Event()
        self.done.set()  # no upload running
        self.error: BaseException | None = None
        self.waits, self.wait_s, self.stall_s, self.upload_s = 0, 0.0, 0.0, 0.0
        self.stage_started = 0.0

    @classmethod
    def for_worker(cls, setting: str, rank: int, world_size: int) -> CheckpointUploads:
        """For this Ray Train worker: its run's storage, --checkpoint-upload `setting`."""
        storage = ray.train.get_context().get_storage()
        return cls(rank, world_size, upload_mode(setting, storage.storage_filesystem), storage.storage_filesystem,
                   storage.experiment_fs_path)

    def stage(self, step: int) -> Path:
        """An empty directory for the next checkpoint's files, once the previous upload has ended
        (waiting, counted, only if it still runs). Raises the previous upload's error."""
        self.stage_started = self.clock()
        if not self.done.is_set():
            self.waits += 1
            self.wait()
            self.wait_s += self.clock() - self.stage_started
        self.raise_failure()
        return Path(tempfile.mkdtemp(prefix=f"step{step}-", dir=self.root))

    def report(self, metrics: dict[str, Any], directory: Path, wait: bool = False) -> None:
        """Report the staged checkpoint; Ray Train uploads it with `upload`, in its thread when
        async. `wait`: complete before this returns (the run's last checkpoint: before the worker
        returns; one taken for a preemption notice: before the node goes)."""
        self.done.clear()
        self.report_fn(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)), checkpoint_upload_mode=self.mode,
                       delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=self.upload)
        self.stall_s = self.clock() - self.stage_started
        if wait:
            self.wait()
            self.raise_failure()

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        """A report without a checkpoint, in the same mode: Ray Train delivers reports in order, so
        a synchronous one behind an async checkpoint would wait for its upload."""
        self.report_fn(metrics, checkpoint_upload_mode=self.mode)

    def upload(self, checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str) -> ray.train.Checkpoint:
        """Ray Train's checkpoint_upload_fn: the staged files to storage, verified, then the
        staging directory deleted. Raises UploadError (the report fails) when they never arrive."""
        started = self.clock()
        destination = posixpath.join(self.experiment_path, checkpoint_dir_name)
        try:
            upload_verified(checkpoint.path, self.filesystem, destination, self.rank, self.world_size)
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            return ray.train.Checkpoint(destination, filesystem=self.filesystem)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.upload_s = self.clock() - started
            self.done.set()

    def wait(self) -> None:
        """Until the running upload (if any) ends; UploadError past WAIT_LIMIT_S."""
        if not self.done.wait(WAIT_LIMIT_S):
            raise UploadError(f"a checkpoint upload has run for over {WAIT_LIMIT_S:.0f} s")

    def raise_failure(self) -> None:
        if self.error is not None:
            raise UploadError(f"the previous checkpoint's upload failed: {first_line(self.error)}") from self.error

    def metrics(self) -> dict[str, float]:
        """What rank 0 logs at each checkpoint: the waits for a previous upload so far (count and
        seconds), this checkpoint's stall of the step (staging, writing, reporting, any wait) and
        the last finished upload's seconds."""
        return {"checkpoint/upload_waits": self.waits, "checkpoint/upload_wait_s": self.wait_s,
                "checkpoint/stall_s": self.stall_s, "checkpoint/upload_s": self.upload_s}
