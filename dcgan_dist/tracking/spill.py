"""What the sender could not deliver, kept in the run's storage and delivered when the server is back.

When the tracking server is away as a run ends (or so long that the sender's buffer overflows),
the metrics, tags and images it still holds are written next to the run's checkpoints, through
the pyarrow filesystem Ray Train already uses for them (a local or NFS folder, or S3):

    <storage path>/<run name>/mlflow_spill/<MLflow run id>/<spill id>.jsonl
        one JSON object a line:
        {"metric": KEY, "value": V, "timestamp": MS, "step": S}  (+ "model_id", "dataset_name",
                                                                   "dataset_digest" when linked)
        {"tag": KEY, "value": "TEXT"}
    <storage path>/<run name>/mlflow_spill/<MLflow run id>/<spill id>-image-<n>.json
        {"image": KEY, "step": S, "timestamp": MS, "npy": base64 of the array as numpy.save writes it}

`deliver` sends them to the run with their original steps and timestamps and deletes each file
once the server has confirmed it (`python -m dcgan_dist.register` and a re-run of the training
command call it). Sending a file twice (a delivery cut between the send and the delete) adds
nothing: the tracking store keeps one copy of a metric with the same key, step, timestamp and
value (MLflow's SQL stores), a tag is set, and an image the run holds already is not sent again.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from pyarrow import fs

log = logging.getLogger(__name__)

SPILL_FOLDER = "mlflow_spill"
BATCH_METRICS, BATCH_TAGS = 1000, 100  # log_batch's limits


@dataclass
class Spill:
    """The run's folder in storage (Ray Train's experiment path on `filesystem`)."""

    filesystem: fs.FileSystem
    run_directory: str

    @classmethod
    def for_worker(cls) -> Spill:
        """This Ray Train worker's run storage (where its checkpoints go)."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        return cls(storage.storage_filesystem, storage.experiment_fs_path)

    @classmethod
    def for_storage(cls, where: dict, run_name: str) -> Spill:
        """From train.storage()'s arguments (as `python -m dcgan_dist.register` has them)."""
        filesystem = where.get("storage_filesystem")
        if filesystem is None:
            return cls(fs.LocalFileSystem(), str(Path(where["storage_path"]).expanduser().resolve() / run_name))
        return cls(filesystem, f"{where['storage_path'].rstrip('/')}/{run_name}")

    def folder(self, run_id: str) -> str:
        return f"{self.run_directory.rstrip('/')}/{SPILL_FOLDER}/{run_id}"

    def write(self, run_id: str, metrics: list[Metric], tags: dict[str, str], images: list[tuple[np.ndarray, str, int, int]]) -> str:
        """One spill: metrics and tags in a .jsonl, each image (array, key, step, timestamp) in a
        .json of its own. Each file is written under a temporary name and moved into place, so a
        reader never sees half of one. Returns the folder; raises OSError (pyarrow's) when storage fails."""
        folder, spill_id = self.folder(run_id), f"{int(time.time() * 1000)}-{secrets.token_hex(4)}"
        self.filesystem.create_dir(folder, recursive=True)
        lines = [json.dumps(metric_record(m)) for m in metrics] + [json.dumps({"tag": k, "value": v}) for k, v in tags.items()]
        if lines:
            self._write_file(f"{folder}/{spill_id}.jsonl", ("\n".join(lines) + "\n").encode())
        for n, (array, key, step, timestamp) in enumerate(images):
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(array), allow_pickle=False)
            record = {"image": key, "step": step, "timestamp": timestamp, "npy": base64.b64encode(buffer.getvalue()).decode()}
            self._write_file(f"{folder}/{spill_id}-image-{n}.json", json.dumps(record).encode())
        return folder

    def _write_file(self, path: str, content: bytes) -> None:
        partial = f"{path}.partial"
        with self.filesystem.open_output_stream(partial) as stream:
            stream.write(content)
        self.filesystem.move(partial, path)

    def files(self, run_id: str) -> list[str]:
        """The spilled files of the run not yet delivered, oldest first."""
        selector = fs.FileSelector(self.folder(run_id), allow_not_found=True)
        found = [info.path for info in self.filesystem.get_file_info(selector) if info.type == fs.FileType.File]
        return sorted(path for path in found if path.endswith((".jsonl", ".json")))

    def deliver(self, client: MlflowClient, run_id: str) -> dict[str, int]:
        """Send every spilled file of `run_id` to the run and delete it once sent. Returns the
        counts delivered: {"metrics": n, "tags": n, "images": n}. An error of the server or of
        storage is raised; what was not delivered stays for the next call."""
        counts = {"metrics": 0, "tags": 0, "images": 0}
        for path in self.files(run_id):
            with self.filesystem.open_input_stream(path) as stream:
                content = stream.read().decode()
            if path.endswith(".jsonl"):
                records = [json.loads(line) for line in content.splitlines() if line.strip()]
                metrics = [Metric(r["metric"], r["value"], r["timestamp"], r["step"], model_id=r.get("model_id"),
                                  dataset_name=r.get("dataset_name"), dataset_digest=r.get("dataset_digest"))
                           for r in records if "metric" in r]
                tags = [RunTag(r["tag"], r["value"]) for r in records if "tag" in r]
                for start in range(0, len(metrics), BATCH_METRICS):
                    client.log_batch(run_id, metrics=metrics[start : start + BATCH_METRICS])
                for start in range(0, len(tags), BATCH_TAGS):
                    client.log_batch(run_id, tags=tags[start : start + BATCH_TAGS])
                counts["metrics"] += len(metrics)
                counts["tags"] += len(tags)
            else:
                record = json.loads(content)
                array = np.load(io.BytesIO(base64.b64decode(record["npy"])), allow_pickle=False)
                log_image_once(client, run_id, array, record["image"], record["step"], record["timestamp"])
                counts["images"] += 1
            self.filesystem.delete_file(path)
        return counts

    def where(self, run_id: str) -> str:
        """The folder as a user would name it (s3://... for S3)."""
        folder = self.folder(run_id)
        return f"s3://{folder}" if isinstance(self.filesystem, fs.S3FileSystem) else folder


def log_image_once(client: MlflowClient, run_id: str, image: np.ndarray, key: str, step: int, timestamp: int, check: bool = True) -> None:
    """client.log_image, unless (with `check`) the run holds this image (key, step and timestamp)
    already. MLflow logs an image as two uploads and a tag: one cut after the first upload and
    sent again would otherwise leave two copies of the step (each file name has its own uuid)."""
    prefix = f"images/{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+"
    if check and any(a.path.startswith(prefix) and a.path.endswith(".png") for a in client.list_artifacts(run_id, "images")):
        return
    client.log_image(run_id, image, key=key, step=step, timestamp=timestamp)


def metric_record(metric: Metric) -> dict:
    record = {"metric": metric.key, "value": metric.value, "timestamp": metric.timestamp, "step": metric.step}
    for field in ("model_id", "dataset_name", "dataset_digest"):
        if getattr(metric, field, None) is not None:
            record[field] = getattr(metric, field)
    return record


def describe(metrics: list[Metric], tags: dict[str, str], images: list[tuple]) -> str:
    """What a spill holds, for a warning: counts, metric keys and the steps they span, tag and image keys."""
    parts = []
    if metrics:
        keys, steps = sorted({m.key for m in metrics}), [m.step for m in metrics]
        parts.append(f"{len(metrics)} metrics ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}; "
                     f"steps {min(steps)}-{max(steps)})")
    if tags:
        parts.append(f"{len(tags)} tags ({', '.join(sorted(tags)[:8])}{', ...' if len(tags) > 8 else ''})")
    if images:
        parts.append(f"{len(images)} images ({', '.join(sorted({f'{image[1]}@{image[2]}' for image in images}))})")
    return ", ".join(parts) or "nothing"
