"""The GAN update as a plain function: D then G, the minimax objective, non-saturating G loss."""

import copy

import torch
import torch.nn.functional as F

from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.step import gan_step, make_optimizers


def setup(seed=0, preset="pytorch-examples", image_size=32, batch=16):
    torch.manual_seed(seed)
    generator, discriminator = build_models(preset, image_size, "paper")
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    real = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    z = sample_latent(batch, preset)
    return generator, discriminator, opt_g, opt_d, real, z


def d_loss(discriminator, real, fake):
    with torch.no_grad():
        lr, lf = discriminator(real), discriminator(fake)
    return (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
            + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))).item()


def test_step_lowers_d_loss_on_a_fixed_batch():
    """D's half of the step descends D's loss: same real images, same fakes, before vs after."""
    generator, discriminator, opt_g, opt_d, real, z = setup()
    for _ in range(3):
        with torch.no_grad():
            fake = generator(z)
        before = d_loss(discriminator, real, fake)
        gan_step(generator, discriminator, opt_g, opt_d, real, z)
        after = d_loss(discriminator, real, fake)
        assert after < before, (before, after)


def test_step_returns_detached_device_scalars():
    generator, discriminator, opt_g, opt_d, real, z = setup()
    stats = gan_step(generator, discriminator, opt_g, opt_d, real, z)
    assert set(stats) == {"loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"}
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert 0 < stats["d_real"].item() < 1 and 0 < stats["d_fake"].item() < 1
    assert stats["grad_norm_d"].item() > 0 and stats["grad_norm_g"].item() > 0


def test_losses_are_the_minimax_d_loss_and_the_non_saturating_g_loss():
    generator, discriminator, opt_g, opt_d, real, z = setup()
    g_before, d_before = copy.deepcopy(generator), copy.deepcopy(discriminator)
    stats = gan_step(generator, discriminator, opt_g, opt_d, real, z)

    # D's loss is computed before D's update: -log D(x) - log(1 - D(G(z)))
    with torch.no_grad():
        expected_d = d_loss(d_before, real, g_before(z))
    assert torch.isclose(stats["loss_d"], torch.tensor(expected_d), rtol=1e-4)

    # G's loss uses the *updated* D on the pre-update G's samples: -log D(G(z)), not log(1 - D(G(z)))
    with torch.no_grad():
        d_after = copy.deepcopy(discriminator)
        d_after.load_state_dict(discriminator.state_dict())
        logits = d_after(g_before(z))
    expected_g = -F.logsigmoid(logits).mean()
    assert torch.isclose(stats["loss_g"], expected_g, rtol=1e-4)

    # both networks moved
    assert not torch.equal(generator.project.weight, g_before.project.weight)
    assert not torch.equal(discriminator.classify.weight, d_before.classify.weight)


def test_step_is_deterministic_for_a_seed():
    assert gan_step(*setup(seed=3))["loss_g"].item() == gan_step(*setup(seed=3))["loss_g"].item()
