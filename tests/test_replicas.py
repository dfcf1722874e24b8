"""The replicas' checksum spread (`ddp/replica_spread`) over 2 real gloo processes: one rank made
to drift in a weight or a BatchNorm buffer by a known amount."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dcgan_dist.models import build_models
from dcgan_dist.replicas import replica_spread

WORLD = 2


class Warnings(logging.Handler):
    """The replica check's warnings in this process, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _drifting_rank(rank: int, port: int, results) -> None:
    """Both ranks build G and D from one seed; rank 1 then drifts in one buffer, then in one weight.
    After each change every rank takes part in replica_spread, as at a checkpoint."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    warnings = Warnings()
    logging.getLogger("dcgan_dist.replicas").addHandler(warnings)
    torch.manual_seed(0)
    generator, discriminator = build_models("pytorch-examples", 32, "paper")
    models = (DistributedDataParallel(generator, broadcast_buffers=False), discriminator)  # as the loop holds them
    spreads = {"same": replica_spread(models, WORLD, with_buffers=True, step=10)}
    batchnorm = next(m for m in discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if rank == 1:
        batchnorm.running_mean[0] += 0.5  # as if rank 1 had missed a --bn-sync statistics update
    spreads["buffer, per-worker statistics"] = replica_spread(models, WORLD, with_buffers=False, step=20)
    spreads["buffer, --bn-sync"] = replica_spread(models, WORLD, with_buffers=True, step=30)
    if rank == 1:
        batchnorm.running_mean[0] -= 0.5
        with torch.no_grad():
            generator.project.weight.view(-1)[7] += 0.25  # as if rank 1 had missed an update
    spreads["weight"] = replica_spread(models, WORLD, with_buffers=False, step=40)
    results[rank] = (spreads, warnings.messages)
    dist.destroy_process_group()


@pytest.mark.slow
def test_replica_spread_measures_drift_in_weights_and_synced_buffers_and_warns():
    """ddp/replica_spread is 0 only while the replicas agree: a weight that differs by 0.25 on one
    rank gives 0.25, a BatchNorm running mean off by 0.5 gives 0.5 when --bn-sync makes running
    statistics global (and counts for nothing when each rank keeps its own), and rank 0 warns,
    naming the step, exactly when the spread is not 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # spawned: a forked one inherits pytest's Ray driver (it hung in ActorHandle.__del__)
    mp.spawn(_drifting_rank, args=(port, results), nprocs=WORLD, join=True)

    spreads, warnings = results[0]
    assert results[1][0] == spreads  # every rank gets the same spread
    assert spreads["same"] == 0.0
    assert spreads["buffer, per-worker statistics"] == 0.0
    assert spreads["buffer, --bn-sync"] == pytest.approx(0.5, rel=1e-6)
    assert spreads["weight"] == pytest.approx(0.25, rel=1e-3)
    assert len(warnings) == 2 and "step 30" in warnings[0] and "step 40" in warnings[1], warnings
    assert "differ" in warnings[0] and "0.5" in warnings[0]
    assert results[1][1] == []  # one warning per run, from rank 0
