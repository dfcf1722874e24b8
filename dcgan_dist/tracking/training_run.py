"""A training run's MLflow run: the driver creates it (or finds it again) before any worker
starts and hands it to the workers by id; rank 0 opens it (`open_run`) on every start.

A worker that fails before the first checkpoint has nothing to resume from, so if rank 0
created the run, its restart would create another and leave the first behind, RUNNING or
FAILED. The driver creates the run once instead, tagged with the run's resume key (the Ray
Train storage path and --run-name), so every restart and every re-submitted command writes
into the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import warnings
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking.context.registry import resolve_tags

from dcgan_dist import config
from dcgan_dist.config import Config
from dcgan_dist.tracking.run_logger import RunLogger
from dcgan_dist.tracking.spill import Spill
from dcgan_dist.tracking.store import log_params
from dcgan_dist.util import redact

log = logging.getLogger(__name__)

RESUME_KEY_TAG = "dcgan.resume_key"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def resume_key(storage_path: str, run_name: str) -> str:
    """What identifies a training run across restarts: Ray Train resumes by storage path + name."""
    return hashlib.sha256(f"{storage_path.rstrip('/')}/{run_name}".encode()).hexdigest()[:32]


def has_checkpoints(storage_path: str, run_name: str) -> bool:
    """Whether Ray Train has registered a checkpoint of this run (it then resumes from it)."""
    from dcgan_dist.data import s3

    snapshot = f"{storage_path.rstrip('/')}/{run_name}/{SNAPSHOT_FILE}"
    if s3.is_s3(storage_path):
        return s3.exists(snapshot, fast=True)
    return "://" not in storage_path and Path(snapshot).is_file()


def open_training_run(cfg: Config, launch: dict[str, Any]) -> tuple[str, bool]:
    """The MLflow run this launch writes into, and whether it continues an earlier one.

    Found again: the newest run with this resume key, unless it FINISHED and Ray Train has no
    checkpoint of it (its storage was removed: a new training under an old name gets a new
    run). New: named for what it trains, with the launch's source tags, the params and the
    dataset."""
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    key = resume_key(cfg.tracking.storage_path, cfg.tracking.run_name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RESUME_KEY_TAG}` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and (found[0].info.status != "FINISHED" or has_checkpoints(cfg.tracking.storage_path, cfg.tracking.run_name)):
        return found[0].info.run_id, True

    dataset = launch["dataset"]
    # --run-name is Ray Train's resume key; the MLflow name tells runs apart in the UI.
    name = f"{cfg.model.preset}-{cfg.model.image_size}px-{dataset['name']}-{secrets.token_hex(3)}"
    tags = launch.get("source_tags", {}) | {RESUME_KEY_TAG: key, "ray.storage_path": redact(cfg.tracking.storage_path)}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    # What mlflow.start_run would add (the user, from MLFLOW_TRACKING_USERNAME on a server with
    # authentication; the host), under the launch's own source tags.
    run = client.create_run(experiment_id, run_name=name, tags=resolve_tags(tags))
    run_id = run.info.run_id
    log_params(client, run_id, config.flatten(cfg) | {
        "derived.per_worker_batch": per_worker_batches(cfg), "derived.world_size": cfg.cluster.num_workers,
        "derived.stop_rule": "max_epochs" if cfg.loop.max_epochs else "max_steps"})
    if dataset.get("sha256"):
        log_dataset(client, run_id, dataset["name"], dataset["source"], dataset["sha256"])
    return run_id, False


def per_worker_batches(cfg: config.Config) -> str:
    """Each worker's share of the global batch: "64" at a fixed world size that divides it, else
    the smallest and largest share ("42-43"; an elastic run: over its world sizes)."""
    low, high = cfg.worker_range
    batch = cfg.loop.batch_size
    smallest, largest = batch // high, -(-batch // low)
    return str(smallest) if smallest == largest else f"{smallest}-{largest}"


def log_dataset(client: MlflowClient, run_id: str, name: str, source: str, digest: str) -> None:
    """The training data in the run's Datasets panel: `source` a manifest URL or a bundled set's name."""
    if "://" in source or source.endswith(".json"):
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways", all of them local files
            warnings.simplefilter("ignore", UserWarning)
            dataset_source = resolve_dataset_source(redact(source))
    else:
        dataset_source = CodeDatasetSource({"dataset": source})  # bundled with the code (sklearn's digits)
    # MLflow's digest column holds 36 characters: the sha256's first 36 hex digits (the full one is the tag data.sha256)
    dataset = MetaDataset(dataset_source, name=name, digest=digest[:36])
    # What mlflow.log_input sends, without an active run in this process (the workers log the rest).
    entity = dataset._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])


def end_failed(uri: str, run_id: str) -> None:
    """The driver's last word when fit() raised: the run ends FAILED unless a worker ended it.
    Best effort: the tracking server may be what failed."""
    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the server is away: the run stays as the workers left it
        pass


def delete_run(uri: str, run_id: str) -> None:
    MlflowClient(uri).delete_run(run_id)


def deliver_spilled(spill: Spill, client: MlflowClient, run_id: str) -> dict[str, int]:
    """Send what an earlier attempt (or run) spilled into storage, saying how much, in one line."""
    counts = spill.deliver(client, run_id)
    if any(counts.values()):
        log.info("MLflow run %s: delivered %d metrics, %d tags and %d images that the tracking server missed "
                    "(from %s)", run_id, counts["metrics"], counts["tags"], counts["images"], redact(spill.where(run_id)))
    return counts


def open_run(cfg: Config, launch: dict[str, Any], checkpoint_run_id: str | None, start_step: int,
             node_of_rank: list[str]) -> RunLogger:
    """Rank 0's MLflow run: the one the driver created (or found again) for this launch, or the
    one a checkpoint continues. Steps it already holds (from an attempt that failed before this
    one) are not logged twice."""
    run_id, finished = launch.get("mlflow_run_id"), start_step >= cfg.loop.max_steps
    if checkpoint_run_id and checkpoint_run_id != run_id:
        # A checkpoint from before the driver created runs (or from another tracking setup): its
        # run continues, and the one the driver made for this launch, still empty, goes.
        if run_id:
            log.warning("the checkpoint continues MLflow run %s; deleting the empty run %s made for this launch",
                        checkpoint_run_id, run_id)
            delete_run(cfg.tracking.tracking_uri, run_id)
        run_id = checkpoint_run_id
    spill = Spill.for_worker()  # what the sender cannot deliver goes next to the checkpoints
    logger = RunLogger(cfg.tracking.tracking_uri, cfg.tracking.experiment, "", run_id, system_metrics=not finished, spill=spill)
    deliver_spilled(spill, logger.client, logger.run_id)  # before skip_logged: the steps it delivers count as logged
    if finished:  # re-opened only to check that it holds its final models: a re-run that trains nothing records nothing
        return logger
    logger.skip_logged()  # every metric and picture the run already holds
    num_nodes = len(set(node_of_rank))
    if start_step:
        log.info("Resuming MLflow run %s from step %d", logger.run_id, start_step)
        logger.set_tags({"train.resumed_from_step": start_step})
    if "derived.num_nodes" not in logger.params():  # where the first attempt's ranks ran (tags follow restarts)
        logger.log_params({"derived.num_nodes": num_nodes})
    # Tags, not params: after a restart the ranks may land on other nodes.
    logger.set_tags(launch.get("tags", {}) | {"ray.world_size": len(node_of_rank), "ray.run_name": cfg.tracking.run_name,
                                              "ray.num_nodes": num_nodes, "ray.node_of_rank": json.dumps(node_of_rank)})
    return logger
