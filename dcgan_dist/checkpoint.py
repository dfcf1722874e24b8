"""The full training state in one directory: everything needed to continue exactly.

Rank 0 writes `state.pt` (G, D, both Adam states, the step, the MLflow run id, the config
with credentials dropped from its URIs (a resume takes its tracking URI from its own command
line), the architecture, the best snapshot by evaluation score, the data position: epoch and step in it);
every rank writes its own RNG state to `rng-rank{N}.pt`. Ray Train merges the ranks'
directories into one checkpoint, and each rank's upload adds its manifest last
(checkpoint_upload.py); `state.pt` says so (MANIFESTS), so that a reader refuses such a checkpoint
without them and still reads one written before them. Everything is loaded with weights_only=True: tensors and
plain containers only, no pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgan_dist.models import Architecture
from dcgan_dist.util import redact

STATE_FILE = "state.pt"
MANIFESTS = "manifests"  # state.pt's key: the checkpoint was uploaded with manifests (checkpoint_upload.py)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers (or the module
    itself): its state_dict has the plain parameter names."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU generator's state and, on a GPU worker, its own device's only. Ray gives the
    workers of a node a shared CUDA_VISIBLE_DEVICES list, and after a restart a rank may land
    on another GPU of it or on a node with another GPU count, so the state is tied to the rank,
    not to a device ordinal."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    # A list is what earlier checkpoints held (every visible GPU by ordinal): which one was this
    # rank's is unknown, so the device keeps its fresh seed.
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)


def save(
    directory: str | Path,
    *,
    rank: int,
    device: torch.device,
    step: int,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    mlflow_run_id: str | None,
    config: dict[str, Any],
    architecture: Architecture,
    best: dict[str, Any] | None = None,
    data_position: dict[str, Any] | None = None,
) -> None:
    directory = Path(directory)
    torch.save(rng_state(device), directory / rng_file(rank))
    if rank != 0:  # the models are replicas; one copy is enough
        return
    state = {
        "step": step,
        "generator": unwrap(generator).state_dict(),
        "discriminator": unwrap(discriminator).state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "mlflow_run_id": mlflow_run_id,
        "config": {key: redact(value) for key, value in config.items()},  # a checkpoint is copied, shared, kept
        "architecture": architecture.to_dict(),
        "best": best,  # the best snapshot by evaluation score (evaluate.Best.state()), or None
        "data_position": data_position,  # data.split.Position.state(): where the ranks are in the epoch
        MANIFESTS: True,
    }
    torch.save(state, directory / STATE_FILE)


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a dcgan-dist checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def architecture_of(state: dict[str, Any]) -> Architecture:
    """The architecture a checkpoint's weights are for (from its config when it predates the
    saved architecture). ValueError when it names none."""
    if "architecture" in state:
        return Architecture.from_dict(state["architecture"])
    config = state.get("config", {})
    if "model.preset" not in config:
        raise ValueError("no architecture and no model.preset in its config")
    return Architecture.of(config["model.preset"], int(config.get("model.image_size", 0)), config.get("model.bn", ""))


def load_rng(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state, or None when the run had fewer ranks than now."""
    path = Path(directory) / rng_file(rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
