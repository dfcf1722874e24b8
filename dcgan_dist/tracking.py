"""Everything MLflow: where runs go, what a run records, and the model registry.

The driver resolves the tracking URI and makes sure the experiment exists (preflight); rank 0
of the Ray Train workers opens (or, on resume, re-opens) the run and logs into it. Metrics are
sent with log_batch(synchronous=False), so the training step never waits for the store.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature

GENERATOR_MODEL = "dcgan-generator"
DISCRIMINATOR_MODEL = "dcgan-discriminator"
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


class RunLogger:
    """Rank 0's handle on one MLflow run (new, or re-opened when training resumes)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, parent_run_id: str = ""):
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
        )
        self.run_id = self.run.info.run_id
        self.resumed = run_id is not None
        # On resume: the last step already in the run, per metric or image key (see skip_logged).
        self.logged_through: dict[str, int] = {}

    def skip_logged(self, metric_names: tuple[str, ...], image_keys: tuple[str, ...]) -> None:
        """After a failure the run already holds the steps logged between the checkpoint it
        resumes from and the crash. Those steps are trained again, but only the first values
        are kept: from now on, steps up to each metric's (and image key's) last logged step
        are dropped, so the step axis has no duplicates; steps lost with a crashed process's
        queue were never logged and are logged now, so it has no gaps."""
        for name in metric_names:
            history = self.client.get_metric_history(self.run_id, name)
            self.logged_through[name] = max((m.step for m in history), default=0)
        for artifact in self.client.list_artifacts(self.run_id, "images"):
            match = re.search(r"images/(.+?)\+step\+(\d+)\+", artifact.path)
            if match:
                key, step = match.group(1), int(match.group(2))
                self.logged_through[key] = max(self.logged_through.get(key, 0), step)
        self.logged_through = {key: step for key, step in self.logged_through.items() if step > 0}

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(redact(value)))

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """rows = [(step, {name: value})]; queued, not waited for."""
        timestamp = mlflow.utils.time.get_current_time_millis()
        metrics = [Metric(name, value, timestamp, step) for step, values in rows for name, value in values.items()
                   if step > self.logged_through.get(name, 0)]
        for start in range(0, len(metrics), 1000):  # log_batch's metric limit per call
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000], synchronous=False)

    def log_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        if step <= self.logged_through.get(key, 0):
            return
        self.client.log_image(self.run_id, image_hwc, key=key, step=step, synchronous=False)

    def log_and_register_models(self, generator: torch.nn.Module, discriminator: torch.nn.Module, step: int, architecture: dict[str, Any], register: bool) -> dict[str, str]:
        """Log G and D as MLflow models (signature, input example, linked to `step`) and register
        a new version of each; MLflow's built-in `@latest` alias then points at it.

        The models are saved as torch.export programs ("pt2"): loading them runs no pickled
        code. Each also carries `state_dict.pt` and `architecture.json`, from which
        `models.build_models` rebuilds the full module (D's per-layer features, for the probe)."""
        versions = {}
        generator, discriminator = generator.cpu().eval(), discriminator.cpu().eval()
        z = np.random.default_rng(0).uniform(-1, 1, size=(2, architecture["z_dim"])).astype(np.float32)
        with torch.no_grad():
            images = generator(torch.from_numpy(z)).numpy()
            logits = discriminator(torch.from_numpy(images)).numpy()
        for model, name, example, output in (
            (generator, GENERATOR_MODEL, z, images),
            (discriminator, DISCRIMINATOR_MODEL, images, logits),
        ):
            with tempfile.TemporaryDirectory() as folder:
                weights, spec = Path(folder, "state_dict.pt"), Path(folder, "architecture.json")
                torch.save(model.state_dict(), weights)
                spec.write_text(json.dumps(architecture, indent=2))
                info = mlflow.pytorch.log_model(
                    model,
                    name=name.removeprefix("dcgan-"),
                    serialization_format="pt2",
                    signature=infer_signature(example, output),
                    input_example=example,
                    step=step,
                    registered_model_name=name if register else None,
                    # Stated, not inferred: inference imports the model in a subprocess (~7 s each).
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                    extra_files=[str(weights), str(spec)],
                )
            if register:
                versions[name] = str(info.registered_model_version)
        return versions

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.flush_async_logging()
        mlflow.end_run(status=status)
