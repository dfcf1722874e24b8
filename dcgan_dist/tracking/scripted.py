"""G and D as the TorchScript modules the registry hands to `mlflow.pytorch.load_model`: real
modules (`.eval()`, `.train()`, `.to(device)`, any batch), loaded by torch alone, with no pickled
Python (TorchScript's own reader; the code they run is their TorchScript forward).

Torch only: the wrappers hold the networks of `models.py` unchanged, so their weights are G's and
D's under `generator.` / `discriminator.`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dcgan_dist.models import IMAGE_CHANNELS


class LoadableGenerator(nn.Module):
    """G taking z as (N, z_dim) or, as pytorch/examples feeds it, (N, z_dim, 1, 1)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator
        self.z_dim = generator.z_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4 and z.shape[2] == 1 and z.shape[3] == 1:
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be shaped (N, {self.z_dim}) or (N, {self.z_dim}, 1, 1), got {list(z.shape)}")
        return self.generator(z)


class LoadableDiscriminator(nn.Module):
    """D: images (N, 3, S, S) in [-1, 1] -> one logit each, (N,); `features(x)`: each conv block's activations."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator
        self.image_size, self.channels = discriminator.image_size, IMAGE_CHANNELS

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.discriminator(images)

    @torch.jit.export
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check(images)
        return self.discriminator.features(images)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or list(images.shape[1:]) != [self.channels, self.image_size, self.image_size]:
            raise ValueError(f"images must be shaped (N, {self.channels}, {self.image_size}, {self.image_size}), got {list(images.shape)}")


def script(network: nn.Module) -> torch.jit.ScriptModule:
    """G or D of any preset (in eval mode, on the CPU) as its loadable TorchScript module. A
    generator is what has a z_dim (the authors' networks are classes of their own)."""
    wrapper = LoadableGenerator(network) if hasattr(network, "z_dim") else LoadableDiscriminator(network)
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is still the one format whose loaded module
        # supports .eval()/.train() without pickled Python (docs/tracking.md says why).
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(wrapper.cpu().eval())
