"""Generator and Discriminator against the numbers the paper's architecture implies."""

import math

import pytest
import torch
from torch import nn

from dcgan_dist.models import BN_PLACEMENTS, PRESETS, build_models, num_blocks, sample_latent


def expected_counts(preset: str, image_size: int, bn: str) -> tuple[int, int]:
    """Parameters of G and D, counted from the architecture as the paper states it: a 4x4xC
    projection of z, stride-2 k x k (transposed) convs halving/doubling channels, BN (gain and
    shift) where the placement puts it, and a bias only on layers without BN."""
    p = PRESETS[preset]
    g_bn, d_bn = BN_PLACEMENTS[bn]
    k2 = p.kernel_size ** 2
    blocks = int(math.log2(image_size)) - 2
    widths = [p.base_filters * 2**i for i in range(blocks)]  # D's conv outputs, G's reversed
    top = widths[-1]

    def layer(fan_in_times_out: int, out_channels: int, with_bn: bool) -> int:
        return fan_in_times_out + (2 * out_channels if with_bn else out_channels)

    # projection: BN over its C channels, or else a bias on each of its 16*C outputs
    g = p.z_dim * 16 * top + (2 * top if g_bn.hidden else 16 * top)
    for c_in, c_out in zip(widths[::-1], widths[::-1][1:]):
        g += layer(c_in * c_out * k2, c_out, g_bn.hidden)
    g += layer(widths[0] * 3 * k2, 3, g_bn.edge)

    d = layer(3 * widths[0] * k2, widths[0], d_bn.edge)
    for c_in, c_out in zip(widths, widths[1:]):
        d += layer(c_in * c_out * k2, c_out, d_bn.hidden)
    d += 16 * top + 1  # flatten -> one logit
    return g, d


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [(preset, size, bn) for preset in PRESETS for size in PRESETS[preset].image_sizes for bn in BN_PLACEMENTS]


@pytest.mark.parametrize("preset, image_size, bn", CASES)
def test_shapes_and_parameter_counts(preset, image_size, bn):
    generator, discriminator = build_models(preset, image_size, bn)
    z = sample_latent(4, preset)
    assert z.shape == (4, PRESETS[preset].z_dim)
    images = generator(z)
    assert images.shape == (4, 3, image_size, image_size)
    assert images.min() >= -1 and images.max() <= 1  # tanh
    assert discriminator(images).shape == (4,)
    if PRESETS[preset].layers is None:  # the authors' own networks are counted by hand below
        assert (count(generator), count(discriminator)) == expected_counts(preset, image_size, bn)


def layers(model: nn.Module, kind: type) -> list[tuple]:
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in model.modules() if isinstance(m, kind)]


def test_imagenet32_is_the_authors_imagenet_gan():
    """imagenet/load_pretrained.py of Newmu/dcgan_code: 3x3 kernels, padding 1, z ~ U(-1, 1)^256."""
    generator, discriminator = build_models("imagenet32", 32, "paper")
    assert layers(discriminator, nn.Conv2d) == [(3, 128, 3, 1, 1), (128, 128, 3, 2, 1), (128, 256, 3, 1, 1),
                                                (256, 256, 3, 2, 1), (256, 512, 3, 1, 1), (512, 512, 3, 2, 1)]
    assert [type(block[1]) for block in discriminator.blocks] == [nn.Identity] + [nn.BatchNorm2d] * 5  # BN on all but the first
    assert [(m.in_features, m.out_features) for m in discriminator.modules() if isinstance(m, nn.Linear)] == [(4 * 4 * 512, 1)]
    assert generator.project.in_features == 256 and generator.project.out_features == 4 * 4 * 512
    assert layers(generator, nn.ConvTranspose2d) == [(512, 512, 3, 2, 1), (512, 256, 3, 1, 1), (256, 256, 3, 2, 1),
                                                     (256, 128, 3, 1, 1), (128, 128, 3, 2, 1), (128, 3, 3, 1, 1)]
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in norms] == [8192, 512, 256, 256, 128, 128]  # the projection's per feature
    assert all(m.eps == 1e-8 for m in norms) and isinstance(generator.blocks[-1], nn.Tanh)
    z = sample_latent(10_000, "imagenet32")
    assert z.shape == (10_000, 256) and z.min() >= -1 and z.max() <= 1


def test_svhn32_is_the_authors_svhn_gan():
    """The arrays of models/svhn_unsup_all_conv_dcgan_100z_gaussian_lr_0.0005_64mb/, by hand."""
    generator, discriminator = build_models("svhn32", 32, "paper")
    assert layers(discriminator, nn.Conv2d) == [(3, 64, 5, 2, 2), (64, 128, 5, 2, 2), (128, 256, 5, 2, 2)]
    assert layers(generator, nn.ConvTranspose2d) == [(256, 128, 5, 2, 2), (128, 64, 5, 2, 2), (64, 3, 5, 2, 2)]
    assert [m.num_features for m in generator.modules() if isinstance(m, nn.BatchNorm2d)] == [4096, 128, 64]
    # G: 100x4096 + BN(4096) + 25 x (256x128 + 128x64 + 64x3) + BN(128, 64) + the output's bias (zero when imported)
    assert count(generator) == 409_600 + 8_192 + 25 * (32_768 + 8_192 + 192) + 256 + 128 + 3
    # D: 25 x (3x64 + 64x128 + 128x256) + the first conv's bias + BN(128, 256) + 4096 -> 1
    assert count(discriminator) == 25 * (192 + 8_192 + 32_768) + 64 + 256 + 512 + 4_097
    z = sample_latent(10_000, "svhn32")
    assert z.shape == (10_000, 100) and abs(z.std().item() - 1) < 0.02  # N(0, 1)


def test_paper_64px_matches_the_paper_by_hand():
    """Figure 1: z(100) -> 4x4x1024 -> 8x8x512 -> 16x16x256 -> 32x32x128 -> 64x64x3, 5x5 kernels."""
    generator, discriminator = build_models("paper", 64, "paper")
    assert generator.project.out_features == 4 * 4 * 1024
    convs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (1024, 512, (5, 5), (2, 2)), (512, 256, (5, 5), (2, 2)), (256, 128, (5, 5), (2, 2)), (128, 3, (5, 5), (2, 2))
    ]
    # projection 100*16384 + BN(1024); convs 25*(1024*512 + 512*256 + 256*128 + 128*3) + BN shifts/gains + output bias
    by_hand_g = 1_638_400 + 2_048 + 13_107_200 + 1_024 + 3_276_800 + 512 + 819_200 + 256 + 9_600 + 3
    assert count(generator) == by_hand_g == 18_855_043
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 128), (128, 256), (256, 512), (512, 1024)]
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in discriminator.modules())
    # the only linear layer maps the flattened 4x4x1024 to one logit: no hidden FC layer
    linears = [m for m in discriminator.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16384, 1)]
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in discriminator.modules())


@pytest.mark.parametrize("bn, g_norms, d_norms", [
    ("paper", 4, 3), ("all", 5, 4), ("none", 0, 0), ("g-only", 4, 0), ("d-only", 0, 3),
])
def test_batchnorm_placement(bn, g_norms, d_norms):
    generator, discriminator = build_models("pytorch-examples", 64, bn)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in generator.modules()) == g_norms
    assert sum(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules()) == d_norms
    if bn == "paper":  # none on D's input layer, none on G's output layer
        assert isinstance(discriminator.blocks[0][1], nn.Identity)
        assert isinstance(generator.blocks[-2], nn.Identity)


def test_imagenet32_probe_features_are_28672_dims():
    _, discriminator = build_models("imagenet32", 32, "paper")
    features = discriminator.features(torch.zeros(2, 3, 32, 32))
    pooled = [nn.functional.adaptive_max_pool2d(f, 4).flatten(1) for f in features]
    assert sum(p.shape[1] for p in pooled) == 28_672


def test_weights_start_from_n_0_002():
    generator, discriminator = build_models("paper", 64, "paper")
    weights = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3


def test_latent_distributions():
    uniform = sample_latent(10_000, "paper")
    assert uniform.shape == (10_000, 100) and uniform.min() >= -1 and uniform.max() <= 1
    assert abs(uniform.std().item() - 1 / math.sqrt(3)) < 0.01  # U(-1, 1)
    normal = sample_latent(10_000, "pytorch-examples")
    assert abs(normal.std().item() - 1) < 0.01 and normal.abs().max() > 1


def test_block_count_follows_image_size():
    assert [num_blocks(s) for s in (32, 64, 128)] == [3, 4, 5]
    with pytest.raises(ValueError):
        build_models("imagenet32", 64, "paper")
