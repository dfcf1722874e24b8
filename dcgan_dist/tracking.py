"""Everything MLflow: where runs go, what a run records, and the model registry.

The driver resolves the tracking URI and makes sure the experiment exists (preflight); rank 0
of the Ray Train workers opens (or, on resume, re-opens) the run and logs into it. Metrics and
sample grids go through a `BufferedSender` thread, so the training step never waits for the
server, and a server that goes away costs at most some metrics, counted, never the run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import infer_signature

from dcgan_dist.models import build_models

log = logging.getLogger(__name__)

GENERATOR_MODEL = "dcgan-generator"
DISCRIMINATOR_MODEL = "dcgan-discriminator"
WEIGHTS_FILE, ARCHITECTURE_FILE = "state_dict.pt", "architecture.json"  # shipped with each model
DEFAULT_STORE = "mlflow.db"  # sqlite: the model registry needs a database store


class TrackingError(RuntimeError):
    pass


def resolve_tracking_uri(flag_value: str) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. Local sqlite
    paths become absolute, since Ray workers run in another working directory."""
    uri = flag_value or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def redact(value: Any) -> Any:
    """Drop user:password@ from URIs so credentials never reach params or logs."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1", value) if isinstance(value, str) else value


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError naming the URI when the store cannot be used."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable: {e}") from None


def first_line(error: Exception) -> str:
    """An exception's first line, short enough for a log line."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params as strings, credentials redacted, in log_batch's chunks of at most 100."""
    items = [Param(key, str(redact(value))) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or pick another --experiment")
        return experiment.experiment_id
    return client.create_experiment(name)


class BufferedSender:
    """Sends a run's metrics and images from a background thread.

    `add_metrics` and `add_image` only append to a buffer, so the training step never waits for
    the server. A failed send is retried with backoff (1 s doubling to `retry_max_s`) while the
    data waits in the buffer. Past `max_metrics` (or `max_images`) the oldest are dropped and
    counted; when the server answers again the counts are logged as the metrics
    `tracking/dropped_metrics` and `tracking/dropped_images` (running totals) and a warning.
    """

    def __init__(self, client: MlflowClient, run_id: str, max_metrics: int = 200_000, max_images: int = 16,
                 retry_max_s: float = 30.0):
        self.client, self.run_id = client, run_id
        self.max_metrics, self.max_images, self.retry_max_s = max_metrics, max_images, retry_max_s
        self.dropped_metrics = self.dropped_images = 0
        self._reported = (0, 0)  # the dropped counts the run already shows
        self._metrics: collections.deque[Metric] = collections.deque()
        self._images: collections.deque[tuple[np.ndarray, str, int]] = collections.deque()
        self._last_step = 0
        self._in_flight = 0  # taken out of the buffer, being sent
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def add_metrics(self, metrics: list[Metric]) -> None:
        with self._changed:
            self._metrics.extend(metrics)
            self._last_step = max([self._last_step] + [m.step for m in metrics])
            self._drop_overflow()
            self._changed.notify()

    def add_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        with self._changed:
            self._images.append((image_hwc, key, step))
            self._drop_overflow()
            self._changed.notify()

    def pending(self) -> int:
        """Metrics and images not yet sent."""
        with self._changed:
            return len(self._metrics) + len(self._images) + self._in_flight

    def close(self, timeout_s: float = 300.0) -> None:
        """Send what is left, for at most timeout_s; what could not be sent is counted and logged."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout_s)
        with self._changed:
            unsent_metrics, unsent_images = len(self._metrics), len(self._images)
            self._metrics.clear()
            self._images.clear()
        if unsent_metrics or unsent_images:
            self.dropped_metrics += unsent_metrics
            self.dropped_images += unsent_images
            log.warning("MLflow server %s: run ended with %d metrics and %d images unsent (dropped)",
                        redact(self.client.tracking_uri), unsent_metrics, unsent_images)

    def _drop_overflow(self) -> None:  # caller holds the lock
        for queue, limit, kind in ((self._metrics, self.max_metrics, "metrics"), (self._images, self.max_images, "images")):
            overflow = len(queue) - limit
            if overflow <= 0:
                continue
            for _ in range(overflow):
                queue.popleft()
            total = self.dropped_metrics if kind == "metrics" else self.dropped_images
            if total == 0:
                log.warning("MLflow buffer full: dropping the oldest %s while the server is away (counted in "
                            "tracking/dropped_%s)", kind, kind)
            if kind == "metrics":
                self.dropped_metrics += overflow
            else:
                self.dropped_images += overflow

    def _send_loop(self) -> None:
        backoff, failing = 1.0, False
        while True:
            with self._changed:
                while not (self._metrics or self._images or self._closing):
                    self._changed.wait()
                if not (self._metrics or self._images):
                    return  # closing, and everything was sent
                # Taken out while sending; put back in front if the send fails.
                batch = [self._metrics.popleft() for _ in range(min(1000, len(self._metrics)))]  # log_batch's limit
                image = self._images.popleft() if self._images and not batch else None
                self._in_flight = len(batch) + (image is not None)
            sent = False
            try:
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
                else:
                    self.client.log_image(self.run_id, image[0], key=image[1], step=image[2])
                sent = True
                self._report_drops()
            except Exception as e:  # the server is away or failing: keep the data, retry later
                with self._changed:
                    self._in_flight = 0
                    if not sent:
                        self._metrics.extendleft(reversed(batch))
                        if image is not None:
                            self._images.appendleft(image)
                        self._drop_overflow()
                if not failing:
                    log.warning("MLflow server %s is not answering (%s); buffering metrics and retrying",
                                redact(self.client.tracking_uri), first_line(e))
                failing = True
                with self._changed:
                    self._changed.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            with self._changed:
                self._in_flight = 0
            if failing:
                log.warning("MLflow server %s answers again; sending the buffered metrics", redact(self.client.tracking_uri))
            backoff, failing = 1.0, False

    def _report_drops(self) -> None:
        counts = (self.dropped_metrics, self.dropped_images)
        if counts == self._reported:
            return
        timestamp = mlflow.utils.time.get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[
            Metric("tracking/dropped_metrics", counts[0], timestamp, self._last_step),
            Metric("tracking/dropped_images", counts[1], timestamp, self._last_step),
        ])
        log.warning("MLflow server %s: %d metrics and %d images were dropped while it was away",
                    redact(self.client.tracking_uri), *counts)
        self._reported = counts


class RunLogger:
    """Rank 0's handle on one MLflow run (new, or re-opened when training resumes).

    MLflow's system metrics monitor (psutil) samples CPU, memory, disk and network (and GPUs
    with pynvml) into `system/...` metrics while the run is open."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, parent_run_id: str = "",
                 max_buffered_metrics: int = 200_000):
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                raise TrackingError(
                    f"the checkpoint continues MLflow run {run_id}, which is not in {redact(uri)}; "
                    "resume with the tracking URI it started with, or use a new --run-name"
                ) from None
        experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        self.run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            run_name=run_name if run_id is None else None,
            # A sweep's trials are child runs of the sweep's run (the tag the MLflow UI nests by).
            tags={"mlflow.parentRunId": parent_run_id} if parent_run_id and run_id is None else None,
            log_system_metrics=True,
        )
        self.run_id = self.run.info.run_id
        self.resumed = run_id is not None
        self.sender = BufferedSender(self.client, self.run_id, max_metrics=max_buffered_metrics)
        # On resume: the last step already in the run, per metric or image key (see skip_logged).
        self.logged_through: dict[str, int] = {}

    def skip_logged(self, metric_names: tuple[str, ...] | None = None, image_keys: tuple[str, ...] | None = None) -> None:
        """After a failure the run already holds the steps logged between the checkpoint it
        resumes from and the crash. Those steps are trained again, but only the first values
        are kept: from now on, steps up to each metric's (and image key's) last logged step
        are dropped, so the step axis has no duplicates; steps lost with a crashed process's
        buffer were never logged and are logged now, so it has no gaps. None = every metric
        (every image key) the run holds."""
        if metric_names is None:
            metric_names = tuple(self.client.get_run(self.run_id).data.metrics)
        for name in metric_names:
            history = self.client.get_metric_history(self.run_id, name)
            self.logged_through[name] = max((m.step for m in history), default=0)
        for artifact in self.client.list_artifacts(self.run_id, "images"):
            match = re.search(r"images/(.+?)\+step\+(\d+)\+", artifact.path)
            if match and (image_keys is None or match.group(1) in image_keys):
                key, step = match.group(1), int(match.group(2))
                self.logged_through[key] = max(self.logged_through.get(key, 0), step)
        self.logged_through = {key: step for key, step in self.logged_through.items() if step > 0}

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(redact(value))) for key, value in tags.items()])

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """rows = [(step, {name: value})]; buffered, sent by the sender thread."""
        timestamp = mlflow.utils.time.get_current_time_millis()
        self.sender.add_metrics([Metric(name, value, timestamp, step) for step, values in rows for name, value in values.items()
                                 if step > self.logged_through.get(name, 0)])

    def log_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        if step <= self.logged_through.get(key, 0):
            return
        self.sender.add_image(image_hwc, key, step)

    def log_and_register_models(self, generator: torch.nn.Module, discriminator: torch.nn.Module, step: int,
                                architecture: dict[str, Any], register: bool) -> dict[str, str]:
        """Log G and D into this run at `step` and (with `register`) register a version of each;
        returns {registered model name: version}."""
        return log_and_register_models(generator.state_dict(), discriminator.state_dict(), architecture, step,
                                       register=register)

    def set_model_alias(self, name: str, version: str, alias: str, tags: dict[str, Any]) -> None:
        set_alias(name, alias, version, self.client.tracking_uri, tags)

    def finish(self, status: str = "FINISHED", timeout_s: float = 300.0) -> None:
        self.sender.close(timeout_s)
        mlflow.end_run(status=status)


# ---------------------------------------------------------------- models and the registry


def log_and_register_models(generator_state: dict[str, torch.Tensor], discriminator_state: dict[str, torch.Tensor],
                            architecture: dict[str, Any], step: int, register: bool = True) -> dict[str, str]:
    """Log G and D (given as state dicts) as MLflow models of the active run, linked to `step`,
    and register a new version of each as `dcgan-generator` / `dcgan-discriminator` (MLflow's
    built-in `@latest` alias then points at it). Returns {registered model name: version}; each
    version is tagged with its step. Used for the final models, and for any checkpoint's (a
    run's best, say: then `set_alias(name, "champion", version)`).

    The models are saved as torch.export programs ("pt2"): loading them runs no pickled code.
    Each also carries `state_dict.pt` and `architecture.json`, from which `load_discriminator`
    rebuilds the full module (D's per-layer features, for the probe)."""
    generator, discriminator = build_models(architecture["preset"], architecture["image_size"], architecture["bn"])
    generator.load_state_dict(generator_state)
    discriminator.load_state_dict(discriminator_state)
    generator, discriminator = generator.cpu().eval(), discriminator.cpu().eval()
    z = np.random.default_rng(0).uniform(-1, 1, size=(2, architecture["z_dim"])).astype(np.float32)
    with torch.no_grad():
        images = generator(torch.from_numpy(z)).numpy()
        logits = discriminator(torch.from_numpy(images)).numpy()
    versions = {}
    for model, name, example, output in (
        (generator, GENERATOR_MODEL, z, images),
        (discriminator, DISCRIMINATOR_MODEL, images, logits),
    ):
        with tempfile.TemporaryDirectory() as folder:
            weights, spec = Path(folder, WEIGHTS_FILE), Path(folder, ARCHITECTURE_FILE)
            torch.save(model.state_dict(), weights)
            spec.write_text(json.dumps(architecture, indent=2))
            info = mlflow.pytorch.log_model(
                model,
                name=name.removeprefix("dcgan-"),
                serialization_format="pt2",
                signature=infer_signature(example, output),
                input_example=example,
                step=step,
                # Stated, not inferred: inference imports the model in a subprocess (~7 s each).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                extra_files=[str(weights), str(spec)],
            )
        if register:
            version = mlflow.register_model(info.model_uri, name, tags={"step": str(step)})
            versions[name] = str(version.version)
    return versions


def set_alias(name: str, alias: str, version: str | int, uri: str | None = None, tags: dict[str, Any] | None = None) -> None:
    """Point `models:/name@alias` at a version (e.g. `champion`), moving it from any older one, and
    tag that version. `latest` is MLflow's own, always the newest version, and cannot be set."""
    if alias == "latest":
        raise TrackingError("'latest' is MLflow's built-in alias for the newest version; it cannot be set")
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, alias, str(version))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, str(version), key, str(value))


def load_discriminator(model_uri: str, uri: str | None = None) -> tuple[torch.nn.Module, dict[str, Any], str | None, int]:
    """D rebuilt as a full module (with `.features`) from a registered model's `architecture.json`
    and `state_dict.pt`: (D, architecture, the run that logged it, its step). `model_uri` is
    `models:/name@alias` or `models:/name/version`. Raises TrackingError naming what is missing."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not match:
        raise TrackingError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match.groups()
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", tracking_uri=uri))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"{model_uri}: no such registered model, alias or version in {redact(client.tracking_uri)} "
                            f"({first_line(e)})") from None
    spec_file, weights_file = folder / "extra_files" / ARCHITECTURE_FILE, folder / "extra_files" / WEIGHTS_FILE
    if not (spec_file.is_file() and weights_file.is_file()):
        raise TrackingError(f"{model_uri}: not a dcgan-dist discriminator (no {ARCHITECTURE_FILE}/{WEIGHTS_FILE})")
    architecture = json.loads(spec_file.read_text())
    _, discriminator = build_models(architecture["preset"], architecture["image_size"], architecture["bn"])
    discriminator.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    return discriminator, architecture, version.run_id, int(version.tags.get("step", 0))
