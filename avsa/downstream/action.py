"""Action recognition transfer (METHOD.md §6): clip classification with the video encoder.

The network encodes each viewpoint crop, max-pools the features over the V viewpoints (V = 1
for UCF101 / HMDB51 clips) and classifies with Dropout 0.5 + Linear. Modes:
- finetune: the video encoder trains too (the paper's protocol), Adam with the learning rate
  cut by 0.3 at 40 %, 60 % and 80 % of the epochs ([8, 12, 16] of 20 in the paper);
- linear / frozen: the encoder is frozen (eval mode), a plain Linear is trained on its features.

In linear / frozen mode the encoder's features are computed once per pass (`feature_passes`
augmented passes of the training split, `eval_clips` of the test split) and the head trains on
the cached rows with early stopping (avsa.downstream.fit); finetune decodes every epoch.

Labels: single-label data (UCF101, HMDB51, or synthetic clips that each carry exactly one class)
trains with cross-entropy; multi-label synthetic clips (a multi-hot of the classes present)
train with per-class binary cross-entropy. finetune decides from the source alone.

Metrics (`clip_video_hits`): a prediction is the top-scoring class and counts as correct when
that class is among the clip's labels; on single-label data that is top-1 accuracy. clip@1
averages over every evaluated clip window; video@1 averages the softmax over the `eval_clips`
windows of each video (grouped by sample key) and scores that once per video. Beside them,
test/majority_clip_acc and test/majority_video_acc score always predicting the class most
often labelled in training with the same metric: the level a head must beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avsa.downstream.fit import EpochLog, fit_head, holdout, minibatches
from avsa.downstream.heads import Cached, encode_passes, freeze
from avsa.errors import ShardError
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


def is_single_label(targets: torch.Tensor) -> bool:
    """True when every row of targets (N, K) names exactly one class (and N > 0)."""
    return len(targets) > 0 and bool(((targets > 0).sum(-1) == 1).all())


def majority_class(targets: torch.Tensor) -> int:
    """The class labelled in most rows of targets (N, K); the lowest index on a tie."""
    return int((targets > 0).sum(0).argmax())


def clip_video_hits(
    keys: Sequence[str], logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window and per-video hits of N clip windows: keys (N,) video ids, logits (N, K),
    targets (N, K) -> (clip (N,) bool, video (G,) bool, videos in order of first appearance).

    A video's prediction is the softmax averaged over its windows; its targets are its first
    window's.
    """
    if len(keys) != len(logits) or len(logits) != len(targets):
        raise ValueError("keys, logits and targets must have the same length")
    clip = top1_hits(logits, targets)
    index: dict[str, int] = {}
    group = torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)
    probs = torch.zeros(len(index), logits.shape[1], dtype=torch.float64)
    probs.index_add_(0, group, logits.double().softmax(-1))
    first = torch.full((len(index),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, group, torch.arange(len(keys)), reduce="amin")
    return clip, top1_hits(probs, targets[first])


def clip_video_accuracy(
    keys: Sequence[str], logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """(clip@1, video@1): the mean hits of `clip_video_hits`; nan, nan for no windows."""
    if not len(keys):
        if len(logits) or len(targets):
            raise ValueError("keys, logits and targets must have the same length")
        return float("nan"), float("nan")
    clip, video = clip_video_hits(keys, logits, targets)
    return float(clip.double().mean()), float(video.double().mean())


def score(keys: list[str], logits: torch.Tensor, targets: torch.Tensor, majority: int,
          examples: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Test metrics of the head and of always predicting the `majority` training class."""
    clip, video = clip_video_hits(keys, logits, targets)
    constant = F.one_hot(torch.full((len(keys),), majority), logits.shape[1]).float()
    m_clip, m_video = clip_video_hits(keys, constant, targets)
    if examples is not None:
        examples["clip_acc"] = clip.numpy().astype(np.uint8)
        examples["video_acc"] = video.numpy().astype(np.uint8)
        examples["target"] = targets.argmax(-1).numpy().astype(np.int16)  # first label
        examples["pred"] = logits.argmax(-1).numpy().astype(np.int16)
    return {"test/clip_acc": float(clip.double().mean()),
            "test/video_acc": float(video.double().mean()),
            "test/majority_clip_acc": float(m_clip.double().mean()),
            "test/majority_video_acc": float(m_video.double().mean()),
            "test/videos": float(len(video))}


@torch.no_grad()
def encode_features(net: ActionNet, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """One row per clip: the frozen encoder's features (B, D), max over viewpoints, and labels."""
    batch = to_device(batch, device)
    return {"x": net.features(batch["video"]).float(), "labels": batch["labels"].float()}


def _test_rows(net: ActionNet, source, passes: int, device: torch.device) -> Cached:
    """The encoded windows of `passes` test passes (the net is left in eval mode)."""
    net.eval()
    test = encode_passes(source.test, passes, lambda b: encode_features(net, b, device))
    if test is None:
        raise ShardError(getattr(source, "test_uri", "test split"), "action: no test clips")
    return test


def run_action(
    encoder: VideoEncoder,
    source,
    *,
    num_classes: int,
    mode: str,
    epochs: int,
    lr: float,
    eval_clips: int,
    batch_size: int = 16,
    max_steps: int = 0,
    val_fraction: float = 0.0,
    patience: int = 0,
    feature_passes: int = 1,
    device: torch.device,
    log_metrics: EpochLog | None = None,
    seed: int = 0,
    examples: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Train, then report clip@1 / video@1 over `eval_clips` test passes beside the majority
    class's. finetune trains end to end on `source.train(epoch)` for `epochs` epochs; linear /
    frozen train the head on `feature_passes` cached passes, early-stopped on `val_fraction`
    of the training clips as in avsa.downstream.binary.
    """
    torch.manual_seed(seed)
    net = ActionNet(encoder, num_classes, finetune=mode == "finetune").to(device)
    declared = bool(getattr(source, "single_label", False))
    passes = max(1, eval_clips)
    if mode == "finetune":
        seen: list[torch.Tensor] = []

        def batches(epoch):
            for batch in source.train(epoch):
                if epoch == 0:
                    seen.append(batch["labels"].float())
                yield to_device(batch, device)

        result = fit_head(
            net, lambda b: action_loss(net(b["video"]), b["labels"], declared), batches,
            epochs=epochs, lr=lr, max_steps=max_steps, lr_milestones=milestones(epochs),
            lr_gamma=LR_GAMMA, log=log_metrics)
        if result.steps == 0:
            raise ShardError(getattr(source, "train_uri", "train split"),
                             "action: no training clips")
        train_labels, single = torch.cat(seen), declared
    else:
        net.eval()
        train = encode_passes(source.train, feature_passes,
                              lambda b: encode_features(net, b, device))
        if train is None:
            raise ShardError(getattr(source, "train_uri", "train split"),
                             "action: no training clips")
        single = declared or is_single_label(train.tensors["labels"])
        held = holdout(train.keys, val_fraction)
        fit, val = train.subset(~held), train.subset(held)
        train_labels = train.tensors["labels"]

        def loss(rows):
            return action_loss(net.head(rows["x"]), rows["labels"], single)

        gen = torch.Generator().manual_seed(seed)
        result = fit_head(
            net.head, lambda idx: loss(fit.take(idx)),
            lambda epoch: minibatches(len(fit), batch_size, gen),
            epochs=epochs, lr=lr, max_steps=max_steps, patience=patience, log=log_metrics,
            validate=(lambda: float(loss(val.tensors))) if len(val) else None)
    test = _test_rows(net, source, passes, device)  # leaves the net in eval mode
    with torch.no_grad():
        logits = net.head(test.tensors["x"])
    metrics = score(test.keys, logits.float().cpu(), test.tensors["labels"].cpu(),
                    majority_class(train_labels), examples)
    metrics.update({"test/single_label": float(single),
                    "train/best_epoch": float(result.best_epoch),
                    "train/epochs": float(result.epochs)})
    return metrics
