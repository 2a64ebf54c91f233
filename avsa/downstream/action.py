"""Action recognition transfer (METHOD.md §6): clip classification with the video encoder.

The encoder's features of each viewpoint crop are max-pooled over the V viewpoints (V = 1 for
UCF101 / HMDB51) and classified by Dropout 0.5 + Linear. finetune trains the encoder too (the
paper's protocol, the learning rate cut by 0.3 at 40, 60 and 80 % of the epochs) and decodes
every epoch; linear / frozen trains a Linear on the frozen encoder's cached features,
standardised by a BatchNorm without affine parameters as linear-probe practice does (MAE).

A training split whose clips each name one class trains with cross-entropy, any other
(multi-hot synthetic labels) with per-class binary cross-entropy: one loss for the split, in
both modes. A prediction (the top class) is correct when the clip has that label: clip@1 over
every evaluated window, video@1 on the softmax averaged over a video's `eval_clips` windows;
the majority training class, scored alike, is the level a head must beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avsa.config import DataConfig, DownstreamConfig
from avsa.downstream import ucf
from avsa.downstream.fit import (
    Cached,
    EpochLog,
    FitResult,
    TransferHead,
    encode_passes,
    fit_head,
    freeze,
)
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.inputs import normalize_video, to_device
from avsa.models.video import VideoEncoder

LR_MILESTONES = (0.4, 0.6, 0.8)
LR_GAMMA = 0.3


class ActionNet(nn.Module):
    """video (B, V, 3, T, S, S) uint8 -> logits (B, K)."""

    def __init__(self, encoder: VideoEncoder, num_classes: int, *, finetune: bool):
        super().__init__()
        self.encoder = encoder
        self.finetune = finetune
        if finetune:
            self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(encoder.out_dim, num_classes))
        else:  # linear-probe practice (MAE): features standardised, so their scale cannot stall it
            freeze(encoder)
            self.head = nn.Sequential(nn.BatchNorm1d(encoder.out_dim, affine=False),
                                      nn.Linear(encoder.out_dim, num_classes))

    def train(self, mode: bool = True) -> ActionNet:
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def features(self, video: torch.Tensor) -> torch.Tensor:
        b, v = video.shape[:2]
        x = normalize_video(video).flatten(0, 1)
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            f = self.encoder(x)
        return f.view(b, v, -1).amax(dim=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(video))


def milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate drops: 20 -> [8, 12, 16]."""
    return sorted({m for f in LR_MILESTONES if 0 < (m := round(f * epochs)) < epochs})


def action_loss(logits: torch.Tensor, targets: torch.Tensor, single_label: bool) -> torch.Tensor:
    """logits (B, K), targets (B, K) one-hot or multi-hot float."""
    if single_label:
        return F.cross_entropy(logits, targets.argmax(-1))
    return F.binary_cross_entropy_with_logits(logits, targets.float())


def top1_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the top-scoring class of each row is one of its labels (targets > 0)."""
    return targets.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1) > 0


def is_single_label(targets: torch.Tensor) -> bool:
    """True when every row of targets (N, K) names exactly one class (and N > 0)."""
    return len(targets) > 0 and bool(((targets > 0).sum(-1) == 1).all())


def majority_class(targets: torch.Tensor) -> int:
    """The class labelled in most rows of targets (N, K); the lowest index on a tie."""
    return int((targets > 0).sum(0).argmax())


def clip_video_hits(
    keys: Sequence[str], logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Per-window and per-video hits of N clip windows: keys (N,) video ids, logits (N, K),
    targets (N, K) -> (clip (N,) bool, video (G,) bool, videos in key order; the video of each
    window (N,) int, its index in `video`).

    A video's prediction is the softmax averaged over its windows; its targets are its first
    window's.
    """
    if len(keys) != len(logits) or len(logits) != len(targets):
        raise ValueError("keys, logits and targets must have the same length")
    clip = top1_hits(logits, targets)
    _, first, group = np.unique(np.asarray(keys, dtype=str), return_index=True,
                                return_inverse=True)
    probs = torch.zeros(len(first), logits.shape[1], dtype=torch.float64)
    probs.index_add_(0, torch.from_numpy(group), logits.double().softmax(-1))
    return clip, top1_hits(probs, targets[torch.from_numpy(first)]), group


def score(keys: list[str], logits: torch.Tensor, targets: torch.Tensor, majority: int,
          examples: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Test metrics of the head and of always predicting the `majority` training class;
    examples gets the hits ("clip_acc" per window with its video "clip_acc_unit", "video_acc"),
    first labels and predictions."""
    clip, video, of_video = clip_video_hits(keys, logits, targets)
    constant = F.one_hot(torch.full((len(keys),), majority), logits.shape[1]).float()
    m_clip, m_video, _ = clip_video_hits(keys, constant, targets)
    if examples is not None:
        examples["clip_acc"] = clip.numpy().astype(np.uint8)
        examples["clip_acc_unit"] = of_video
        examples["video_acc"] = video.numpy().astype(np.uint8)
        examples["target"] = targets.argmax(-1).numpy().astype(np.int16)  # first label
        examples["pred"] = logits.argmax(-1).numpy().astype(np.int16)
    return {"test/clip_acc": float(clip.double().mean()),
            "test/video_acc": float(video.double().mean()),
            "test/majority_clip_acc": float(m_clip.double().mean()),
            "test/majority_video_acc": float(m_video.double().mean()),
            "test/videos": float(len(video))}


class ActionTask(TransferHead):
    """Action recognition: `ActionNet`'s head on the frozen encoder's cached features, or the
    whole net end to end (finetune). Metrics: see `score`, plus test/single_label."""

    name = "action"

    def __init__(self, model: AVSANet, source, ds: DownstreamConfig, device: torch.device):
        finetune = ds.mode == "finetune"
        self.net = ActionNet(model.video_encoder, source.num_classes, finetune=finetune).to(device)
        self.module, self.device = self.net.head, device
        if finetune:  # the paper's protocol (METHOD.md §6)
            self.default_lr = 1e-4
        self.eval_clips, self.majority = max(1, ds.eval_clips), 0
        self.declared = self.single = bool(getattr(source, "single_label", False))

    @classmethod
    def source(cls, data: DataConfig, ds: DownstreamConfig, memo: dict | None):
        """A UCF101 / HMDB51 folder (fold downstream.fold) when data.shards is one, else
        shards."""
        if ucf.is_layout(data.shards):
            return ucf.LayoutSource(ucf.load_layout(data.shards, ds.fold), data, ds.batch_size,
                                    seed=data.seed, eval_clips=ds.eval_clips)
        return super().source(data, ds, memo)

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """One row per clip: the frozen encoder's features (B, D), max over viewpoints."""
        batch = to_device(batch, self.device)
        return {"x": self.net.features(batch["video"]).float(), "labels": batch["labels"].float()}

    def prepare(self, train: Cached, fit: Cached, val: Cached) -> None:
        labels = train.tensors["labels"]
        self.single = self.declared or is_single_label(labels)
        self.majority = majority_class(labels)

    def loss(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return action_loss(self.net.head(rows["x"]), rows["labels"], self.single)

    def fit(self, source, ds: DownstreamConfig, seed: int, log: EpochLog | None) -> FitResult:
        if not self.net.finetune:
            self.net.eval()
            return super().fit(source, ds, seed, log)
        # One loss for the whole split, chosen as the linear probe chooses it.
        self.single = self.declared or is_single_label(source.train_labels())
        seen: list[torch.Tensor] = []

        def batches(epoch):
            for batch in source.train(epoch):
                if epoch == 0:
                    seen.append(batch["labels"].float())
                yield to_device(batch, self.device)

        def loss(b):
            return action_loss(self.net(b["video"]), b["labels"], self.single)

        result = fit_head(self.net, loss, batches, epochs=ds.epochs, lr=self.lr(ds),
                          max_steps=ds.max_steps, lr_milestones=milestones(ds.epochs),
                          lr_gamma=LR_GAMMA, log=log)
        if result.steps == 0:
            raise ShardError(source.train_uri, "action: no training clips")
        self.majority = majority_class(torch.cat(seen))
        return result

    def score(self, source, examples: dict | None) -> dict[str, float]:
        """clip@1 / video@1 over `eval_clips` test passes beside the majority class's."""
        self.net.eval()
        test = encode_passes(source.test, self.eval_clips, self.encode)
        if test is None:
            raise ShardError(source.test_uri, "action: no test clips")
        with torch.no_grad():
            logits = self.net.head(test.tensors["x"])
        metrics = score(test.keys, logits.float().cpu(), test.tensors["labels"].cpu(),
                        self.majority, examples)
        return {**metrics, "test/single_label": float(self.single)}
