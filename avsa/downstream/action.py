"""Action recognition transfer (METHOD.md §6): clip classification with the video encoder.

The network encodes each viewpoint crop, max-pools the features over the V viewpoints (V = 1
for UCF101 / HMDB51 clips) and classifies with Dropout 0.5 + Linear. Modes:
- finetune: the video encoder trains too (the paper's protocol), Adam with the learning rate
  cut by 0.3 at 40 %, 60 % and 80 % of the epochs ([8, 12, 16] of 20 in the paper);
- linear / frozen: the encoder is frozen (eval mode), a plain Linear is trained on its features.

Labels: single-label sets (UCF101, HMDB51) train with cross-entropy; the synthetic clips carry a
multi-hot of the classes present and train with per-class binary cross-entropy.

Metrics (`clip_video_accuracy`): a prediction is the top-scoring class and counts as correct
when that class is among the clip's labels (for single-label data: top-1 accuracy).
clip@1 averages over every evaluated clip window; video@1 averages the softmax over the
`eval_clips` windows of each video (grouped by sample key) and scores that once per video.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from avsa.downstream.heads import EpochLog, freeze, step
from avsa.errors import ShardError
from avsa.models.video import VideoEncoder
from avsa.train.objective import normalize_video, to_device

LR_MILESTONES = (0.4, 0.6, 0.8)
LR_GAMMA = 0.3


class ActionNet(nn.Module):
    """video (B, V, 3, T, S, S) uint8 -> logits (B, K)."""

    def __init__(self, encoder: VideoEncoder, num_classes: int, *, finetune: bool):
        super().__init__()
        self.encoder = encoder
        self.finetune = finetune
        if not finetune:
            freeze(encoder)
        drop = 0.5 if finetune else 0.0
        self.head = nn.Sequential(nn.Dropout(drop), nn.Linear(encoder.out_dim, num_classes))

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


def clip_video_accuracy(
    keys: Sequence[str], logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """(clip@1, video@1) of N clip windows: keys (N,) video ids, logits (N, K), targets (N, K).

    clip@1: mean top-1 hit over all N windows. video@1: per key, softmax averaged over its
    windows, then one hit per video (its targets taken from its first window).
    """
    if len(keys) != len(logits) or len(logits) != len(targets):
        raise ValueError("keys, logits and targets must have the same length")
    if not len(keys):
        return float("nan"), float("nan")
    clip = float(top1_hits(logits, targets).double().mean())
    index: dict[str, int] = {}
    group = torch.tensor([index.setdefault(k, len(index)) for k in keys])
    probs = torch.zeros(len(index), logits.shape[1], dtype=torch.float64)
    probs.index_add_(0, group, logits.double().softmax(-1))
    first = torch.full((len(index),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, group, torch.arange(len(keys)), reduce="amin")
    video = float(top1_hits(probs, targets[first]).double().mean())
    return clip, video


@torch.no_grad()
def evaluate(net: ActionNet, source, passes: int, device: torch.device) -> dict[str, float]:
    """clip@1 and video@1 over `passes` test passes (each a window per test video)."""
    net.eval()
    keys, logits, targets = [], [], []
    for p in range(passes):
        for batch in source.test(p):
            keys += list(batch["key"])
            b = to_device(batch, device)
            logits.append(net(b["video"]).float().cpu())
            targets.append(b["labels"].float().cpu())
    if not keys:
        raise ShardError(getattr(source, "test_uri", "test split"), "action: no test clips")
    clip, video = clip_video_accuracy(keys, torch.cat(logits), torch.cat(targets))
    return {"test/clip_acc": clip, "test/video_acc": video, "test/videos": float(len(set(keys)))}


def run_action(
    encoder: VideoEncoder,
    source,
    *,
    num_classes: int,
    mode: str,
    epochs: int,
    lr: float,
    eval_clips: int,
    max_steps: int = 0,
    device: torch.device,
    log_metrics: EpochLog | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train on `source.train(epoch)` and report clip@1 / video@1 on `eval_clips` test passes."""
    torch.manual_seed(seed)
    net = ActionNet(encoder, num_classes, finetune=mode == "finetune").to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(epochs), gamma=LR_GAMMA)
    single = bool(getattr(source, "single_label", False))
    steps = 0
    for epoch in range(epochs):
        net.train()
        total, hits, n = 0.0, 0.0, 0
        for batch in source.train(epoch):
            b = to_device(batch, device)
            logits = net(b["video"])
            total += step(opt, action_loss(logits, b["labels"], single)) * len(logits)
            hits += float(top1_hits(logits.detach(), b["labels"]).float().sum())
            n += len(logits)
            steps += 1
            if max_steps and steps >= max_steps:
                break
        sched.step()
        if n and log_metrics is not None:
            log_metrics({"train/loss": total / n, "train/clip_acc": hits / n,
                         "train/lr": opt.param_groups[0]["lr"]}, epoch)
        if max_steps and steps >= max_steps:
            break
    if steps == 0:
        raise ShardError(getattr(source, "train_uri", "train split"), "action: no training clips")
    return evaluate(net, source, max(1, eval_clips), device)
