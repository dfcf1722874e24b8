"""The model registry: G and D logged and registered as MLflow models, aliases, and the one
loader of models (registered, or from a training checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.models import infer_signature

from dcgan_dist import checkpoint
from dcgan_dist.authors import weights as authors
from dcgan_dist.models import Architecture
from dcgan_dist.tracking import scripted
from dcgan_dist.tracking.store import TrackingError
from dcgan_dist.util import first_line, redact

GENERATOR_MODEL = "dcgan-generator"
DISCRIMINATOR_MODEL = "dcgan-discriminator"
WEIGHTS_FILE, ARCHITECTURE_FILE = "state_dict.pt", "architecture.json"  # shipped with each model
STEP_TAG = "step"  # each version's: the training step its weights are from
NETWORKS = ("generator", "discriminator")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def log_models(architecture: Architecture, generator_state: dict[str, torch.Tensor], discriminator_state: dict[str, torch.Tensor],
               step: int, register: bool = True) -> dict[str, str]:
    """G and D (given as state dicts) as LoggedModels of the active run at `step`
    (`log_checkpoint`) and (with `register`) a new version of each registered FROM its
    LoggedModel as `dcgan-generator` / `dcgan-discriminator` (MLflow's built-in `@latest` alias
    then points at it; the version's source is `models:/<model id>`). Returns {registered model
    name: version} ({} without `register`); each version is tagged with its step. Used for the
    final models, and for a run's best (then `set_alias(name, version, "champion")`).

    Registering is done once per run, step and model: a version this run registered for `step`
    before (`registered_version`) is returned as it is, its model not logged again; a LoggedModel
    this run logged for `step` before (at an evaluation) is registered, not logged again. So a
    re-run whose run lost the tags that said so (the server away before the buffered tags were
    sent) registers only what is missing, G and D each on its own."""
    run_id, versions = mlflow.active_run().info.run_id, {}
    for name in (GENERATOR_MODEL, DISCRIMINATOR_MODEL) if register else ():
        if (version := registered_version(name, run_id, step)) is not None:
            versions[name] = version
    missing = tuple(name for name in (GENERATOR_MODEL, DISCRIMINATOR_MODEL) if name not in versions)
    if not missing:
        return versions
    model_ids = log_checkpoint(architecture, generator_state, discriminator_state, step, only=missing)
    if register:
        for name in missing:
            # The step tag goes with the version's creation (one request), so it cannot be lost apart from it.
            version = mlflow.register_model(f"models:/{model_ids[name]}", name, tags={STEP_TAG: str(step)})
            versions[name] = str(version.version)
    return versions


def log_checkpoint(architecture: Architecture, generator_state: dict[str, torch.Tensor], discriminator_state: dict[str, torch.Tensor],
                   step: int, only: tuple[str, ...] = (GENERATOR_MODEL, DISCRIMINATOR_MODEL)) -> dict[str, str]:
    """G and D of `step` as MLflow 3 LoggedModels of the active run (`mlflow.pytorch.log_model(...,
    step=step)`, named `generator` / `discriminator`, tagged `step`): {registered model name:
    model id}. A READY LoggedModel of this run, network and step (logged by an earlier attempt)
    is kept, not logged again.

    The models are saved as TorchScript modules (`scripted.py`): `mlflow.pytorch.load_model`
    returns a real module (`.eval()`, `.to(device)`, any batch) and runs no pickled Python.
    Each also carries `state_dict.pt` and `architecture.json`, from which `load_network`
    rebuilds the plain `models.py` module (D's per-layer features, for the probe)."""
    run = mlflow.active_run()
    model_ids = {name: found for name in only if (found := logged_model_id(name, run.info.run_id, step, run.info.experiment_id))}
    if len(model_ids) == len(only):
        return model_ids
    with torch.random.fork_rng(devices=[]):  # mid-training: building draws initial weights, and training's RNG is not ours to move
        generator, discriminator = architecture.build()
    generator.load_state_dict(generator_state)
    discriminator.load_state_dict(discriminator_state)
    generator, discriminator = generator.cpu().eval(), discriminator.cpu().eval()
    z = np.random.default_rng(0).uniform(-1, 1, size=(2, architecture.z_dim)).astype(np.float32)
    with torch.no_grad():
        images = generator(torch.from_numpy(z)).numpy()
        logits = discriminator(torch.from_numpy(images)).numpy()
    for model, name, example, output in (
        (generator, GENERATOR_MODEL, z, images),
        (discriminator, DISCRIMINATOR_MODEL, images, logits),
    ):
        if name in only and name not in model_ids:
            model_ids[name] = _log_model(model, name, example, output, architecture, step)
    return model_ids


def _log_model(model: torch.nn.Module, name: str, example: np.ndarray, output: np.ndarray, architecture: Architecture, step: int) -> str:
    with tempfile.TemporaryDirectory() as folder:
        weights, spec = Path(folder, WEIGHTS_FILE), Path(folder, ARCHITECTURE_FILE)
        torch.save(model.state_dict(), weights)
        spec.write_text(json.dumps(architecture.to_dict(), indent=2))
        with _without_torchscript_notices():
            info = mlflow.pytorch.log_model(
                scripted.script(model),
                name=name.removeprefix("dcgan-"),
                # MLflow's name for torch.save'd modules; a TorchScript one is saved by torch.jit.save
                # and read back by torch.jit.load, no pickled Python (docs/tracking.md).
                serialization_format="pickle",
                signature=infer_signature(example, output),
                input_example=example,
                step=step,
                tags={STEP_TAG: str(step)},
                # Stated, not inferred: inference imports the model in a subprocess (~7 s each).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                extra_files=[str(weights), str(spec)],
            )
    return info.model_id


def logged_model_id(name: str, run_id: str, step: int, experiment_id: str) -> str | None:
    """The READY LoggedModel of `name` (G or D) that run `run_id` logged for `step`, or None; the
    oldest, should there be several. MLflow's own search, on the process's tracking URI."""
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND name = '{name.removeprefix('dcgan-')}' AND tags.{STEP_TAG} = '{step}'",
        order_by=[{"field_name": "creation_time", "ascending": True}])
    ready = [model.model_id for model in found if model.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def fail_abandoned(run_id: str, uri: str | None = None) -> int:
    """Marks FAILED every LoggedModel of run `run_id` still PENDING: at the end of training none
    is being uploaded, so those are what a send cut between MLflow's create and its upload left
    (nothing uses them; the UI would show them pending for ever). Returns how many."""
    client, abandoned, page = MlflowClient(uri), [], None
    experiment_id = client.get_run(run_id).info.experiment_id
    while True:  # a long run logs two models an evaluation: page through them
        found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=page)
        abandoned += [model.model_id for model in found if model.status == LoggedModelStatus.PENDING]
        if not (page := found.token):
            break
    for model_id in abandoned:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    return len(abandoned)


def registered_version(name: str, run_id: str, step: int, uri: str | None = None) -> str | None:
    """The version of `name` that run `run_id` registered for its models of `step`, or None: the
    registry's own answer, whatever tags the run holds. The oldest, should there be several."""
    found = MlflowClient(uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}' and tags.{STEP_TAG} = '{step}'")
    return str(min(int(version.version) for version in found)) if found else None


@contextlib.contextmanager
def _without_torchscript_notices():
    """Silence what logging a TorchScript module prints about formats it is not: MLflow's warning
    that pickled modules run code on load, and torch 2.14's TorchScript deprecation notices (MLflow
    loads the saved module once to check the input example)."""
    pickle_warning = _DropMessages("Saving pytorch model by Pickle")
    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(pickle_warning)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", "'torch.load' received a zip file that looks like a TorchScript archive", UserWarning)
            yield
    finally:
        logger.removeFilter(pickle_warning)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def set_alias(name: str, version: str | int, alias: str, uri: str | None = None, tags: dict[str, Any] | None = None) -> None:
    """Point `models:/name@alias` at a version (e.g. `champion`), moving it from any older one, and
    tag that version. `latest` is MLflow's own, always the newest version, and cannot be set."""
    if alias == "latest":
        raise TrackingError("'latest' is MLflow's built-in alias for the newest version; it cannot be set")
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, alias, str(version))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, str(version), key, str(value))


@dataclass
class LoadedNetwork:
    """G or D rebuilt as the full module (D with `.features`), in eval mode, and where it came from."""

    network: torch.nn.Module
    architecture: Architecture
    run_id: str | None  # the training run that logged it, when known
    step: int  # the training step it is from (0 when unknown)
    tracking_uri: str | None = None  # a checkpoint's: the store its run was tracked in


def load_network(reference: str, network: str, tracking_uri: str | None = None) -> LoadedNetwork:
    """The one loader of trained networks: `network` ("generator" or "discriminator") from a
    registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), from a training
    checkpoint folder (or its state.pt), or from the authors' released weights (`authors:PATH`). Raises TrackingError naming the reference and the problem."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if reference.startswith(authors.PREFIX):  # the authors' released .npy files, converted (authors/weights.py)
        architecture, state, run_id, step, store = authors.network_state(reference, network)
    elif reference.startswith("models:/") or "://" in reference:
        architecture, state, run_id, step, store = _from_registry(reference, tracking_uri)
    else:
        architecture, state, run_id, step, store = _from_checkpoint(Path(reference).expanduser(), network)
    model = architecture.build()[NETWORKS.index(network)]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrackingError(f"{reference}: its weights are not a {network}'s of {_describe(architecture)} "
                            f"({first_line(e)})") from None
    return LoadedNetwork(model.eval(), architecture, run_id, step, store)


def _describe(architecture: Architecture) -> str:
    return f"preset {architecture.preset!r} at {architecture.image_size} px, bn {architecture.bn!r}"


def _from_registry(reference: str, tracking_uri: str | None):
    match = MODEL_URI.fullmatch(reference)
    if not match:
        raise TrackingError(f"{reference}: expected models:/NAME@ALIAS or models:/NAME/VERSION (or a checkpoint folder)")
    client = MlflowClient(tracking_uri)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{match['name']}/{version.version}", tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"{reference}: no such registered model, alias or version in {redact(client.tracking_uri)} "
                            f"({first_line(e)})") from None
    spec_file, weights_file = folder / "extra_files" / ARCHITECTURE_FILE, folder / "extra_files" / WEIGHTS_FILE
    if not (spec_file.is_file() and weights_file.is_file()):
        raise TrackingError(f"{reference}: not logged by dcgan-dist (no {ARCHITECTURE_FILE}/{WEIGHTS_FILE})")
    try:
        architecture = Architecture.from_dict(json.loads(spec_file.read_text()))
    except (ValueError, TypeError) as e:
        raise TrackingError(f"{reference}: unreadable {ARCHITECTURE_FILE} ({first_line(e)})") from None
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    return architecture, state, version.run_id, int(version.tags.get(STEP_TAG, 0)), None


def _from_checkpoint(path: Path, network: str):
    folder = path.parent if path.name == checkpoint.STATE_FILE else path
    try:
        state = checkpoint.load_state(folder)
    except FileNotFoundError:
        raise TrackingError(f"{path}: not a models:/ URI, and no {checkpoint.STATE_FILE} there") from None
    except Exception as e:  # a corrupt or foreign file
        raise TrackingError(f"{path}: unreadable checkpoint ({first_line(e)})") from None
    try:
        architecture = checkpoint.architecture_of(state)
    except (ValueError, TypeError) as e:
        raise TrackingError(f"{path}: the checkpoint names no usable architecture ({first_line(e)})") from None
    config = state.get("config", {})
    return (architecture, state[network], state.get("mlflow_run_id"), int(state.get("step", 0)),
            config.get("tracking.tracking_uri") or None)
