"""--bn-sync on CPU: GlobalBatchNorm2d over 2 real gloo processes equals BatchNorm2d on the
concatenated batch (outputs, input gradients, weight gradients, running statistics), with no
deprecated collective, compiles into one graph, and keeps its statistics in fp32 under bf16."""

from __future__ import annotations

import socket
import warnings

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
    with warnings.catch_warnings():  # torch.distributed.nn.functional's all_reduce warns as deprecated in torch 2.14
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        (bn(x) * upstream).sum().backward()
    grads = [bn[0].weight.grad.clone(), bn[0].bias.grad.clone()]
    for g in grads:  # DDP would all-reduce (sum, then mean) the parameter gradients
        dist.all_reduce(g)
    results[rank] = (bn(x).detach(), x.grad, grads, bn[0].running_mean.clone(), bn[0].running_var.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch():
    """Outputs and gradients through the differentiable all-reduce, which warns of nothing (a
    deprecation warning in a rank is an error there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # spawned: a forked one inherits pytest's Ray driver (it hung in ActorHandle.__del__)
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


def _rank_compiled(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):  # the same module eager, then under --compile (same seed, same batch)
        torch.manual_seed(0)
        model = to_sync(nn.Sequential(nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5)), use_gpu=False)
        forward = torch.compile(model) if compiled else model
        y = forward(_batch(1).chunk(WORLD)[rank])
        (y * _batch(2).chunk(WORLD)[rank]).sum().backward()
        runs.append((y.detach(), model[0].weight.grad.clone(), model[1].running_var.clone()))
    results[rank] = (runs, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_compiles_into_one_graph():
    """Under --compile the all-reduce is part of the compiled graph: the module compiles to one
    graph with no graph break, and computes what it does eagerly. (torch.distributed.nn's
    all-reduce raises when traced: Dynamo broke the graph there, twice, and ran it eagerly.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # spawned: a forked one inherits pytest's Ray driver (it hung in ActorHandle.__del__)
    mp.spawn(_rank_compiled, args=(port, results), nprocs=WORLD, join=True)

    for r in range(WORLD):
        (eager, compiled), graphs, graph_breaks = results[r]
        assert (graphs, graph_breaks) == (1, 0)
        for ours, reference in zip(compiled, eager):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


MEANS = (100.0, -100.0, 40.0, 5.0)  # per channel, with a standard deviation of 1


def _large_mean_batch() -> torch.Tensor:
    """bf16 activations far from 0 and 2 x 8192 per channel: in bf16 (8 bits of mantissa) their
    sum of squares keeps about 3 significant digits, fewer than E[x^2] - E[x]^2 cancels."""
    noise = torch.randn(2 * 32, len(MEANS), 16, 16, generator=torch.Generator().manual_seed(3))
    return (noise + torch.tensor(MEANS).view(1, -1, 1, 1)).bfloat16()


def _rank_bf16(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 5, 1)
    bn = to_sync(nn.Sequential(nn.BatchNorm2d(5)), use_gpu=False)
    x = _batch(1).chunk(WORLD)[rank]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as --precision bf16 runs D and G
        y = bn(conv(x))
    y.float().sum().backward()
    # momentum None: a cumulative average, so after one batch the running statistics are the batch's
    large = GlobalBatchNorm2d(len(MEANS), momentum=None)
    normalised = large(_large_mean_batch().chunk(WORLD)[rank]).detach()
    results[rank] = (y.dtype, bn[0].running_mean.clone(), bn[0].running_var.clone(), conv.weight.grad.clone(),
                     large.running_mean.clone(), large.running_var.clone(), normalised)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_under_bf16_keeps_fp32_statistics():
    """Under bf16 autocast the statistics are computed in fp32 (the running statistics stay fp32
    and match BatchNorm on the whole batch to bf16's input rounding), and the output is bf16,
    as plain BatchNorm hands it on under autocast. On bf16 inputs with means of up to 100 times
    their spread, the batch's mean is fp64's on the same values to 1e-3 and its variance to 0.5 %
    (summed in bf16: 0.015 and 17 times the variance), and so the normalised output is to bf16's rounding."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # spawned: a forked one inherits pytest's Ray driver (it hung in ActorHandle.__del__)
    mp.spawn(_rank_bf16, args=(port, results), nprocs=WORLD, join=True)

    torch.manual_seed(0)
    conv, reference = nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5)
    with torch.no_grad():
        reference(conv(_batch(1)))
    exact = _large_mean_batch().double()
    mean, var = exact.mean(dim=(0, 2, 3)), exact.var(dim=(0, 2, 3), unbiased=False)
    count = exact.numel() // len(MEANS)
    shape = (1, len(MEANS), 1, 1)
    normalised = (exact - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5)
    for r in range(WORLD):
        dtype, running_mean, running_var, conv_grad, large_mean, large_var, large_out = results[r]
        assert dtype == torch.bfloat16
        assert running_mean.dtype == running_var.dtype == torch.float32
        torch.testing.assert_close(running_mean, reference.running_mean, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(running_var, reference.running_var, rtol=2e-2, atol=2e-2)
        assert torch.isfinite(conv_grad).all()
        torch.testing.assert_close(large_mean.double(), mean, rtol=0, atol=1e-3)
        torch.testing.assert_close(large_var.double(), var * count / (count - 1), rtol=5e-3, atol=0)  # unbiased, as BN tracks
        assert large_out.dtype == torch.bfloat16
        torch.testing.assert_close(large_out.double(), normalised.chunk(WORLD)[r], rtol=1e-2, atol=1e-2)


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

