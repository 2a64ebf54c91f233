"""R(2+1)D-18 video encoder, as in the authors' code (15.4M parameters at width 64).

Each 3x3x3 convolution is factorised into a spatial 1x3x3 convolution followed by a temporal
3x1x1 one, with `out` channels in between (the authors' choice; torchvision's parameter-matched
"mid planes" would give about 31M parameters instead). The stem is a full (3, 7, 7) convolution
with stride (1, 2, 2) and no max-pool; stages 2-4 halve time and space (stride 2 in all three
axes), so 3 x 8 x 112 x 112 clips end as 512 x 1 x 7 x 7 maps before the global max-pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]


class R2Plus1dBlock(nn.Module):
    """Residual (2+1)D block: two factorised 3x3x3 convolutions, BN after the residual sum.

    x: (B, in_planes, T, H, W) -> (B, out_planes, T', H', W') with T' = ceil(T / stride) etc.
    The shortcut is a 1x1x1 strided convolution when the shape changes, identity otherwise.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv3d(in_planes, out_planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            *_bn_relu(out_planes),
            nn.Conv3d(out_planes, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
            *_bn_relu(out_planes),
            nn.Conv3d(out_planes, out_planes, (1, 3, 3), 1, (0, 1, 1), bias=False),
            *_bn_relu(out_planes),
            nn.Conv3d(out_planes, out_planes, (3, 1, 1), 1, (1, 0, 0), bias=False),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv3d(in_planes, out_planes, 1, stride, bias=False)
        self.out_bn = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.out_bn(self.main(x) + self.shortcut(x)))


class VideoEncoder(nn.Module):
    """R(2+1)D video encoder.

    Args:
        width: channels of the stem and first stage; stages use width x (1, 2, 4, 8).
        layers: residual blocks per stage.
        in_channels: input colour channels.

    forward: video (B, C, T, S, S) float -> (B, 8 * width) global max-pooled features.
    """

    def __init__(self, width: int = 64, layers: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        if width < 1 or len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"VideoEncoder: bad width={width} or layers={tuple(layers)}")
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            *_bn_relu(width),
        )
        stages, planes = [], width
        for i, n_blocks in enumerate(layers):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = [R2Plus1dBlock(planes, out, stride)]
            blocks += [R2Plus1dBlock(out, out) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            planes = out
        self.stages = nn.Sequential(*stages)
        self.out_dim = planes

    def feature_map(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, S, S) -> last stage map (B, 8 * width, T', S', S') before pooling."""
        return self.stages(self.stem(video))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.feature_map(video), dim=(2, 3, 4))
