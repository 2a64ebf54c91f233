"""AVC-Bin and AVSA-Bin (METHOD.md §6): does this audio belong with this viewpoint's video?

Both train the same head on the frozen network's concatenated per-viewpoint (video, audio)
features (the transformers' context when the model has them); one example is one viewpoint
of one clip, and a minibatch is a set of clips.
- AVC-Bin (which clip?): negatives pair each viewpoint's video with the audio of the next clip
  of the batch at the same viewpoint, so every batch is balanced.
- AVSA-Bin (which direction?): the pipeline yaws the sound field of half the clips
  (MISALIGN_PROB) before rotating it toward the viewpoints; every viewpoint carries its clip's
  `aligned` label.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avsa.config import DataConfig, DownstreamConfig
from avsa.downstream.fit import TransferHead
from avsa.downstream.heads import (
    Cached,
    accuracy,
    encode_passes,
    freeze,
    frozen_features,
    pair_head,
    predict,
)
from avsa.downstream.sources import ShardSource
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.inputs import to_device

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


def make_pairs(task: str, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples (x, y) of the clips in `rows` (see `encode_clips`)."""
    if task == "avc_bin":
        return avc_pairs(rows["video"], rows["audio"])
    return avsa_pairs(rows["video"], rows["audio"], rows["aligned"])


def encode_clips(model: AVSANet, batch: dict, use_context: bool) -> dict[str, torch.Tensor]:
    """One row per clip: video (B, V, Dv), audio (B, V, Da), aligned (B,) of a batch on device."""
    v, a = frozen_features(model, batch, use_context=use_context)
    aligned = batch.get("aligned")
    if aligned is None:
        aligned = torch.ones(len(v), dtype=torch.long, device=v.device)
    return {"video": v, "audio": a, "aligned": aligned.long()}


def pair_loss(task: str, head: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Cross-entropy of the head on the pairs of these clips (None for a lone AVC-Bin clip).

    rows may carry "clip" (B,) ids: an AVC-Bin negative whose audio comes from another pass of
    the same clip is dropped, since it is no negative at all.
    """
    if task == "avc_bin" and len(rows["video"]) < 2:
        return None  # a lone clip has no other clip's audio to pair with
    x, y = make_pairs(task, rows)
    if task == "avc_bin" and "clip" in rows:
        other = rows["clip"] != rows["clip"].roll(-1)
        keep = torch.cat((torch.ones_like(other), other)).repeat_interleave(rows["video"].shape[1])
        x, y = x[keep], y[keep]
    return F.cross_entropy(head(x), y)


class BinaryTask(TransferHead):
    """AVC-Bin or AVSA-Bin: the pair head on the frozen model's per-viewpoint features.

    test/acc is over every test example (2 x clips x viewpoints for AVC-Bin, whose negatives roll
    over the whole test set; clips x viewpoints for AVSA-Bin), with test/examples their count;
    train/acc over the training rows; examples gets each test hit ("acc"), target and prediction.
    """

    def __init__(self, task: str, model: AVSANet, device: torch.device):
        if task not in TASKS:
            raise ValueError(f"not a binary task: {task!r}")
        self.name, self.device = task, device
        self.model = freeze(model.to(device))
        self.use_context = model.video_transformer is not None
        self.module = pair_head(model.video_dim + model.audio_dim).to(device)
        self.min_rows = self.min_keys = 2 if task == "avc_bin" else 1
        self.fit_rows: Cached | None = None

    @classmethod
    def source(cls, data: DataConfig, ds: DownstreamConfig, memo: dict | None) -> ShardSource:
        """AVSA-Bin's clips have their sound field yawed with probability MISALIGN_PROB."""
        prob = MISALIGN_PROB if ds.task == "avsa_bin" else 0.0
        return ShardSource.from_config(data, ds.batch_size, misalign_prob=prob, memo=memo)

    @classmethod
    def build(cls, model: AVSANet, source, ds: DownstreamConfig,
              device: torch.device) -> BinaryTask:
        return cls(ds.task, model, device)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        return encode_clips(self.model, to_device(batch, self.device), self.use_context)

    def prepare(self, train: Cached, fit: Cached, val: Cached) -> None:
        ids = {k: i for i, k in enumerate(dict.fromkeys(train.keys))}
        for part in (fit, val):
            part.tensors["clip"] = torch.tensor([ids[k] for k in part.keys], device=self.device)
        self.fit_rows = fit

    def loss(self, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return pair_loss(self.name, self.module, rows)

    def score(self, source, examples: dict | None) -> dict[str, float]:
        test = encode_passes(lambda p: source.test(0), 1, self.encode)
        if test is None or len(test) < self.min_rows:
            raise ShardError(source.test_uri, f"{self.name}: too few test clips "
                                              f"(need >= {self.min_rows})")
        x, y = make_pairs(self.name, test.tensors)
        guess = predict(self.module, x).argmax(-1)
        hits = guess == y
        if examples is not None:
            examples["acc"] = hits.cpu().numpy().astype(np.uint8)
            examples["target"] = y.cpu().numpy().astype(np.int16)  # for the confusion matrix
            examples["pred"] = guess.cpu().numpy().astype(np.int16)
        fx, fy = make_pairs(self.name, self.fit_rows.tensors)
        return {"test/acc": float(hits.float().mean()), "test/examples": float(len(y)),
                "train/acc": accuracy(predict(self.module, fx), fy)}
