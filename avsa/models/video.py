"""R(2+1)D-18 video encoder, as in the authors' code (15.4M parameters at width 64).

Each 3x3x3 convolution is factorised into a spatial 1x3x3 convolution followed by a temporal
3x1x1 one, with `out` channels in between (the authors' choice; torchvision's parameter-matched
"mid planes" would give about 31M parameters instead). The stem is a full (3, 7, 7) convolution
with stride (1, 2, 2) and no max-pool; stages 2-4 halve time and space (stride 2 in all three
axes), so 3 x 8 x 112 x 112 clips end as 512 x 1 x 7 x 7 maps before the global max-pool.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]


def _conv2plus1d(in_planes: int, out_planes: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3x3 convolution factorised: spatial 1x3x3, BN-ReLU, temporal 3x1x1."""
    return [
        nn.Conv3d(in_planes, out_planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
        *_bn_relu(out_planes),
        nn.Conv3d(out_planes, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
    ]


class R2Plus1dBlock(nn.Module):
    """Residual (2+1)D block: two factorised 3x3x3 convolutions, BN after the residual sum.

    x: (B, in_planes, T, H, W) -> (B, out_planes, T', H', W') with T' = ceil(T / stride) etc.
    The shortcut is a 1x1x1 strided convolution when the shape changes, identity otherwise.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        self.main = nn.Sequential(*_conv2plus1d(in_planes, out_planes, stride),
                                  *_bn_relu(out_planes), *_conv2plus1d(out_planes, out_planes))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv3d(in_planes, out_planes, 1, stride, bias=False)
        self.out_bn = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.out_bn(self.main(x) + self.shortcut(x)))


class VideoEncoder(nn.Module):
    """R(2+1)D-18 video encoder: a stem and four stages of two blocks at width x (1, 2, 4, 8).

    forward: video (B, 3, T, S, S) float -> (B, 8 * width) global max-pooled features.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"VideoEncoder: bad width={width}")
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), *_bn_relu(width)
        )
        stages, planes = [], width
        for i in range(4):
            out = width * 2**i
            stages.append(nn.Sequential(R2Plus1dBlock(planes, out, 1 if i == 0 else 2),
                                        R2Plus1dBlock(out, out)))
            planes = out
        self.stages = nn.Sequential(*stages)
        self.out_dim = planes

    def feature_map(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, S, S) -> last stage map (B, 8 * width, T', S', S') before pooling."""
        return self.stages(self.stem(video))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.feature_map(video), dim=(2, 3, 4))
