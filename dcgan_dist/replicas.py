"""Whether the ranks' replicas of G and D still agree, checked at every checkpoint
(`ddp/replica_spread`, logged by the loop). Every rank takes part in the one all-gather.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dcgan_dist.checkpoint import unwrap

log = logging.getLogger(__name__)


def replica_spread(models: Sequence[torch.nn.Module], world_size: int, with_buffers: bool, step: int) -> float:
    """How far the ranks' copies of `models` have drifted apart: the largest difference between
    ranks of per-tensor checksums (sum and sum of magnitudes) of the parameters and, `with_buffers`
    (--bn-sync, whose running statistics are the global batch's on every rank), the buffers.
    DDP keeps the replicas identical, so anything but 0 means a rank missed an update, a restore
    or a rollback; rank 0 then warns. Without --bn-sync each rank keeps its own BatchNorm running
    statistics (no buffer broadcast), so they differ by design and are left out. Every rank takes part."""
    if world_size == 1:
        return 0.0
    modules = [unwrap(model) for model in models]
    tensors = [p.detach() for module in modules for p in module.parameters()]
    if with_buffers:
        tensors += [b.detach() for module in modules for b in module.buffers()]
    local = torch.stack([t.double().sum() for t in tensors] + [t.double().abs().sum() for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    spread = (stacked.max(0).values - stacked.min(0).values).max().item()
    if spread and dist.get_rank() == 0:
        log.warning("step %d: the ranks' copies of G and D differ (checksum spread %.3g)", step, spread)
    return spread
