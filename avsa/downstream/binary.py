"""AVC-Bin and AVSA-Bin (METHOD.md §6): does this audio belong with this viewpoint's video?

Both tasks freeze the pretrained network (encoders and viewpoint transformers) and train the
same head on concatenated per-viewpoint (video, audio) features (the transformers' context when
the model has them). One example is one viewpoint of one clip.

- AVC-Bin (which clip?): positives pair each viewpoint's video with its own audio, negatives
  with the audio of the next clip in the batch at the same viewpoint (audio rolled by one), so
  every batch is balanced.
- AVSA-Bin (which direction?): the pipeline yaws the sound field of half the clips
  (misalign_prob 0.5) before it is rotated toward the viewpoints; every viewpoint of a clip
  carries that clip's `aligned` label.

test/acc is the accuracy over all test examples: 2 x clips x viewpoints for AVC-Bin (negatives
roll over the whole test set, so no clip is paired with itself), clips x viewpoints for AVSA-Bin.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from avsa.downstream.heads import (
    EpochLog,
    PairHead,
    accuracy,
    freeze,
    frozen_features,
    predict,
    train_step,
)
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.train.objective import to_device

log = logging.getLogger(__name__)

TASKS = ("avc_bin", "avsa_bin")
MISALIGN_PROB = 0.5


def avc_pairs(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """video (B, V, Dv), audio (B, V, Da), B >= 2 -> x (2 B V, Dv + Da), y (2 B V,) int64:
    first the B V positives (label 1), then the B V negatives (audio of clip (i + 1) mod B)."""
    if video.shape[0] < 2:
        raise ValueError("avc_pairs needs at least 2 clips")
    pos = torch.cat((video, audio), dim=-1).flatten(0, 1)
    neg = torch.cat((video, audio.roll(-1, dims=0)), dim=-1).flatten(0, 1)
    y = torch.cat((torch.ones(len(pos)), torch.zeros(len(neg)))).long().to(video.device)
    return torch.cat((pos, neg)), y


def avsa_pairs(
    video: torch.Tensor, audio: torch.Tensor, aligned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """video (B, V, Dv), audio (B, V, Da), aligned (B,) 1/0 -> x (B V, Dv + Da), y (B V,)."""
    x = torch.cat((video, audio), dim=-1).flatten(0, 1)
    y = aligned.long().view(-1, 1).expand(-1, video.shape[1]).reshape(-1)
    return x, y


def make_pairs(task: str, video, audio, aligned=None) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "avc_bin":
        return avc_pairs(video, audio)
    if task == "avsa_bin":
        return avsa_pairs(video, audio, aligned)
    raise ValueError(f"not a binary task: {task!r}")


def _features(model: AVSANet, batches: Iterable[dict], device: torch.device, use_context: bool):
    """Frozen features of every batch: (video (N, V, Dv), audio (N, V, Da), aligned (N,))."""
    vs, as_, al = [], [], []
    for batch in batches:
        b = to_device(batch, device)
        v, a = frozen_features(model, b, use_context=use_context)
        vs.append(v)
        as_.append(a)
        al.append(b.get("aligned", torch.ones(len(v), dtype=torch.long, device=device)))
    if not vs:
        return None
    return torch.cat(vs), torch.cat(as_), torch.cat(al)


def run_binary(
    task: str,
    model: AVSANet,
    source,
    *,
    epochs: int,
    lr: float,
    max_steps: int = 0,
    device: torch.device,
    log_metrics: EpochLog | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train the pair head on `source.train(epoch)` and score it on `source.test(0)`.

    Returns {"test/acc", "test/examples", "train/acc"} (train/acc: the last epoch's running
    accuracy). `max_steps` > 0 caps the optimiser steps over all epochs.
    """
    if task not in TASKS:
        raise ValueError(f"not a binary task: {task!r}")
    torch.manual_seed(seed)
    model = freeze(model.to(device))
    use_context = model.video_transformer is not None
    head = PairHead(model.video_dim + model.audio_dim).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps, train_acc = 0, float("nan")
    for epoch in range(epochs):
        total, hits, n = 0.0, 0.0, 0
        for batch in source.train(epoch):
            b = to_device(batch, device)
            if task == "avc_bin" and len(b["video"]) < 2:
                continue  # a lone clip has no other clip's audio to pair with
            v, a = frozen_features(model, b, use_context=use_context)
            x, y = make_pairs(task, v, a, b.get("aligned"))
            loss, correct = train_step(head, opt, x, y)
            total, hits, n = total + loss * len(y), hits + correct, n + len(y)
            steps += 1
            if max_steps and steps >= max_steps:
                break
        if n:
            train_acc = hits / n
            if log_metrics is not None:
                log_metrics({"train/loss": total / n, "train/acc": train_acc}, epoch)
        if max_steps and steps >= max_steps:
            break
    if steps == 0:
        raise ShardError(source.train_uri, f"{task}: no training batch (need >= 2 clips)")

    feats = _features(model, source.test(0), device, use_context)
    if feats is None or (task == "avc_bin" and len(feats[0]) < 2):
        raise ShardError(source.test_uri, f"{task}: the test split needs at least 2 clips")
    x, y = make_pairs(task, *feats)
    return {"test/acc": accuracy(predict(head, x), y), "test/examples": float(len(y)),
            "train/acc": train_acc}
