"""The GAN update as a plain function: D then G, the minimax objective, non-saturating G loss."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcgan_dist.models import BN_PLACEMENTS, PRESETS, Discriminator, Generator, build_models, init_weights, sample_latent
from dcgan_dist.step import gan_step, load_optimizer_state, make_optimizers


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


def test_g_pass_leaves_d_gradients_from_d_loss_alone_and_d_trainable():
    """D is frozen while G's loss backpropagates through it: D's .grad after the step is exactly
    D's own loss gradient (G's pass adds nothing to it), and D is trainable again afterwards."""
    generator, discriminator, opt_g, opt_d, real, z = setup()
    d_before, g_before = copy.deepcopy(discriminator), copy.deepcopy(generator)
    gan_step(generator, discriminator, opt_g, opt_d, real, z)

    fake = g_before(z).detach()
    lr, lf = d_before(real), d_before(fake)
    loss = (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
            + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
    expected = torch.autograd.grad(loss, list(d_before.parameters()))
    for param, grad in zip(discriminator.parameters(), expected):
        assert param.requires_grad
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


def test_g_gradient_is_the_same_with_d_frozen():
    """Freezing D's weights changes nothing for G: its gradient equals the one computed with D
    trainable (the reference update's way)."""
    generator, discriminator, opt_g, opt_d, real, z = setup()
    g_copy, d_copy = copy.deepcopy(generator), copy.deepcopy(discriminator)
    opt_g_copy, opt_d_copy = make_optimizers(g_copy, d_copy, 2e-4, 0.5, 0.999)
    gan_step(generator, discriminator, opt_g, opt_d, real, z)

    # the same update by hand, D not frozen in G's pass
    fake = g_copy(z)
    lr, lf = d_copy(real), d_copy(fake.detach())
    (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
     + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))).backward()
    opt_d_copy.step()
    opt_g_copy.zero_grad()
    logits = d_copy(fake)
    F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    for ours, by_hand in zip(generator.parameters(), g_copy.parameters()):
        torch.testing.assert_close(ours.grad, by_hand.grad, rtol=1e-4, atol=1e-7)


def channels_last_twin(models_and_optimizers):
    """A copy of (G, D, opt_G, opt_D) in channels_last: the same weights and Adam state, the weights
    laid out NHWC and the moments following them through load_optimizer_state."""
    generator, discriminator, opt_g, opt_d = models_and_optimizers
    twin_g, twin_d = copy.deepcopy(generator), copy.deepcopy(discriminator)
    twin_g, twin_d = (m.to(memory_format=torch.channels_last) for m in (twin_g, twin_d))
    twin_opt_g, twin_opt_d = make_optimizers(twin_g, twin_d, 2e-4, 0.5, 0.999)
    if opt_g.state:  # after a first step: the moments as a checkpoint holds them, NCHW
        load_optimizer_state(twin_opt_g, copy.deepcopy(opt_g.state_dict()))
        load_optimizer_state(twin_opt_d, copy.deepcopy(opt_d.state_dict()))
    return twin_g, twin_d, twin_opt_g, twin_opt_d


def test_channels_last_computes_the_same_step():
    """The channels_last default is a memory layout, not a different computation: each step, from
    the same weights and Adam state, gives the same losses and gradient norms. (Each step starts
    from the NCHW run's state: over several steps the last-bit differences of the two layouts'
    kernels grow, through Adam's early sign-like updates, past any fixed tolerance on some CPUs.)"""
    plain = setup(seed=5)
    for _ in range(3):
        twin_g, twin_d, twin_opt_g, twin_opt_d = channels_last_twin(plain[:4])
        b = gan_step(twin_g, twin_d, twin_opt_g, twin_opt_d, plain[4].contiguous(memory_format=torch.channels_last), plain[5])
        a = gan_step(*plain)
        for name in a:
            # Gradient norms sum every gradient of a network: on an AVX2-only EPYC the two layouts'
            # kernels put them 1.1e-4 apart (relative) at the third step, the losses 2e-6.
            rtol = 1e-3 if name.startswith("grad_norm") else 1e-4
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-5)
    assert twin_d.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert twin_opt_d.state[twin_d.blocks[1][0].weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_nchw_adam_state_resumed_channels_last_gives_the_same_update():
    """A checkpoint written by an NCHW run, resumed with channels_last: the weights after the next
    step equal the NCHW run's. (With the moments left NCHW, fused Adam on the CPU mixes up elements:
    weights off by about lr, every step.)"""
    plain = setup(seed=6)
    gan_step(*plain)
    twin = channels_last_twin(plain[:4])
    gan_step(*twin, plain[4].contiguous(memory_format=torch.channels_last), plain[5])
    gan_step(*plain)
    for ours, reference in zip(twin[1].parameters(), plain[1].parameters()):
        # Mixed-up moments put most elements of every conv weight far off: median 3.5e-5, 60 % past
        # 2e-5, up to 1.5 lr. The layouts' kernels differ in the last bits, which Adam's second
        # step turns into up to 2 lr on the few elements whose moments are tiny (4 % of one layer
        # past 2e-6 in a CI run on an AVX2-only EPYC): so no bound on the largest difference.
        off = (ours - reference).abs()
        assert off.median() < 2e-6 and (off > 2e-5).float().mean() < 0.1, (off.median(), (off > 2e-5).float().mean())


def narrow_models(base_filters: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The pytorch-examples G and D at 32 px with another base width, initialised as any preset."""
    preset = dataclasses.replace(PRESETS["pytorch-examples"], base_filters=base_filters)
    bn_g, bn_d = BN_PLACEMENTS["paper"]
    generator, discriminator = Generator(preset, 32, bn_g), Discriminator(preset, 32, bn_d)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


def train_digits(precision: str, steps: int, batch: int, base_filters: int, seed: int = 0):
    """`steps` updates on the bundled digits from one seed: per-step stats, and the mean image of
    G's samples before and after (train-mode BatchNorm, as in the step)."""
    from dcgan_dist.data.digits import digits_dataset

    images = digits_dataset(32).tensors[0]
    torch.manual_seed(seed)
    generator, discriminator = (m.to(memory_format=torch.channels_last) for m in narrow_models(base_filters))
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    draw = torch.Generator().manual_seed(seed)
    z_probe = sample_latent(256, "pytorch-examples", rng=torch.Generator().manual_seed(99))
    with torch.no_grad():
        mean_before = generator(z_probe).mean(0)
    history = []
    for _ in range(steps):
        real = images[torch.randint(0, len(images), (batch,), generator=draw)]
        z = sample_latent(batch, "pytorch-examples", rng=draw)
        stats = gan_step(generator, discriminator, opt_g, opt_d, real.contiguous(memory_format=torch.channels_last), z, precision)
        history.append(torch.stack([stats[name] for name in ("loss_d", "loss_g", "d_real", "d_fake")]))
    with torch.no_grad():
        mean_after = generator(z_probe).mean(0)
    data_mean = images.mean(0)
    return torch.stack(history), (mean_before - data_mean).abs().mean(), (mean_after - data_mean).abs().mean()


@pytest.mark.slow(trains="80 + 80 GAN updates; bf16 is emulated, about 1 s a step, on a CPU without avx512_bf16/amx_bf16")
def test_bf16_autocast_matches_fp32_and_both_learn():
    """The --precision bf16 parity check, on the pytorch-examples networks at half their width
    (32 base filters) and a batch of 16: bf16 is emulated on AVX2-only CPUs, where the full width
    cost CI four minutes. From the same seed and data, 80 steps each: every 10-step mean of
    loss_d, loss_g, D(x) and D(G(z)) under bf16 autocast stays within 0.05 + 5 % of the fp32
    value, and both runs learn: D's loss falls below half its first value and G's mean image
    moves towards the data's (to 0.79 of its first distance, measured on an AMD EPYC with
    avx512_bf16, in both precisions; a G that does not learn stays at 1)."""
    fp32, fp32_before, fp32_after = train_digits("fp32", steps=80, batch=16, base_filters=32)
    bf16, bf16_before, bf16_after = train_digits("bf16", steps=80, batch=16, base_filters=32)
    fp32_windows, bf16_windows = fp32.view(-1, 10, 4).mean(1), bf16.view(-1, 10, 4).mean(1)
    tolerance = 0.05 + 0.05 * fp32_windows.abs()
    assert ((fp32_windows - bf16_windows).abs() <= tolerance).all(), (fp32_windows, bf16_windows)
    for history, before, after in ((fp32, fp32_before, fp32_after), (bf16, bf16_before, bf16_after)):
        assert history[-10:, 0].mean() < 0.5 * history[0, 0], history[:, 0]
        assert after < 0.9 * before, (before, after)


def test_d_is_trainable_again_when_g_pass_raises():
    generator, discriminator, opt_g, opt_d, real, z = setup(seed=2)

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("broken on purpose")

    broken = Broken()
    broken.weight = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(RuntimeError, match="on purpose"):
        gan_step(generator, discriminator, opt_g, opt_d, real, z, discriminator_local=broken)
    assert broken.weight.requires_grad and all(p.requires_grad for p in discriminator.parameters())


@pytest.mark.parametrize("preset", ["svhn32", "imagenet32"])
def test_the_authors_networks_train_like_any_preset(preset):
    """The authors' layer stacks (per-feature BN on G's projection, epsilon 1e-8) go through the
    same step, and both networks move."""
    generator, discriminator, opt_g, opt_d, real, z = setup(preset=preset, batch=4)
    g_before, d_before = copy.deepcopy(generator), copy.deepcopy(discriminator)
    gan_step(generator, discriminator, opt_g, opt_d, real, z)
    assert not torch.equal(generator.project.weight, g_before.project.weight)
    assert not torch.equal(discriminator.classify.weight, d_before.classify.weight)


def test_uneven_rank_batches_weighted_average_to_the_global_batch_gradient():
    """A global batch of 7 over 3 ranks is 3 + 2 + 2 images (split.rank_batches). Each rank
    scales its losses by its loss weight (rank batch x world size / global batch), DDP averages
    the three gradients with equal weights: the result is the one-rank gradient of the whole
    batch. Without BatchNorm every image's loss is its own, so the two agree to rounding; D's
    learning rate is 0 so G's pass sees the same D on every rank, as it does under DDP."""
    from dcgan_dist.data.split import rank_batches

    torch.manual_seed(3)
    generator, discriminator = build_models("pytorch-examples", 32, "none")
    real, z = torch.rand(7, 3, 32, 32) * 2 - 1, sample_latent(7, "pytorch-examples")

    def gradients(images, latents, loss_weight):
        g, d = copy.deepcopy(generator), copy.deepcopy(discriminator)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=0.0)
        gan_step(g, d, opt_g, opt_d, images, latents, loss_weight=loss_weight)
        return [p.grad.clone() for p in (*g.parameters(), *d.parameters())]

    shares = rank_batches(7, 3)
    assert shares == [3, 2, 2]
    per_rank = [gradients(images, latents, share * 3 / 7)
                for images, latents, share in zip(real.split(shares), z.split(shares), shares)]
    averaged = [sum(grads) / 3 for grads in zip(*per_rank)]  # what DDP's all-reduce gives every rank
    for ours, whole in zip(averaged, gradients(real, z, 1.0)):
        torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-7)
