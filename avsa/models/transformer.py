"""Viewpoint transformer: self-attention across the V viewpoint embeddings of one clip.

Defaults follow the authors' code: depth 2, width D, FFN 4D, one attention head, post-LayerNorm,
dropout 0.1, a ReLU after each layer and no positional encoding, so the transformer is
permutation-equivariant over viewpoints and must read direction from the content alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def direction_features(directions: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Fourier features of viewing directions.

    directions: (..., 2) (az, el) radians. Returns (..., 3 + 6 * n_freqs): the unit vector
    (x, y, z) = (cos el cos az, cos el sin az, sin el) and sin/cos of 2^k * pi * (x, y, z),
    k = 0..n_freqs-1. Working on the unit vector keeps the features continuous across az = +-pi.
    """
    az, el = directions.unbind(-1)
    unit = torch.stack((el.cos() * az.cos(), el.cos() * az.sin(), el.sin()), dim=-1)
    scales = torch.pi * 2.0 ** torch.arange(n_freqs, dtype=unit.dtype, device=unit.device)
    angles = (unit[..., None, :] * scales[:, None]).flatten(-2)  # (..., 3 * n_freqs)
    return torch.cat((unit, angles.sin(), angles.cos()), dim=-1)


class SphericalPositionalEncoding(nn.Module):
    """directions (B, V, 2) (az, el) radians -> (B, V, dim) via Fourier features + Linear."""

    def __init__(self, dim: int, n_freqs: int = 4):
        super().__init__()
        self.n_freqs = n_freqs
        self.proj = nn.Linear(3 + 6 * n_freqs, dim)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        return self.proj(direction_features(directions, self.n_freqs))


class ViewpointTransformer(nn.Module):
    """Transformer encoder over viewpoints: `depth` layers of width `dim` (divisible by
    `heads`) and FFN 4 * dim; `spherical_pos_enc` adds an encoding of the viewpoint directions.

    forward: tokens (B, V, D), directions (B, V, 2) radians or None -> (B, V, D), all >= 0.
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 1, dropout: float = 0.1,
                 spherical_pos_enc: bool = False):
        super().__init__()
        if depth < 1 or heads < 1 or dim % heads:
            raise ValueError(f"ViewpointTransformer: bad depth={depth}, heads={heads}, dim={dim}")
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(depth)
        )
        self.pos_enc = SphericalPositionalEncoding(dim) if spherical_pos_enc else None

    def forward(self, tokens: torch.Tensor, directions: torch.Tensor | None = None) -> torch.Tensor:
        if self.pos_enc is not None:
            if directions is None:
                raise ValueError("ViewpointTransformer: spherical_pos_enc needs directions")
            tokens = tokens + self.pos_enc(directions.to(tokens.dtype))
        for layer in self.layers:
            tokens = F.relu(layer(tokens))
        return tokens
