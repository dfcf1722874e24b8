"""Feature backbones for FID/KID: each maps images in [-1, 1] (N x 3 x H x W) to feature rows.

- `digits`: a small CNN classifier trained by our own code on scikit-learn's bundled digits,
  deterministically, and cached on disk under a name derived from its training recipe (change
  the recipe and a new one is trained). Offline, so CI and laptops can score digits runs. Its
  penultimate layer gives the features, its softmax the classifier score.
- `inception`: torchvision's Inception-v3 with weights from a file the user supplies (for
  example torchvision's `inception_v3_google-0cc3c7bd.pth`); nothing is downloaded. Its 2048-d
  pool3 features are the usual FID features (torchvision's port, so values are close to, not
  identical with, the TensorFlow FID code's).
- `fid-inception`: the FID Inception network (fid_inception.py) with the user's
  `pt_inception-2015-12-05-*.pth` file: the network published FIDs and Inception Scores use,
  so its scores compare with the literature's (at the same sample counts).

A score is only comparable with another from the same backbone `name` and sample counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.choices import BACKBONES, NEEDS_WEIGHTS  # noqa: F401 (train.py reads backbones.NEEDS_WEIGHTS)

log = logging.getLogger(__name__)

CACHE_ENV = "DCGAN_DIST_CACHE"  # where the trained digits classifier is kept
DIGITS_SIDE = 16  # the digits are 8x8 at heart: 16 px keeps the strokes and costs 1/4 of 32 px
INCEPTION_SIDE = 299
# Everything that decides the digits classifier's weights: its hash names the cached file.
DIGITS_RECIPE = {"version": 1, "side": DIGITS_SIDE, "epochs": 12, "batch_size": 64, "lr": 1e-3, "seed": 0, "max_shift": 1, "holdout": 300}


class BackboneError(ValueError):
    """A backbone that cannot be loaded; the message names the file and what is wrong."""


@dataclass
class Backbone:
    name: str  # logged with every score: FID values compare only under the same backbone
    model: nn.Module  # images -> (features, class logits or None)
    input_side: int
    device: torch.device
    score: Callable[[np.ndarray], dict[str, float]] | None = None  # what the class probabilities give

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 200) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, class probabilities or None) for images in [-1, 1], in batches."""
        features, probabilities = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device, torch.float32)
            if batch.shape[-1] != self.input_side:
                batch = F.interpolate(batch, size=(self.input_side, self.input_side), mode="bilinear", align_corners=False)
            rows, logits = self.model(batch)
            features.append(rows.double().cpu().numpy())
            if logits is not None:
                probabilities.append(logits.double().softmax(dim=1).cpu().numpy())  # in float64: the IS takes their logs
        return np.concatenate(features), (np.concatenate(probabilities) if probabilities else None)


def load(name: str, inception_weights: str = "", device: torch.device | str = "cpu") -> Backbone:
    """The backbone for --eval-backbone (and --inception-weights)."""
    from dcgan_dist.evaluate.scores import classifier_score, inception_score

    device = torch.device(device)
    if name == "digits":
        return Backbone(f"digits-cnn-{recipe_hash()}", load_digits_classifier().to(device).eval(), DIGITS_SIDE, device,
                        classifier_score)
    if name == "inception":
        model, digest = load_inception(inception_weights)
        return Backbone(f"inception-v3-{digest}", model.to(device).eval(), INCEPTION_SIDE, device)
    if name == "fid-inception":
        model, digest = load_fid_inception(inception_weights)
        return Backbone(f"fid-inception-{digest}", model.to(device).eval(), INCEPTION_SIDE, device, inception_score)
    raise BackboneError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")


# ---------------------------------------------------------------- digits


class DigitsClassifier(nn.Module):
    """Three conv blocks, global average pooling to 128 features, a linear layer to 10 classes.
    Takes 3-channel images in [-1, 1] and averages the channels (the digits are grey)."""

    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images.mean(dim=1, keepdim=True))
        return features, self.head(features)


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(DIGITS_RECIPE, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dcgan_dist")


def load_digits_classifier() -> DigitsClassifier:
    """The cached classifier for DIGITS_RECIPE, trained (about 30 s on 2 shared CPU cores) when missing."""
    path = cache_dir() / f"digits-cnn-{recipe_hash()}.pt"
    if path.is_file():
        model = DigitsClassifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return model
    started = time.perf_counter()
    model, accuracy = train_digits_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # rename: readers see a whole file or none
    torch.save({"state_dict": model.state_dict(), "recipe": DIGITS_RECIPE, "holdout_accuracy": accuracy}, partial)
    partial.replace(path)
    log.info("Trained the digits classifier in %.0f s (held-out accuracy %.3f): %s",
             time.perf_counter() - started, accuracy, path)
    return model


def train_digits_classifier() -> tuple[DigitsClassifier, float]:
    """Train on the bundled digits at 16 px with random shifts (generated digits are rarely
    centred exactly); returns the model and its accuracy on a held-out split. Deterministic for
    the recipe, and the caller's global RNG is left as it was (training resumes exactly)."""
    with torch.random.fork_rng(devices=[]):
        return _train_digits_classifier()


def _train_digits_classifier() -> tuple[DigitsClassifier, float]:
    from sklearn.datasets import load_digits

    from dcgan_dist.data.digits import digits_dataset

    recipe = DIGITS_RECIPE
    images = digits_dataset(DIGITS_SIDE).tensors[0]
    labels = torch.from_numpy(load_digits().target).long()
    rng = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])  # the layers' initial weights
    model = DigitsClassifier()
    order = torch.randperm(len(images), generator=rng)
    held_out, train = order[: recipe["holdout"]], order[recipe["holdout"] :]
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    model.train()
    for _ in range(recipe["epochs"]):
        shuffled = train[torch.randperm(len(train), generator=rng)]
        for start in range(0, len(shuffled), recipe["batch_size"]):
            index = shuffled[start : start + recipe["batch_size"]]
            shift = torch.randint(-recipe["max_shift"], recipe["max_shift"] + 1, (2,), generator=rng).tolist()
            batch = torch.roll(images[index], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch)[1], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images[held_out])[1].argmax(dim=1)
    return model, float((predicted == labels[held_out]).float().mean())


# ---------------------------------------------------------------- Inception-v3


class _InceptionPool3(nn.Module):
    def __init__(self, inception: nn.Module):
        super().__init__()
        inception.fc = nn.Identity()  # the 2048-d average-pooled features, not ImageNet logits
        self.inception = inception

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.inception(images), None


def read_weights(path: str, flag: str = "--inception-weights") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in `path` (torch.load with weights_only=True) and the file's short sha256.
    Raises BackboneError naming the file for a missing, unreadable or non-state-dict file."""
    if not path:
        raise BackboneError(f"{flag}: this backbone needs a weights file (nothing is downloaded)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(f"{flag}: no such file: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean the same to the user
        raise BackboneError(f"{flag}: {file} is not a torch state dict loadable with weights_only=True ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{flag}: {file} does not hold a state dict (a mapping of names to tensors)")
    return state, hashlib.sha256(file.read_bytes()).hexdigest()[:10]


def load_weights_into(model: nn.Module, path: str, network: str) -> str:
    """Load the state dict in `path` into `model`, every key and shape as the model has them;
    returns the file's short sha256. A file of another network raises BackboneError naming it."""
    state, digest = read_weights(path)
    file = Path(path).expanduser()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape
        raise BackboneError(f"--inception-weights: {file} is not {network} state dict: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"--inception-weights: {file} is not {network} state dict: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    return digest


def load_inception(path: str) -> tuple[nn.Module, str]:
    """torchvision's Inception-v3 with the state dict in `path`, and the file's short sha256."""
    from torchvision.models import inception_v3

    # transform_input=False: the images are already in [-1, 1], the range Google's weights expect.
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    digest = load_weights_into(model, path, "an Inception-v3")
    return _InceptionPool3(model), digest


def load_fid_inception(path: str) -> tuple[nn.Module, str]:
    """The FID Inception network (fid_inception.py) with the weights of a pt_inception-2015-12-05
    file, and the file's short sha256."""
    from dcgan_dist.evaluate import fid_inception

    network = fid_inception.build_network()
    digest = load_weights_into(network, path, "a FID Inception (pt_inception-2015-12-05)")
    return fid_inception.FIDInception(network), digest
