"""The authors' own 32 px networks (Newmu/dcgan_code), layer for layer, for the presets
`imagenet32` (the ImageNet-32 GAN behind the paper's Table 1, `imagenet/load_pretrained.py`) and
`svhn32` (the SVHN GAN of Table 2, `svhn/svhn_semisup_analysis.py`).

They differ from models.py's family in three ways the authors' weights need: each conv has its
own stride (imagenet32 alternates 1 and 2), the padding is k // 2 whatever the stride, and G's
projection is batch-normalised per feature (over all 16*C outputs of the linear layer, before
the reshape to 4x4xC), not per channel. Their BatchNorm epsilon is 1e-8.

Torch only, and nothing of models.py (which lists these as presets): no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

AUTHORS_BN_EPSILON = 1e-8  # lib/ops.py batchnorm(e=1e-8)


@dataclass(frozen=True)
class LayerStack:
    """An authors' network pair as data: (filters, stride) of each conv, first to last."""

    kernel_size: int
    discriminator: tuple[tuple[int, int], ...]
    projection: int  # channels of G's 4x4 projection of z
    generator: tuple[tuple[int, int], ...]  # the last one makes the 3 image channels

    @property
    def padding(self) -> int:
        return self.kernel_size // 2


IMAGENET32 = LayerStack(3, ((128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2)),
                        512, ((512, 2), (256, 1), (256, 2), (128, 1), (128, 2), (3, 1)))
SVHN32 = LayerStack(5, ((64, 2), (128, 2), (256, 2)), 256, ((128, 2), (64, 2), (3, 2)))


def _norm(channels: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(channels, eps=AUTHORS_BN_EPSILON) if enabled else nn.Identity()


def _side(stack: tuple[tuple[int, int], ...], size: int, grows: bool) -> int:
    for _, stride in stack:
        size = size * stride if grows else size // stride
    return size


class AuthorsGenerator(nn.Module):
    """z -> linear -> BN over the 16*C features -> ReLU -> 4x4xC -> (transposed) convs -> tanh."""

    def __init__(self, stack: LayerStack, z_dim: int, image_size: int, hidden_bn: bool, edge_bn: bool):
        super().__init__()
        if _side(stack.generator, 4, grows=True) != image_size:
            raise ValueError(f"this layer stack makes {_side(stack.generator, 4, True)} px images, not {image_size}")
        self.z_dim, self.image_size, self.top_channels = z_dim, image_size, stack.projection
        # Bias only without BN, as models.py (the authors' layers have none; imported as zeros).
        self.project = nn.Linear(z_dim, 16 * stack.projection, bias=not hidden_bn)
        # A BatchNorm2d over 16*C channels of 1x1 is BatchNorm1d over the features, with the
        # state-dict keys sync_bn.py and every BatchNorm2d-minded tool already know.
        self.project_norm = nn.Sequential(_norm(16 * stack.projection, hidden_bn), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = stack.projection
        for index, (filters, stride) in enumerate(stack.generator):
            last = index == len(stack.generator) - 1
            norm = edge_bn if last else hidden_bn
            layers += [
                nn.ConvTranspose2d(channels, filters, stack.kernel_size, stride, stack.padding, stride - 1, bias=not norm),
                _norm(filters, norm),
                nn.Tanh() if last else nn.ReLU(inplace=True),
            ]
            channels = filters
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_norm(self.project(z).view(-1, 16 * self.top_channels, 1, 1))
        return self.blocks(x.view(-1, self.top_channels, 4, 4))


class BlockDiscriminator(nn.Module):
    """A D of conv blocks (`self.blocks`) then one linear logit (`self.classify`), ours and the
    authors' alike: `features` gives every block's activations, first to last (the probe's inputs).
    Subclasses set both in __init__ (no class annotations: TorchScript scripts these modules)."""

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classify(x.flatten(1)).squeeze(1)


class AuthorsDiscriminator(BlockDiscriminator):
    """Convs with LeakyReLU(0.2) (BN on all but the first), then a linear map of the last
    4x4xC activations to one logit; `features` gives every conv block's output (the probe's)."""

    def __init__(self, stack: LayerStack, image_size: int, hidden_bn: bool, edge_bn: bool):
        super().__init__()
        if _side(stack.discriminator, image_size, grows=False) != 4:
            raise ValueError(f"this layer stack takes {4 * _side(stack.discriminator, 1, True)} px images, not {image_size}")
        self.image_size = image_size
        self.feature_channels = [filters for filters, _ in stack.discriminator]
        layers: list[nn.Module] = []
        channels = 3
        for index, (filters, stride) in enumerate(stack.discriminator):
            norm = edge_bn if index == 0 else hidden_bn
            layers.append(nn.Sequential(
                nn.Conv2d(channels, filters, stack.kernel_size, stride, stack.padding, bias=not norm),
                _norm(filters, norm),
                nn.LeakyReLU(0.2, inplace=True),
            ))
            channels = filters
        self.blocks = nn.ModuleList(layers)
        self.classify = nn.Linear(16 * channels, 1)

