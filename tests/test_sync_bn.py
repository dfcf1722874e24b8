"""--bn-sync on CPU: GlobalBatchNorm2d over 2 real gloo processes equals BatchNorm2d on the
concatenated batch (outputs, input gradients, weight gradients, running statistics)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcgan_dist.models import build_models
from dcgan_dist.sync_bn import GlobalBatchNorm2d, to_sync

WORLD = 2


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(2 * 6, 5, 4, 4, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    bn = to_sync(nn.Sequential(nn.BatchNorm2d(5)), use_gpu=False)
    x = _batch(1).chunk(WORLD)[rank].clone().requires_grad_(True)
    upstream = _batch(2).chunk(WORLD)[rank]
    (bn(x) * upstream).sum().backward()
    grads = [bn[0].weight.grad.clone(), bn[0].bias.grad.clone()]
    for g in grads:  # DDP would all-reduce (sum, then mean) the parameter gradients
        dist.all_reduce(g)
    results[rank] = (bn(x).detach(), x.grad, grads, bn[0].running_mean.clone(), bn[0].running_var.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=WORLD, join=True)

    reference = nn.BatchNorm2d(5)
    x = _batch(1).requires_grad_(True)
    (reference(x) * _batch(2)).sum().backward()
    expected = reference(x).detach()  # a second training forward, as each rank ran
    outputs = torch.cat([results[r][0] for r in range(WORLD)])
    assert torch.allclose(outputs, expected, atol=1e-5)
    assert torch.allclose(torch.cat([results[r][1] for r in range(WORLD)]), x.grad, atol=1e-5)
    for r in range(WORLD):
        assert torch.allclose(results[r][2][0], reference.weight.grad, atol=1e-4)
        assert torch.allclose(results[r][2][1], reference.bias.grad, atol=1e-4)
        assert torch.allclose(results[r][3], reference.running_mean, atol=1e-5)
        assert torch.allclose(results[r][4], reference.running_var, atol=1e-5)


def _rank_bf16(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 5, 1)
    bn = to_sync(nn.Sequential(nn.BatchNorm2d(5)), use_gpu=False)
    x = _batch(1).chunk(WORLD)[rank]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as --precision bf16 runs D and G
        y = bn(conv(x))
    y.float().sum().backward()
    results[rank] = (y.dtype, bn[0].running_mean.clone(), bn[0].running_var.clone(), conv.weight.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_under_bf16_autocast_keeps_fp32_statistics():
    """Under bf16 autocast the statistics are computed in fp32 (the running statistics stay fp32
    and match BatchNorm on the whole batch to bf16's input rounding), and the output is bf16,
    as plain BatchNorm hands it on under autocast."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_bf16, args=(port, results), nprocs=WORLD, join=True)

    torch.manual_seed(0)
    conv, reference = nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5)
    with torch.no_grad():
        reference(conv(_batch(1)))
    for r in range(WORLD):
        dtype, running_mean, running_var, conv_grad = results[r]
        assert dtype == torch.bfloat16
        assert running_mean.dtype == running_var.dtype == torch.float32
        torch.testing.assert_close(running_mean, reference.running_mean, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(running_var, reference.running_var, rtol=2e-2, atol=2e-2)
        assert torch.isfinite(conv_grad).all()


def test_synced_model_keeps_state_dict_keys_for_export():
    generator, _ = build_models("pytorch-examples", 32, "paper")
    keys = generator.state_dict().keys()
    synced = to_sync(generator, use_gpu=False)
    assert any(isinstance(m, GlobalBatchNorm2d) for m in synced.modules())
    assert synced.state_dict().keys() == keys
    # the registry exports a synced model by loading its state dict into a plain one
    plain, _ = build_models("pytorch-examples", 32, "paper")
    plain.load_state_dict(synced.state_dict())
    assert not any(isinstance(m, (GlobalBatchNorm2d, nn.SyncBatchNorm)) for m in plain.modules())
    # eval mode on a single process (sample grids) needs no process group
    with torch.no_grad():
        assert synced.eval()(torch.randn(2, 100)).shape == (2, 3, 32, 32)

