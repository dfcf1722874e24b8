"""--bn-sync: BatchNorm statistics over the global batch instead of each worker's share.

On GPUs this is torch's own `nn.SyncBatchNorm` (NCCL). torch's SyncBatchNorm refuses CPU
tensors, so on CPU workers (gloo) `GlobalBatchNorm2d` does the same computation: each rank's
per-channel sum, sum of squares and count go through one differentiable all-reduce, so the
normalisation and its gradient are those of BatchNorm on the concatenated global batch. The
all-reduce is torch's functional collective, whose backward all-reduces the gradient;
`torch.distributed.nn.functional.all_reduce`, the older autograd-aware one, is deprecated in
torch 2.14 (a FutureWarning at every call) and raises when Dynamo traces it, so under
--compile it broke the graph and ran eagerly; the functional one compiles into the graph.

In eval mode (sample grids, exported models) both use the running statistics and communicate
nothing, so one rank alone may run the model. Their state-dict keys are BatchNorm2d's, so the
registry rebuilds exported models as plain modules from the state dict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with statistics all-reduced across ranks; works over gloo and NCCL."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        # Statistics in fp32 whatever the input's dtype: under bf16 autocast x arrives in bf16,
        # where E[x^2] - E[x]^2 loses most of its digits, and the running statistics are fp32.
        x32 = x.float()
        channels = x.shape[1]
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        local = torch.cat([x32.sum(dim=(0, 2, 3)), (x32 * x32).sum(dim=(0, 2, 3)), count])
        total = funcol.all_reduce(local, "sum", dist.group.WORLD)  # its backward all-reduces the gradient too
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1), factor)  # unbiased, as BN tracks
        shape = (1, channels, 1, 1)
        y = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)  # the next layer gets what plain BatchNorm would hand it under autocast


def to_sync(model: nn.Module, use_gpu: bool) -> nn.Module:
    """Every BatchNorm2d of `model` synchronised across ranks (before DDP wraps it)."""
    if use_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace(model, GlobalBatchNorm2d, lambda m: type(m) is nn.BatchNorm2d)


def _replace(model: nn.Module, cls: type[nn.Module], matches) -> nn.Module:
    for name, child in model.named_children():
        if matches(child):
            replacement = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(model, name, replacement.to(next(child.buffers()).device))
        else:
            _replace(child, cls, matches)
    return model
