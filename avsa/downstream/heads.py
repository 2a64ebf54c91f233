"""Shared pieces of every transfer task: the pair head, frozen features, cached encodings.

Frozen tasks encode each split once (`encode_passes`) and train their heads on the cached
rows (avsa.downstream.fit), as linear-probe practice does; tracking lives in the task modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from avsa.models import AVSANet
from avsa.models.inputs import normalize_video


def pair_head(in_dim: int) -> nn.Sequential:
    """METHOD.md §6 binary head: (..., in_dim) concatenated (video, audio) features ->
    Dropout 0.5 -> Linear(in_dim, 512) -> ReLU -> Linear(512, 2) -> (..., 2) logits."""
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(in_dim, 512), nn.ReLU(inplace=True),
                         nn.Linear(512, 2))


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm keeps its statistics, dropout off) and no gradients."""
    return module.eval().requires_grad_(False)


@torch.no_grad()
def frozen_features(
    model: AVSANet, batch: Mapping[str, torch.Tensor], *, use_context: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-viewpoint (video, audio) features of a frozen model.

    batch: video (B, V, 3, T, S, S) uint8, audio (B, V, C, F, M), directions (B, V, 2).
    Returns (B, V, Dv) and (B, V, Da): the viewpoint transformers' context when the model has
    them and use_context, else the encoder features.
    """
    video = model.encode_video(normalize_video(batch["video"]))
    audio = model.encode_audio(batch["audio"].float())
    if use_context:
        video, audio = model.context(video, audio, batch.get("directions"))
    return video, audio


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits (N, C) against class indices (N,); nan for N = 0."""
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def predict(head: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `head` in eval mode over (N, D) features, in chunks."""
    head.eval()
    return torch.cat([head(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@dataclass
class Cached:
    """Encoded examples: tensors (N, ...) and the clip key of each of the N rows."""

    tensors: dict[str, torch.Tensor]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at `index` (int64 indices or a bool mask) of every tensor."""
        return {k: v[index.to(v.device)] for k, v in self.tensors.items()}

    def subset(self, mask: torch.Tensor) -> Cached:
        keep = mask.nonzero().squeeze(1)
        return Cached(self.take(keep), [self.keys[int(i)] for i in keep])


@torch.no_grad()
def encode_passes(
    batches: Callable[[int], Iterable[dict]],
    passes: int,
    encode: Callable[[dict], dict[str, torch.Tensor]],
) -> Cached | None:
    """Encode every batch of `batches(p)` for p < passes once; None when no batch came.

    encode(batch) returns tensors whose rows are the batch's clips (B rows) or its
    clips' viewpoints (B V rows, clip-major); each row gets its clip's key (batch["key"], or
    the clip's position in its pass when the source gives no keys).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    keys: list[str] = []
    for p in range(passes):
        seen = 0
        for batch in batches(p):
            clips = len(batch["video"])
            names = list(batch.get("key") or (f"#{seen + i}" for i in range(clips)))
            seen += clips
            out = encode(batch)
            for name, t in out.items():
                parts.setdefault(name, []).append(t)
            rows = len(next(iter(out.values())))
            keys += [k for k in names for _ in range(rows // clips)]
    if not keys:
        return None
    return Cached({k: torch.cat(v) for k, v in parts.items()}, keys)
