"""Shared pieces of every transfer task: heads, frozen features, optimiser steps, accuracy.

The math here is tensors in, tensors out; data loading and tracking live in the task modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from avsa.models import AVSANet
from avsa.train.objective import normalize_video

# log(metrics, step): per-epoch training metrics go to the tracking run through this.
EpochLog = Callable[[dict[str, float], int], None]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PairHead(nn.Module):
    """METHOD.md §6 binary head: Dropout 0.5 -> Linear(in_dim, 512) -> ReLU -> Linear(512, 2).

    forward: (..., in_dim) concatenated (video, audio) features -> (..., 2) logits.
    """

    def __init__(self, in_dim: int, hidden: int = 512, dropout: float = 0.5, classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm keeps its statistics, dropout off) and no gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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


def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimiser step on `loss`; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits (N, C) against class indices (N,); nan for N = 0."""
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(-1) == labels).float().mean())


def train_step(
    head: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, int]:
    """One cross-entropy step of `head` (train mode) on x (N, D), y (N,) class indices.
    Returns (loss, correct predictions before the step)."""
    head.train()
    logits = head(x)
    hits = int((logits.detach().argmax(-1) == y).sum())
    return step(opt, F.cross_entropy(logits, y)), hits


def fit_classifier(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    log: EpochLog | None = None,
) -> list[float]:
    """Train `head` with cross-entropy and Adam on fixed features.

    x: (N, D) features, y: (N,) int64 class indices; minibatches shuffled by `seed`.
    Returns the mean training loss of each epoch (also passed to `log` as train/loss).
    """
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            total += train_step(head, opt, x[idx], y[idx])[0] * len(idx)
        losses.append(total / max(len(x), 1))
        if log is not None:
            log({"train/loss": losses[-1]}, epoch)
    return losses


@torch.no_grad()
def predict(head: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `head` in eval mode over (N, D) features, in chunks."""
    head.eval()
    return torch.cat([head(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
