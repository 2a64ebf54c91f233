"""360 semantic segmentation transfer (METHOD.md §6): an FPN head on frozen video features.

The frozen video encoder's four stage maps (each averaged over time) feed a feature pyramid:
1x1 laterals to a common width, top-down nearest upsampling and addition, then a 3x3 conv,
ReLU and a 1x1 classifier on the finest level, upsampled bilinearly to the crop size. The
target is the crop's class map (0 = background, 1..K the synthetic classes) at the centre
of the video window, so the prediction is one map per crop, the average over time.

Settings (`downstream.context`), conditioning added to the coarsest pyramid level (from where
the top-down path carries it to every level):
- "video":   the video features only;
- "audio":   + a projection of the viewpoint's audio feature;
- "context": + the audio feature and a projection of the viewpoint transformers' output
             (video and audio context, concatenated); a model without transformers gives the
             encoder features there.

Metrics, from a confusion matrix summed over every test pixel: pixel accuracy = correct /
all pixels; mIoU = mean over classes c of TP / (TP + FP + FN), over the classes that occur in
the ground truth or the prediction (a class absent from both has no defined IoU and is left
out, rather than counted as 0 or 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from avsa.downstream.heads import EpochLog, freeze, step
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.video import VideoEncoder
from avsa.train.objective import normalize_video, to_device

CONTEXTS = ("video", "audio", "context")


def stage_maps(encoder: VideoEncoder, video: torch.Tensor) -> list[torch.Tensor]:
    """video (N, 3, T, S, S) -> the four stage outputs (N, C_i, T_i, H_i, W_i), finest first."""
    x = encoder.stem(video)
    maps = []
    for stage in encoder.stages:
        x = stage(x)
        maps.append(x)
    return maps


class FPNHead(nn.Module):
    """maps [(N, C_i, H_i, W_i)] finest first, cond (N, D_c) or None -> logits (N, K+1, S, S)."""

    def __init__(self, in_channels: list[int], num_classes: int, dim: int = 64,
                 cond_dim: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.cond = nn.Linear(cond_dim, dim) if cond_dim else None
        self.classifier = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dim, num_classes, 1)
        )

    def forward(self, maps: list[torch.Tensor], size: int,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        p = self.lateral[-1](maps[-1])
        if self.cond is not None:
            if cond is None:
                raise ValueError("FPNHead: built with cond_dim but called without cond")
            p = p + self.cond(cond)[:, :, None, None]
        for lat, m in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            p = lat(m) + F.interpolate(p, size=m.shape[-2:], mode="nearest")
        return F.interpolate(self.classifier(p), size=(size, size), mode="bilinear",
                             align_corners=False)


def cond_dim(model: AVSANet, context: str) -> int:
    if context == "video":
        return 0
    if context == "audio":
        return model.audio_dim
    return model.audio_dim + model.video_dim + model.audio_dim


@torch.no_grad()
def frozen_inputs(model: AVSANet, batch: dict, context: str):
    """(stage maps averaged over time [(B V, C_i, H_i, W_i)], conditioning (B V, D_c) or None)."""
    video = normalize_video(batch["video"])
    b, v = video.shape[:2]
    raw = stage_maps(model.video_encoder, video.flatten(0, 1))
    maps = [m.mean(dim=2) for m in raw]
    if context == "video":
        return maps, None
    audio = model.encode_audio(batch["audio"].float())  # (B, V, Da)
    if context == "audio":
        return maps, audio.flatten(0, 1)
    video_feat = torch.amax(raw[-1], dim=(2, 3, 4)).view(b, v, -1)
    vctx, actx = model.context(video_feat, audio, batch.get("directions"))
    return maps, torch.cat((audio, vctx, actx), dim=-1).flatten(0, 1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; pred/target any shape."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.bincount(idx.cpu(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def pixel_accuracy(conf: torch.Tensor) -> float:
    total = int(conf.sum())
    return float(conf.diag().sum()) / total if total else float("nan")


def mean_iou(conf: torch.Tensor) -> float:
    """Mean IoU over classes present in the ground truth or the prediction (union > 0)."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if bool(present.any()) else float("nan")


def run_segmentation(
    model: AVSANet,
    source,
    *,
    num_classes: int,
    context: str,
    epochs: int,
    lr: float,
    max_steps: int = 0,
    device: torch.device,
    log_metrics: EpochLog | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train the FPN head on frozen features; returns test/pixel_acc and test/miou.

    num_classes counts the background: K + 1. Batches must hold masks (B, V, S, S) int64.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    torch.manual_seed(seed)
    model = freeze(model.to(device))
    enc = model.video_encoder
    channels = [stage[-1].out_bn.num_features for stage in enc.stages]
    head = FPNHead(channels, num_classes, dim=min(64, enc.out_dim), cond_dim=cond_dim(model, context))
    head = head.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps = 0
    for epoch in range(epochs):
        head.train()
        total, n = 0.0, 0
        for batch in source.train(epoch):
            b = to_device(batch, device)
            maps, cond = frozen_inputs(model, b, context)
            target = b["masks"].flatten(0, 1)
            logits = head(maps, target.shape[-1], cond)
            total += step(opt, F.cross_entropy(logits, target)) * len(target)
            n += len(target)
            steps += 1
            if max_steps and steps >= max_steps:
                break
        if n and log_metrics is not None:
            log_metrics({"train/loss": total / n}, epoch)
        if max_steps and steps >= max_steps:
            break
    if steps == 0:
        raise ShardError(source.train_uri, "segmentation: no training clips")

    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for batch in source.test(0):
            b = to_device(batch, device)
            maps, cond = frozen_inputs(model, b, context)
            target = b["masks"].flatten(0, 1)
            pred = head(maps, target.shape[-1], cond).argmax(1)
            conf += confusion_matrix(pred, target, num_classes)
    if int(conf.sum()) == 0:
        raise ShardError(source.test_uri, "segmentation: no test clips")
    return {"test/pixel_acc": pixel_accuracy(conf), "test/miou": mean_iou(conf),
            "test/classes_present": float(((conf.sum(0) + conf.sum(1)) > 0).sum())}
