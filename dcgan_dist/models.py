"""The DCGAN generator and discriminator (Radford, Metz, Chintala 2016, section 3 and figure 1).

G: z -> linear projection to 4x4xC -> stride-2 fractionally strided convs, each halving the
channels and doubling the side -> tanh. D mirrors it with stride-2 convs and LeakyReLU(0.2),
no pooling, no hidden fully connected layer; the last conv's output is flattened into one logit.
Image size changes only the number of blocks: log2(size) - 2 of them (3 at 32 px, 4 at 64 px).
The presets `imagenet32` and `svhn32` are the authors' own 32 px networks instead, layer for
layer (authors/networks.py), so that their released weights load (authors/weights.py).

Torch only: no Ray, MLflow or boto3 here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from dcgan_dist.authors.networks import IMAGENET32, SVHN32, AuthorsDiscriminator, AuthorsGenerator, BlockDiscriminator, LayerStack
from dcgan_dist.choices import IMAGE_SIZES

IMAGE_CHANNELS = 3  # the paper's G makes 64x64x3; grey data sets are repeated to 3 channels


@dataclass(frozen=True)
class Preset:
    """An architecture as data. `base_filters` is the width of D's first conv (and of G's last
    hidden layer); each block doubles it, so the 4x4 projection has base * 2**(blocks-1)."""

    name: str
    base_filters: int
    kernel_size: int
    latent: str  # distribution of z: "uniform" = U(-1, 1), "normal" = N(0, 1)
    z_dim: int = 100
    image_sizes: tuple[int, ...] = IMAGE_SIZES
    deviations: str = ""
    layers: LayerStack | None = None  # the authors' networks, layer by layer (authors/networks.py)


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "paper",
            base_filters=128,
            kernel_size=5,
            latent="uniform",
            deviations="None in the architecture: the paper and the authors' code (5x5 kernels, "
            "128 base filters, a 4x4x1024 projection at 64 px, z ~ U(-1, 1)). Layers without "
            "BatchNorm get a bias, which the authors' code omits.",
        ),
        Preset(
            "pytorch-examples",
            base_filters=64,
            kernel_size=4,
            latent="normal",
            deviations="As pytorch/examples dcgan: 4x4 kernels, 64 base filters (a 4x4x512 "
            "projection at 64 px), z ~ N(0, 1). About 6x cheaper than 'paper'; the default, "
            "so the bundled digits train on a laptop CPU in minutes.",
        ),
        Preset(
            "imagenet32",
            base_filters=128,
            kernel_size=3,
            latent="uniform",
            z_dim=256,
            image_sizes=(32,),
            layers=IMAGENET32,
            deviations="The authors' ImageNet-32 GAN behind the CIFAR-10 probe (Table 1; "
            "imagenet/load_pretrained.py): D = six 3x3 convs of 128, 128, 256, 256, 512, 512 "
            "filters, strides 1, 2, 1, 2, 1, 2 (28,672 probe features); G = z ~ U(-1, 1)^256, "
            "linear to 4x4x512 with BN per feature, six 3x3 (transposed) convs to 512, 256, 256, "
            "128, 128, 3, strides 2, 1, 2, 1, 2, 1. BN epsilon 1e-8. Layers without BN get a "
            "bias, which the authors' code omits (zero when imported).",
        ),
        Preset(
            "svhn32",
            base_filters=64,
            kernel_size=5,
            latent="normal",
            image_sizes=(32,),
            layers=SVHN32,
            deviations="The authors' SVHN GAN (Table 2; svhn/svhn_semisup_analysis.py): D = "
            "5x5 stride-2 convs of 64, 128, 256 filters; G = z ~ N(0, 1)^100, linear to 4096 "
            "with BN per feature, reshaped to 4x4x256, 5x5 stride-2 transposed convs to 128, "
            "64, 3. BN epsilon 1e-8. Layers without BN get a bias, which the authors' code "
            "omits (zero when imported).",
        ),
    )
}


@dataclass(frozen=True)
class BatchNormPlacement:
    hidden: bool  # every hidden layer (G's projection and inner convs; D's inner convs)
    edge: bool  # G's output layer and D's input layer, which the paper leaves without BN


_PAPER, _EVERY, _NONE = BatchNormPlacement(True, False), BatchNormPlacement(True, True), BatchNormPlacement(False, False)

# --bn choice -> (placement in G, placement in D): the paper's batchnorm-placement ablation.
BN_PLACEMENTS = {
    "paper": (_PAPER, _PAPER),
    "all": (_EVERY, _EVERY),
    "none": (_NONE, _NONE),
    "g-only": (_PAPER, _NONE),
    "d-only": (_NONE, _PAPER),
}


def num_blocks(image_size: int) -> int:
    blocks = int(math.log2(image_size)) - 2
    if blocks < 1 or 4 * 2**blocks != image_size:
        raise ValueError(f"image size must be a power of two >= 8, got {image_size}")
    return blocks


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(padding, output_padding) that make a stride-2 conv halve and a transposed conv double."""
    return (kernel_size - 1) // 2, kernel_size % 2


def _batchnorm_or_nothing(channels: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


class Generator(nn.Module):
    def __init__(self, preset: Preset, image_size: int, bn: BatchNormPlacement):
        super().__init__()
        self.z_dim, self.image_size = preset.z_dim, image_size
        blocks = num_blocks(image_size)
        padding, output_padding = _same_padding(preset.kernel_size)
        self.top_channels = preset.base_filters * 2 ** (blocks - 1)
        # A BatchNorm's shift makes a bias redundant, so a layer gets a bias only without BN.
        self.project = nn.Linear(preset.z_dim, 16 * self.top_channels, bias=not bn.hidden)
        self.project_norm = nn.Sequential(_batchnorm_or_nothing(self.top_channels, bn.hidden), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = self.top_channels
        for _ in range(blocks - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, preset.kernel_size, 2, padding, output_padding, bias=not bn.hidden),
                _batchnorm_or_nothing(channels // 2, bn.hidden),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [
            nn.ConvTranspose2d(channels, IMAGE_CHANNELS, preset.kernel_size, 2, padding, output_padding, bias=not bn.edge),
            _batchnorm_or_nothing(IMAGE_CHANNELS, bn.edge),
            nn.Tanh(),
        ]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.top_channels, 4, 4)
        return self.blocks(self.project_norm(x))


class Discriminator(BlockDiscriminator):
    def __init__(self, preset: Preset, image_size: int, bn: BatchNormPlacement):
        super().__init__()
        self.image_size = image_size
        blocks = num_blocks(image_size)
        padding, _ = _same_padding(preset.kernel_size)
        self.feature_channels = []
        layers: list[nn.Module] = []
        in_channels, channels = IMAGE_CHANNELS, preset.base_filters
        for index in range(blocks):
            norm = bn.edge if index == 0 else bn.hidden
            layers.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, channels, preset.kernel_size, 2, padding, bias=not norm),
                    _batchnorm_or_nothing(channels, norm),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            self.feature_channels.append(channels)
            in_channels, channels = channels, channels * 2
        self.blocks = nn.ModuleList(layers)
        # The paper's "flattened and fed into a single sigmoid output": a linear map to one
        # logit; the sigmoid lives in the loss (BCEWithLogits) for numerical safety.
        self.classify = nn.Linear(16 * in_channels, 1)


def init_weights(module: nn.Module) -> None:
    """The paper: all weights from N(0, 0.02). BatchNorm gains N(1, 0.02) as in the authors' code."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(preset: str, image_size: int, bn: str) -> tuple[nn.Module, nn.Module]:
    """G and D for a preset name, image size and --bn choice, freshly initialised."""
    chosen = PRESETS[preset]
    if image_size not in chosen.image_sizes:
        raise ValueError(f"preset {preset} supports image sizes {chosen.image_sizes}, not {image_size}")
    bn_g, bn_d = BN_PLACEMENTS[bn]
    if chosen.layers is not None:
        generator = AuthorsGenerator(chosen.layers, chosen.z_dim, image_size, bn_g.hidden, bn_g.edge)
        discriminator = AuthorsDiscriminator(chosen.layers, image_size, bn_d.hidden, bn_d.edge)
    else:
        generator, discriminator = Generator(chosen, image_size, bn_g), Discriminator(chosen, image_size, bn_d)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


def sample_latent(batch: int, preset: str, device: torch.device | str = "cpu", rng: torch.Generator | None = None) -> torch.Tensor:
    """z for a preset: U(-1, 1)^z_dim as in the paper, or N(0, 1)^z_dim (pytorch-examples,
    svhn32). `rng`: a torch random generator to draw from (default: torch's global one)."""
    chosen = PRESETS[preset]
    if chosen.latent == "uniform":
        return torch.rand(batch, chosen.z_dim, device=device, generator=rng) * 2 - 1
    return torch.randn(batch, chosen.z_dim, device=device, generator=rng)


@dataclass(frozen=True)
class Architecture:
    """What builds a G/D pair: saved as `architecture.json` with every registered model and in
    every checkpoint, so whoever loads the weights rebuilds the same networks."""

    preset: str
    image_size: int
    bn: str
    z_dim: int

    @classmethod
    def of(cls, preset: str, image_size: int, bn: str) -> Architecture:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}")
        return cls(preset, image_size, bn, PRESETS[preset].z_dim)

    @classmethod
    def from_dict(cls, values: dict) -> Architecture:
        """From a saved dict; ValueError naming what is missing or unknown."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"architecture without {', '.join(missing)}")
        architecture = cls(str(values["preset"]), int(values["image_size"]), str(values["bn"]), int(values["z_dim"]))
        if architecture.preset not in PRESETS or architecture.bn not in BN_PLACEMENTS:
            raise ValueError(f"unknown architecture: preset {architecture.preset!r}, bn {architecture.bn!r}")
        return architecture

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build(self) -> tuple[nn.Module, nn.Module]:
        return build_models(self.preset, self.image_size, self.bn)
