"""2-D CNN audio encoder over multi-channel log-mel spectrograms (4.7M parameters at width 64).

A 7x7 stride-2 stem, then four plain (non-residual) blocks of two 3x3 conv-BN-ReLU layers at
width x (1, 2, 4, 8) with strides (1, 2, 2, 1) on each block's first convolution, then a global
max-pool, as in the authors' code, or a global mean-pool (`pool="mean"`).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free 2-D convolution ('same' padding for odd kernels), BatchNorm and ReLU."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class AudioEncoder(nn.Module):
    """Audio encoder of `in_channels` spectrogram channels (4 ambiX FOA, 2 stereo, 1 mono).

    pool: "max" (the authors') or "mean" over the last map's F / 8 x M / 8 positions. A max
    passes gradient to one position, a mean to all: a small model leaves chance sooner.

    forward: log-mel (B, C, F, M) float, F frames x M mel bins -> (B, 8 * width).
    """

    STRIDES = (1, 2, 2, 1)
    POOLS = ("max", "mean")

    def __init__(self, width: int = 64, in_channels: int = 4, pool: str = "max"):
        super().__init__()
        if width < 1 or in_channels < 1 or pool not in self.POOLS:
            raise ValueError(
                f"AudioEncoder: bad width={width}, in_channels={in_channels} or pool={pool!r}"
                f" (one of {self.POOLS})"
            )
        self.pool = pool
        layers = conv_bn_relu(in_channels, width, 7, 2)
        planes = width
        for i, stride in enumerate(self.STRIDES):
            out = width * 2**i
            layers += conv_bn_relu(planes, out, 3, stride) + conv_bn_relu(out, out, 3)
            planes = out
        self.body = nn.Sequential(*layers)
        self.out_dim = planes

    def feature_map(self, spec: torch.Tensor) -> torch.Tensor:
        """spec (B, C, F, M) -> last map (B, 8 * width, F / 8, M / 8) before pooling."""
        return self.body(spec)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(spec)
        return fmap.mean(dim=(2, 3)) if self.pool == "mean" else torch.amax(fmap, dim=(2, 3))
