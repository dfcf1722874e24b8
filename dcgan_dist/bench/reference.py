"""The speed baseline: the pytorch/examples DCGAN (dcgan/main.py), written from its published
description, not imported or copied: 64 base filters, 4x4 kernels, G starting with a transposed
conv from a 1x1 z, D ending in a 4x4 conv and a sigmoid, BCELoss, Adam 2e-4 / 0.5, N(0, 0.02)
initialisation; the update as the script ships it: D's real and fake losses backpropagated
separately, then G through the updated D, and `.item()` on the printed numbers every step.

Only `python -m dcgan_dist.bench` uses it. Torch only.
"""

from __future__ import annotations

import torch
from torch import nn

Z_DIM, BASE_FILTERS = 100, 64


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def reference_generator(image_size: int = 64) -> nn.Sequential:
    """1x1 z -> 4x4 by a transposed conv, then stride-2 transposed convs up to image_size."""
    blocks = image_size.bit_length() - 3  # 64 px -> 4 stride-2 layers
    channels = BASE_FILTERS * 2 ** (blocks - 1)
    layers: list[nn.Module] = [nn.ConvTranspose2d(Z_DIM, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
    for _ in range(blocks - 1):
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
        channels //= 2
    layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]
    model = nn.Sequential(*layers)
    model.apply(_init)
    return model


def reference_discriminator(image_size: int = 64) -> nn.Sequential:
    """Stride-2 convs with LeakyReLU(0.2) (BN on all but the first), a 4x4 conv to one value, sigmoid."""
    blocks = image_size.bit_length() - 3
    layers: list[nn.Module] = [nn.Conv2d(3, BASE_FILTERS, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    channels = BASE_FILTERS
    for _ in range(blocks - 1):
        layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2), nn.LeakyReLU(0.2, True)]
        channels *= 2
    layers += [nn.Conv2d(channels, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0)]
    model = nn.Sequential(*layers)
    model.apply(_init)
    return model


def reference_step(generator, discriminator, opt_g, opt_d, real: torch.Tensor) -> tuple[float, ...]:
    """One iteration of the shipped training loop (minus its image saving)."""
    criterion = nn.BCELoss()
    batch = real.size(0)
    discriminator.zero_grad()
    label = torch.full((batch,), 1.0, device=real.device)
    output = discriminator(real)
    loss_d_real = criterion(output, label)
    loss_d_real.backward()
    d_x = output.mean().item()

    noise = torch.randn(batch, Z_DIM, 1, 1, device=real.device)
    fake = generator(noise)
    label.fill_(0.0)
    output = discriminator(fake.detach())
    loss_d_fake = criterion(output, label)
    loss_d_fake.backward()
    d_g_z1 = output.mean().item()
    loss_d = loss_d_real + loss_d_fake
    opt_d.step()

    generator.zero_grad()
    label.fill_(1.0)
    output = discriminator(fake)
    loss_g = criterion(output, label)
    loss_g.backward()
    d_g_z2 = output.mean().item()
    opt_g.step()
    return loss_d.item(), loss_g.item(), d_x, d_g_z1, d_g_z2
