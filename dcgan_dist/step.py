"""One GAN update: the discriminator, then the generator (Goodfellow et al. 2014, Algorithm 1,
with the non-saturating generator loss every DCGAN uses).

Losses are computed from logits with BCEWithLogits, which stays finite where a sigmoid followed
by BCELoss saturates (and is safe under bf16 autocast). Nothing here calls .item(): the returned
tensors stay on the device, so the hot loop never waits for the host.

`precision="bf16"` runs the forward passes under bf16 autocast (weights, gradients and Adam stay
fp32; bf16 has fp32's exponent range, so no loss scaling is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    precision: str = "fp32",
    discriminator_local: nn.Module | None = None,
    loss_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Update D on (real, G(z)), then G on D(G(z)); returns detached scalar tensors.

    `discriminator_local`: D's replica-local module for G's pass (default: the module inside
    DDP, or D itself); the training loop passes its own compiled copy under --compile.
    `loss_weight`: rank batch x world size / global batch. DDP averages the ranks' gradients with
    equal weights; scaled by their share of an unevenly split global batch, the average is the
    gradient of the loss over the global batch. The returned losses are not scaled."""
    autocast = torch.autocast(real.device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    with autocast:
        fake = generator(z)

        # D: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D as separate batches,
        # as in the paper's code, so each BatchNorm normalises one kind of image at a time.
        logits_real = discriminator(real)
        logits_fake = discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    opt_d.zero_grad(set_to_none=True)
    (loss_d * loss_weight if loss_weight != 1.0 else loss_d).backward()
    grad_norm_d = grad_norm(discriminator)
    opt_d.step()

    # G: maximise log D(G(z)) (non-saturating) rather than minimise log(1 - D(G(z))).
    # G needs only D's gradient with respect to its input: D's weight gradients would be thrown
    # away (zeroed before D's next update), so D is frozen for this pass, which saves their
    # computation (about a tenth of the step), and, under DDP, D's replica-local module is used
    # so nothing is all-reduced for them.
    d_local = getattr(discriminator, "module", discriminator) if discriminator_local is None else discriminator_local
    d_local.requires_grad_(False)
    try:
        with autocast:
            logits_gen = d_local(fake)
            loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
        opt_g.zero_grad(set_to_none=True)
        (loss_g * loss_weight if loss_weight != 1.0 else loss_g).backward()
    finally:  # an exception in G's pass must not leave D frozen for whoever catches it
        d_local.requires_grad_(True)
    grad_norm_g = grad_norm(generator)
    opt_g.step()

    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": torch.sigmoid(logits_real.detach()).mean(),
        "d_fake": torch.sigmoid(logits_fake.detach()).mean(),
        "grad_norm_d": grad_norm_d,  # for the collapse detectors: exploding updates
        "grad_norm_g": grad_norm_g,
    }


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of all of a model's gradients together, as a device tensor (no host sync)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).detach()


def make_optimizers(generator: nn.Module, discriminator: nn.Module, lr: float, beta1: float, beta2: float):
    """Adam for each network, as in the paper (lr 2e-4, beta1 0.5). The fused implementation
    updates all of a network's tensors in one kernel (CPU and CUDA) instead of several per tensor."""
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(beta1, beta2), fused=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(beta1, beta2), fused=True)
    return opt_g, opt_d


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, then each moment tensor laid out like its parameter.

    A checkpoint keeps the layout its run had: an NCHW run's Adam moments are NCHW. Resumed with
    --channels-last (or the other way round), fused Adam would get a channels_last weight and an
    NCHW moment: on CUDA it refuses ("must have same dtype, device, and layout"), on the CPU
    (torch 2.14) it pairs the wrong elements and silently corrupts the update."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for name, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def compile_models(generator: nn.Module, discriminator: nn.Module, mode: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """--compile: (G, D, D's local module for G's pass), each through torch.compile unless off.

    G and D are compiled after DDP has wrapped them, the order torch documents: Dynamo's
    DDPOptimizer then splits their graphs at DDP's gradient buckets, so the all-reduces still
    overlap the backward pass. G's pass runs D's replica-local module (no all-reduce for D's
    unused weight gradients; see gan_step), compiled on its own: its graph is the frozen-D
    one, so toggling requires_grad never invalidates the other's. `reduce-overhead` adds CUDA
    graphs on GPUs; the loop marks each step's start (torch.compiler.cudagraph_mark_step_begin)
    so the graphs' output buffers are reused only once a step's outputs are dead."""
    local = getattr(discriminator, "module", discriminator)
    if mode == "off":
        return generator, discriminator, local
    return tuple(torch.compile(model, mode=mode) for model in (generator, discriminator, local))


def compile_stats() -> dict[str, int]:
    """How much Dynamo compiled in this process: graphs and recompilations (a recompile per step
    would mean a guard that fails every step)."""
    from torch._dynamo.utils import counters

    return {"compile.graphs": int(counters["stats"]["unique_graphs"]),
            "compile.recompiles": int(sum(counters["recompiles"].values()))}
