"""The authors' released weights (Newmu/dcgan_code) as our networks: found, checked, converted.

A model folder (e.g. `models/svhn_unsup_all_conv_dcgan_100z_gaussian_lr_0.0005_64mb/`) holds
`EPOCH_gen_params.jl_NN.npy` and `EPOCH_discrim_params.jl_NN.npy`, NN = 01, 02, ... in the
argument order of the authors' gen() and discrim(). Each is read with
numpy.load(allow_pickle=False); the `.jl` index files (joblib pickles) are never opened. Every
shape is checked against the preset (authors/networks.py) before anything is built.

Theano's conventions (lib/ops.py), converted to torch's:
- conv: cuDNN with conv_mode='conv' (dnn_conv's default) is a true convolution, the kernel
  flipped; torch's Conv2d cross-correlates. Kernels (out, in, k, k) are flipped in both spatial axes.
- deconv: the gradient of that convolution with respect to its input. Its kernel (C_in, C_out,
  k, k) is already torch's ConvTranspose2d layout (the gradient of a cross-correlation), so only
  the spatial flip is needed; stride s and padding k // 2 give output_padding s - 1.
- linear: T.dot(x, W) with W (in, out): torch's weight is W transposed.
- BatchNorm: gain g and shift b as given, epsilon 1e-8; the layers have no biases (ours, where a
  layer has no BN, are set to zero).
- BatchNorm statistics: the files hold none, and the authors normalise by the current batch's
  statistics (their probe re-estimates D's on training images). The import re-estimates them as
  their `infer_bnorm_stats` does, the mean over batches of each batch's mean and (biased)
  variance: G's on STATS_BATCHES batches of STATS_BATCH latents from its prior, D's on G's
  samples, so that eval mode behaves like the authors' networks at batch size 128.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcgan_dist.authors.networks import LayerStack
from dcgan_dist.choices import STATS_BATCH, STATS_BATCHES
from dcgan_dist.models import PRESETS, Architecture, build_models, sample_latent
from dcgan_dist.tracking.store import TrackingError

PREFIX = "authors:"
AUTHORS_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.layers is not None)
FILE_NAME = re.compile(r"(?P<epoch>\d+)_(?P<kind>gen|discrim)_params\.jl_(?P<index>\d+)\.npy")
KINDS = {"generator": "gen", "discriminator": "discrim"}


class AuthorsError(TrackingError):
    """The authors' files are missing, misnamed or do not fit the preset (one line, exit 2)."""


@dataclass(frozen=True)
class Slot:
    """One authors' array: our state-dict key, the shape in their file, how it converts."""

    key: str
    shape: tuple[int, ...]
    kind: str  # "conv" (flip), "linear" (transpose), "vector" (as is)


def generator_slots(stack: LayerStack, z_dim: int) -> list[Slot]:
    """gen(Z, w, g, b, w2, g2, b2, ..., wx): the projection, then each (transposed) conv."""
    features = 16 * stack.projection
    slots = [Slot("project.weight", (z_dim, features), "linear"),
             Slot("project_norm.0.weight", (features,), "vector"), Slot("project_norm.0.bias", (features,), "vector")]
    channels = stack.projection
    for index, (filters, _) in enumerate(stack.generator):
        slots.append(Slot(f"blocks.{3 * index}.weight", (channels, filters, stack.kernel_size, stack.kernel_size), "conv"))
        if index < len(stack.generator) - 1:  # the output layer has no BN
            slots += [Slot(f"blocks.{3 * index + 1}.weight", (filters,), "vector"), Slot(f"blocks.{3 * index + 1}.bias", (filters,), "vector")]
        channels = filters
    return slots


def discriminator_slots(stack: LayerStack) -> list[Slot]:
    """discrim(X, w, w2, g2, b2, ..., wy): each conv (BN on all but the first), then the logit."""
    slots, channels = [], 3
    for index, (filters, _) in enumerate(stack.discriminator):
        slots.append(Slot(f"blocks.{index}.0.weight", (filters, channels, stack.kernel_size, stack.kernel_size), "conv"))
        if index > 0:
            slots += [Slot(f"blocks.{index}.1.weight", (filters,), "vector"), Slot(f"blocks.{index}.1.bias", (filters,), "vector")]
        channels = filters
    return slots + [Slot("classify.weight", (16 * channels, 1), "linear")]


def slots_of(preset: str) -> dict[str, list[Slot]]:
    chosen = PRESETS[preset]
    return {"generator": generator_slots(chosen.layers, chosen.z_dim), "discriminator": discriminator_slots(chosen.layers)}


# ---------------------------------------------------------------- the files


def model_folder(path: Path) -> Path:
    """The folder holding the .npy files: `path`, or its one subfolder that does (the layout of
    a copy with SOURCE and LICENSE next to the model folder)."""
    if not path.is_dir():
        raise AuthorsError(f"{path}: no such folder (give the authors' model folder of *_gen_params.jl_NN.npy files)")
    if any(FILE_NAME.fullmatch(p.name) for p in path.iterdir()):
        return path
    inner = [p for p in sorted(path.iterdir()) if p.is_dir() and any(FILE_NAME.fullmatch(q.name) for q in p.iterdir())]
    if len(inner) != 1:
        found = f"{len(inner)} model folders in it" if inner else "no *_gen_params.jl_NN.npy / *_discrim_params.jl_NN.npy files"
        raise AuthorsError(f"{path}: {found}; give one authors' model folder")
    return inner[0]


def weight_files(folder: Path) -> tuple[str, dict[str, dict[int, Path]]]:
    """(epoch, {network: {file number: path}}); one epoch per folder."""
    matches = [(m, p) for p in sorted(folder.iterdir()) if (m := FILE_NAME.fullmatch(p.name))]
    epochs = sorted({m["epoch"] for m, _ in matches}, key=int)
    if len(epochs) > 1:
        raise AuthorsError(f"{folder}: weights of several epochs ({', '.join(epochs)}); keep one epoch's files in the folder")
    files: dict[str, dict[int, Path]] = {network: {} for network in KINDS}
    for m, p in matches:
        files["generator" if m["kind"] == "gen" else "discriminator"][int(m["index"])] = p
    return epochs[0], files


def infer_preset(folder: Path, files: dict[str, dict[int, Path]]) -> str:
    """The authors' preset whose file counts fit (either network's count, so that one missing
    file is then named by the shape check)."""
    counts = {network: max(numbered, default=0) for network, numbered in files.items()}
    expected = {preset: {network: len(slots) for network, slots in slots_of(preset).items()} for preset in AUTHORS_PRESETS}
    fits = [preset for preset in AUTHORS_PRESETS if expected[preset] == counts] or [
        preset for preset in AUTHORS_PRESETS if any(expected[preset][n] == counts[n] for n in KINDS)]
    if len(fits) != 1:
        known = ", ".join(f"{p}: {e['generator']} and {e['discriminator']}" for p, e in expected.items())
        raise AuthorsError(f"{folder}: {counts['generator']} generator and {counts['discriminator']} discriminator files fit no "
                           f"authors' preset ({known}); is it an authors' model folder?")
    return fits[0]


def read_arrays(folder: Path, epoch: str, numbered: dict[int, Path], slots: list[Slot], preset: str, network: str) -> list[np.ndarray]:
    """The network's arrays in order, each checked against its slot; the first misfit is named."""
    kind = KINDS[network]
    arrays = []
    for index, slot in enumerate(slots, start=1):
        path = folder / f"{epoch}_{kind}_params.jl_{index:02d}.npy"
        if index not in numbered:
            raise AuthorsError(f"{path}: missing ({preset}'s {network} has {len(slots)} files)")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise AuthorsError(f"{path}: not a numpy array file ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
            raise AuthorsError(f"{path}: not a single numpy array")
        if tuple(array.shape) != slot.shape or not np.issubdtype(array.dtype, np.floating):
            raise AuthorsError(f"{path}: {array.dtype} array of shape {tuple(array.shape)}, {preset}'s {network} expects "
                               f"a float array of shape {slot.shape} here ({slot.key}); weights of another network?")
        arrays.append(array)
    extra = sorted(set(numbered) - set(range(1, len(slots) + 1)))
    if extra:
        raise AuthorsError(f"{numbered[extra[0]]}: unexpected ({preset}'s {network} has {len(slots)} files)")
    return arrays


# ---------------------------------------------------------------- the conversion


def convert(array: np.ndarray, kind: str) -> torch.Tensor:
    """One authors' array as our parameter: kernels flipped (true convolution -> cross-correlation),
    linear maps transposed, vectors as they are."""
    if kind == "conv":
        array = array[:, :, ::-1, ::-1]
    elif kind == "linear":
        array = array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def state_of(model: nn.Module, slots: list[Slot], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """`model`'s state dict with the authors' arrays in their slots and every bias at zero (the
    authors' layers have none); BatchNorm statistics are left for `reestimate_statistics`."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for slot, array in zip(slots, arrays):
        state[slot.key] = convert(array, slot.kind)
    given = {slot.key for slot in slots}
    for key in state:
        if key.endswith(".bias") and key not in given:
            state[key] = torch.zeros_like(state[key])
    return state


@torch.no_grad()
def reestimate_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Each BatchNorm's running statistics = the mean over `batches` of each batch's mean and
    biased variance of its input (the authors' infer_bnorm_stats), with the model normalising
    by batch statistics meanwhile, as the authors' networks do."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = {id(m): [0.0, 0.0] for m in norms}

    def record(module, inputs, _output):
        x = inputs[0].double()
        sums[id(module)][0] += x.mean(dim=(0, 2, 3))
        sums[id(module)][1] += x.var(dim=(0, 2, 3), unbiased=False)

    hooks = [m.register_forward_hook(record) for m in norms]
    was_training = model.training
    model.train()
    count = 0
    try:
        for batch in batches:  # any iterable: the probe streams its images
            model(batch)
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for m in norms:
        mean, var = sums[id(m)]
        m.running_mean.copy_(mean / count)
        m.running_var.copy_(var / count)
        m.num_batches_tracked.fill_(count)


@dataclass
class Imported:
    """The authors' G and D as our modules (eval mode), and what the import did."""

    architecture: Architecture
    generator: nn.Module
    discriminator: nn.Module
    folder: Path
    epoch: str
    statistics: str  # how the BatchNorm statistics were set, in words


def load_authors(path: Path | str, preset: str | None = None, stats_batches: int = STATS_BATCHES, seed: int = 0,
                 stats_batch: int = STATS_BATCH) -> Imported:
    """The authors' model folder as our G and D of an authors' preset (inferred from the file
    counts unless given). AuthorsError names the folder or file that does not fit."""
    folder = model_folder(Path(path).expanduser())
    epoch, files = weight_files(folder)
    if preset is not None and preset not in AUTHORS_PRESETS:
        raise AuthorsError(f"--preset {preset}: not one of the authors' networks ({', '.join(AUTHORS_PRESETS)})")
    preset = preset or infer_preset(folder, files)
    architecture = Architecture.of(preset, 32, "paper")
    generator, discriminator = build_models(preset, 32, "paper")
    for model, network in ((generator, "generator"), (discriminator, "discriminator")):
        slots = slots_of(preset)[network]
        model.load_state_dict(state_of(model, slots, read_arrays(folder, epoch, files[network], slots, preset, network)))
    rng = torch.Generator().manual_seed(seed)
    latents = [sample_latent(stats_batch, preset, rng=rng) for _ in range(stats_batches)]
    reestimate_statistics(generator, latents)
    with torch.no_grad():
        samples = [generator.eval()(z) for z in latents]
    reestimate_statistics(discriminator, samples)
    statistics = (f"none in the files: re-estimated, G's on {stats_batches} batches of {stats_batch} latents of its prior, "
                  f"D's on G's samples of those (the authors' infer_bnorm_stats: mean of per-batch mean and biased variance)")
    return Imported(architecture, generator.eval(), discriminator.eval(), folder, epoch, statistics)


def network_state(reference: str, network: str) -> tuple[Architecture, dict[str, torch.Tensor], None, int, None]:
    """registry.load_network's hook for `authors:PATH`: (architecture, state, run id, step, store)."""
    imported = load_authors(reference.removeprefix(PREFIX))
    return imported.architecture, getattr(imported, network).state_dict(), None, 0, None
