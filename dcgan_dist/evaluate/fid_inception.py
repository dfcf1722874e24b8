"""The FID Inception network: the one behind published FID and Inception Score numbers.

FID (Heusel et al.'s TTUR code) and the Inception Score (Salimans et al.) were defined on
TensorFlow's `inception-2015-12-05` graph. pytorch-fid ported its weights to PyTorch
(`pt_inception-2015-12-05-6726825d.pth`, the file torch-fidelity and StudioGAN use too) and showed
which parts of torchvision's Inception-v3 must change to reproduce that graph:

- the average-pool branch of the 35x35 (Mixed_5b-d), 17x17 (Mixed_6b-e) and first 8x8 (Mixed_7b)
  blocks averages only over the pixels inside the image (TensorFlow's padding, not zeros);
- the last block (Mixed_7c) pools its pool branch with a max, not an average (so the graph has it);
- the classifier has 1008 outputs, not 1000, and there is no auxiliary head.

This module rebuilds that network on torchvision's own blocks (`InceptionA/C/E` subclasses that
change the pool branch only) and loads the user's weights file; nothing is downloaded. The input is
images in [-1, 1], bilinearly resized to 299 px (the backbone does it, as pytorch-fid does with
`F.interpolate(..., align_corners=False)`; the graph's own [-1, 1] range needs no other scaling).
Outputs: the 2048-d pool3 features (FID, KID) and the class logits for the Inception Score.

The 1008 classes: the graph's softmax has 1008 outputs, of which 1000 are ImageNet's and 8 are
never trained targets. As the original Inception Score code (it took the logits at
`softmax/logits/MatMul`, before the bias) and torch-fidelity (`logits_unbiased`) do, the score is
the softmax over all 1008 of the logits without the bias: the 8 spare classes stay in (they get a
negligible share) so the numbers match theirs.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes and 8 spare outputs
FEATURES = 2048

# TensorFlow's 3x3 pooling with "SAME" padding: an average over the pixels in the image only.
_average_inside = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
_max = partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


class _PoolBranchAsTensorFlow:
    """A torchvision Inception block whose pool branch pools as the 2015 graph does; the other
    branches are torchvision's layers, computed by the block's `branches`."""

    pool = staticmethod(_average_inside)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [*self.branches(x), self.branch_pool(self.pool(x))]


class BlockA(_PoolBranchAsTensorFlow, tv.InceptionA):  # 35 x 35
    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))]


class BlockC(_PoolBranchAsTensorFlow, tv.InceptionC):  # 17 x 17
    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return [self.branch1x1(x), seven, double]


class BlockE(_PoolBranchAsTensorFlow, tv.InceptionE):  # 8 x 8
    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__(in_channels)
        if max_pool:
            self.pool = _max

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1),
                torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)]


def build_network() -> tv.Inception3:
    """The 2015 graph's architecture with untrained weights; its state-dict keys are those of
    the pt_inception files."""
    network = tv.Inception3(num_classes=CLASSES, aux_logits=False, transform_input=False, init_weights=False)
    network.Mixed_5b, network.Mixed_5c, network.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    network.Mixed_6b, network.Mixed_6c, network.Mixed_6d, network.Mixed_6e = (BlockC(768, 128), BlockC(768, 160),
                                                                              BlockC(768, 160), BlockC(768, 192))
    network.Mixed_7b, network.Mixed_7c = BlockE(1280), BlockE(2048, max_pool=True)
    return network


class FIDInception(nn.Module):
    """images (in [-1, 1], 299 px) -> (2048-d pool3 features, 1008 logits without the bias)."""

    def __init__(self, network: tv.Inception3):
        super().__init__()
        self.register_buffer("class_weights", network.fc.weight.detach().clone())
        network.fc = nn.Identity()  # the network now ends at the pool3 features
        self.network = network.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.network(images)
        return features, features @ self.class_weights.T
