"""Which checkpoint a worker resumes from: Ray Train's latest, or, when that one is unreadable (a
file cut short or missing: a node lost while it was written, a disk that filled), the newest
readable one before it.

A checkpoint counts only when each rank's manifest is there and storage lists every file they
name at its size (checkpoint_upload.check_complete: an upload can fail without a word); one
written before manifests (its state.pt lacks checkpoint.MANIFESTS) is read as before, every file
loaded.

Ray Train hands every worker its latest registered checkpoint only; the older ones it keeps
(--keep-checkpoints, at least 2) are its siblings on the same filesystem. Rank 0 checks them
newest first and every rank resumes from the one it picked, so all ranks agree even when a read
fails on one of them.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from dcgan_dist import checkpoint
from dcgan_dist.checkpoint_upload import IncompleteCheckpoint, check_complete, manifest_file
from dcgan_dist.util import first_line

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's folder names: checkpoint_<timestamp>, in time order


class RestoreError(RuntimeError):
    """No checkpoint of the run can be read."""


def restore_checkpoint(rank: int, world_size: int, device: torch.device) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(the training state, this rank's RNG state or None) from the newest readable checkpoint,
    or None when the run has no checkpoint. Every rank takes part."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    candidates = [latest, *older_checkpoints(latest)]
    choice, state = [None], None
    if rank == 0:
        try:
            index, state = newest_readable(candidates)
            choice = [index]
        except RestoreError as e:
            choice = [e]
    if world_size > 1:
        dist.broadcast_object_list(choice, src=0, device=device)
    if isinstance(choice[0], RestoreError):
        raise choice[0]
    chosen = candidates[choice[0]]
    with chosen.as_directory() as directory:
        if state is None:
            state = checkpoint.load_state(directory)
        rng = checkpoint.load_rng(directory, rank)
    return state, rng


def newest_readable(candidates: list[ray.train.Checkpoint]) -> tuple[int, dict[str, Any]]:
    """The index and state of the first readable checkpoint of `candidates` (newest first); each
    unreadable one before it is a warning naming it. RestoreError when none can be read."""
    problems = []
    for index, candidate in enumerate(candidates):
        try:
            state = read_checked(candidate)
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            problems.append(f"{candidate.path} ({first_line(e)})")
            continue
        for problem in problems:
            log.warning("checkpoint %s is unreadable: resuming from the one before it, %s", problem, candidate.path)
        if problems:
            state["unreadable_checkpoints"] = problems  # rank 0 tags the run with them
        return index, state
    raise RestoreError(f"no readable checkpoint: {'; '.join(problems)}. Remove the broken checkpoint folders, or train "
                       "from scratch under a new --run-name")


def read_checked(candidate: ray.train.Checkpoint) -> dict[str, Any]:
    """The checkpoint's state, after checking that storage holds every file its manifests list
    (before anything is downloaded) and that every file the run wrote into it loads."""
    complete = check_complete(candidate.filesystem, candidate.path)
    with candidate.as_directory() as directory:
        state = checkpoint.load_state(directory)
        if not complete and state.get(checkpoint.MANIFESTS):
            raise IncompleteCheckpoint(f"{manifest_file(0)} is missing: its upload did not finish")
        if not complete:
            log.info("checkpoint %s predates upload manifests: checked by loading its files", candidate.path)
        missing = [key for key in ("step", "generator", "discriminator", "opt_g", "opt_d") if key not in state]
        if missing:
            raise ValueError(f"{checkpoint.STATE_FILE} lacks {', '.join(missing)}")
        # the world size that wrote it (an elastic run's changes; its data position records it)
        world_size = (state.get("data_position") or {}).get("world_size") or int(state.get("config", {}).get("cluster.num_workers", 1))
        for rank in range(world_size):
            if checkpoint.load_rng(directory, rank) is None:
                raise FileNotFoundError(f"{checkpoint.rng_file(rank)} is missing")
    return state


def older_checkpoints(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints older than `latest`, newest first (Ray Train names them by time)."""
    from pyarrow import fs

    parent, name = posixpath.split(latest.path.rstrip("/"))
    try:
        entries = latest.filesystem.get_file_info(fs.FileSelector(parent))
    except OSError as e:
        log.warning("cannot list the checkpoints in %s (%s): no older checkpoint to fall back to", parent, first_line(e))
        return []
    older = sorted((entry.base_name for entry in entries if entry.type == fs.FileType.Directory
                    and entry.base_name.startswith(CHECKPOINT_PREFIX) and entry.base_name < name), reverse=True)
    return [ray.train.Checkpoint(posixpath.join(parent, base), filesystem=latest.filesystem) for base in older]
