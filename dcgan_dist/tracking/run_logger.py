"""Rank 0's handle on one MLflow run: opened (or re-opened on resume), params, tags, metrics,
pictures, and the models at the end.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from dcgan_dist.models import Architecture
from dcgan_dist.tracking import registry
from dcgan_dist.tracking.sender import BufferedSender
from dcgan_dist.tracking.spill import Spill
from dcgan_dist.tracking.store import TRACKING_FAILURES, TrackingError, check_reachable, log_params
from dcgan_dist.util import first_line, redact

log = logging.getLogger(__name__)

ABANDON_TIMEOUT_S = 10.0  # how long a run whose server is away waits for its buffered metrics


class RunLogger:
    """Rank 0's handle on one MLflow run (new, or re-opened when training resumes).

    MLflow's system metrics monitor (psutil) samples CPU, memory, disk and network (and GPUs
    with pynvml) into `system/...` metrics while the run is open."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, tags: dict[str, str] | None = None,
                 max_buffered_metrics: int = 200_000, system_metrics: bool = True, spill: Spill | None = None):
        """A new run (run_id None) gets `run_name` and `tags`, which override what MLflow infers
        (the source: Ray's worker script; the parent: `mlflow.parentRunId`, for a sweep's trials).
        `spill`: where what the sender cannot deliver goes (the run's storage; spill.py)."""
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
        if run_id is not None:  # start_run refuses a run of another experiment than the process's active one
            experiment_id = self.client.get_run(run_id).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
        self.run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            run_name=run_name if run_id is None else None,
            tags=tags if run_id is None else None,
            log_system_metrics=system_metrics,
        )
        self.run_id = self.run.info.run_id
        self.resumed = run_id is not None
        self.sender = BufferedSender(self.client, self.run_id, max_metrics=max_buffered_metrics, spill=spill)
        self.spill = spill
        # On resume: the last step already in the run, per metric or image key (see skip_logged).
        self.logged_through: dict[str, int] = {}
        self.last_logged_ms = 0  # when the run's latest training metric was logged (found by skip_logged)
        self._dataset: dict[str, str] | None = None  # training_dataset(), once read

    def skip_logged(self, metric_names: tuple[str, ...] | None = None, image_keys: tuple[str, ...] | None = None) -> None:
        """After a failure the run already holds the steps logged between the checkpoint it
        resumes from and the crash. Those steps are trained again, but only the first values
        are kept: from now on, steps up to each metric's (and image key's) last logged step
        are dropped, so the step axis has no duplicates; steps lost with a crashed process's
        buffer were never logged and are logged now, so it has no gaps. None = every metric
        (every image key) the run holds."""
        if metric_names is None:
            metric_names = tuple(self.client.get_run(self.run_id).data.metrics)
            if not metric_names:  # a new run (a run gets its first metrics before its first picture)
                return
        for name in metric_names:
            history = self.client.get_metric_history(self.run_id, name)
            self.logged_through[name] = max((m.step for m in history), default=0)
            if not name.startswith("system/"):  # MLflow's monitor samples on while training waits
                self.last_logged_ms = max([self.last_logged_ms, *(m.timestamp for m in history)])
        self.logged_through = {key: step for key, step in self.logged_through.items() if step > 0}
        for artifact in self.client.list_artifacts(self.run_id, "images"):  # images from step 0 (the untrained G's grid)
            match = re.search(r"images/(.+?)\+step\+(\d+)\+", artifact.path)
            if match and (image_keys is None or match.group(1) in image_keys):
                key, step = match.group(1), int(match.group(2))
                self.logged_through[key] = max(self.logged_through.get(key, -1), step)

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def params(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.params

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Buffered like the metrics: a server that is away never stalls the training loop."""
        self.sender.add_tags({key: str(redact(value)) for key, value in tags.items()})

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]], model_ids: tuple[str, ...] = ()) -> None:
        """rows = [(step, {name: value})]; buffered, sent by the sender thread. With `model_ids`
        (LoggedModels), each metric is also linked to each model and to the run's training data set."""
        timestamp = mlflow.utils.time.get_current_time_millis()
        links = [{"model_id": model_id} | self.training_dataset() for model_id in model_ids] or [{}]
        self.sender.add_metrics([Metric(name, value, timestamp, step, **link) for step, values in rows
                                 for name, value in values.items() if step > self.logged_through.get(name, 0) for link in links])

    def training_dataset(self) -> dict[str, str]:
        """The run's training data set as a metric names it ({dataset_name, dataset_digest}; {}
        when the run logged none), read from the run once."""
        if self._dataset is None:
            inputs = self.client.get_run(self.run_id).inputs
            found = [d.dataset for d in (inputs.dataset_inputs if inputs else [])]
            self._dataset = {"dataset_name": found[0].name, "dataset_digest": found[0].digest} if found else {}
        return self._dataset

    def log_event_metrics(self, step: int, values: dict[str, float]) -> None:
        """Metrics of an event (a restart), logged once per event, as they come: two events may
        share a step, so nothing already logged skips them."""
        timestamp = mlflow.utils.time.get_current_time_millis()
        self.sender.add_metrics([Metric(name, value, timestamp, step) for name, value in values.items()])

    def log_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        if step <= self.logged_through.get(key, -1):
            return
        self.sender.add_image(image_hwc, key, step)

    def log_models(self, architecture: Architecture, generator: torch.nn.Module, discriminator: torch.nn.Module, step: int,
                   register: bool) -> dict[str, str]:
        """Log G and D into this run at `step` and (with `register`) register a version of each;
        returns {registered model name: version}."""
        return registry.log_models(architecture, generator.state_dict(), discriminator.state_dict(), step, register=register)

    def fail_abandoned_models(self) -> None:
        """The run's LoggedModels left PENDING by an outage marked FAILED (registry.fail_abandoned)."""
        if count := registry.fail_abandoned(self.run_id, self.client.tracking_uri):
            log.warning("MLflow run %s: %d LoggedModel(s) left pending by an outage marked FAILED", self.run_id, count)

    def log_checkpoint(self, architecture: Architecture, generator: torch.nn.Module, discriminator: torch.nn.Module,
                       step: int) -> dict[str, str]:
        """An evaluated checkpoint's G and D as LoggedModels at `step` (registry.log_checkpoint):
        {registered model name: model id}. Synchronous: the other ranks wait at their next
        collective, as they do for the evaluation. A server that is away costs a warning and {}
        (the run goes on; the evaluation's metrics are then logged unlinked, through the buffer
        that spills them; the checkpoint stays in Ray's storage, and the end of training logs
        the champion and the last from it). A send cut half-way may leave a PENDING LoggedModel,
        which nothing uses and the end of training marks FAILED (fail_abandoned_models)."""
        try:
            check_reachable(self.client.tracking_uri)
            return registry.log_checkpoint(architecture, generator.state_dict(), discriminator.state_dict(), step)
        except TRACKING_FAILURES as e:
            log.warning("MLflow %s: the models of step %d were not logged (%s); the run goes on", redact(self.client.tracking_uri),
                        step, first_line(e))
            return {}

    def set_alias(self, name: str, version: str, alias: str, tags: dict[str, Any]) -> None:
        registry.set_alias(name, version, alias, self.client.tracking_uri, tags)

    def tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    def finish(self, status: str = "FINISHED", timeout_s: float = 300.0) -> None:
        self.sender.close(timeout_s)
        try:
            if status == "FAILED" and (ended := self.client.get_run(self.run_id).info.status) != "RUNNING":
                status = ended  # a sweep that stopped or cut off this trial ended it KILLED first: keep that
            mlflow.end_run(status=status)
        except Exception as e:  # noqa: BLE001 - the server is away; the run keeps its last status
            log.warning("MLflow %s: could not mark run %s %s (%s)", redact(self.client.tracking_uri), self.run_id, status,
                        first_line(e))

    def abandon(self, timeout_s: float = ABANDON_TIMEOUT_S) -> None:
        """Close without ending the run: the server is away (what is unsent is counted and dropped)."""
        self.sender.close(timeout_s)
