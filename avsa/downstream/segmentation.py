"""360 semantic segmentation transfer (METHOD.md §6): an FPN head on frozen video features.

The frozen encoder's four stage maps (averaged over time) feed a feature pyramid (1x1
laterals, top-down nearest upsampling, 3x3 conv, ReLU, 1x1 classifier on the finest level,
upsampled to the crop): one map per crop against the crop's class map (0 = background) at the
centre of the window. Heads train at the finest level's resolution against the class map
sampled there (`map_logits`), as DeepLab trains against subsampled labels, and are scored at
the crop's. `downstream.context` adds conditioning to the coarsest level: "video"
none, "audio" the viewpoint's audio feature, "context" also the viewpoint transformers' video
and audio context (the encoder features for a model without transformers).

Nearly every pixel is background, so the cross-entropy is class-weighted (`class_weights`):
unweighted, heads settle on predicting background everywhere. mIoU averages over the classes
present in the ground truth or the prediction (stats.iou).
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avsa.config import DataConfig, DownstreamConfig
from avsa.downstream import stats
from avsa.downstream.fit import Cached, TransferHead, freeze
from avsa.downstream.sources import ShardSource
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.inputs import normalize_video, to_device

CONTEXTS = ("video", "audio", "context")
SEG_WEIGHTS = ("median", "inverse", "none")
EVAL_CHUNK = 64  # crops per forward pass when scoring held-out crops
OVERLAYS = 4  # test crops kept for the overlay figures of a transfer run


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
        logits = self.classifier(p)
        if logits.shape[-2:] == (size, size):
            return logits
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def cond_dim(model: AVSANet, context: str) -> int:
    """Width of the conditioning `encode_crops` gives for `context`."""
    extra = {"video": 0, "audio": model.audio_dim}
    return extra.get(context, 2 * model.audio_dim + model.video_dim)


@torch.no_grad()
def encode_crops(model: AVSANet, batch: dict, context: str) -> dict[str, torch.Tensor]:
    """One row per crop (B V) of a batch on device: the frozen encoder's four stage maps
    averaged over time, m0..m3 (B V, C_i, H_i, W_i) finest first, masks (B V, S, S) int64 and,
    unless context is "video", the conditioning cond (B V, D_c)."""
    video = normalize_video(batch["video"])
    b, v = video.shape[:2]
    enc = model.video_encoder
    raw = list(accumulate(enc.stages, lambda x, stage: stage(x),
                          initial=enc.stem(video.flatten(0, 1))))[1:]
    rows = {f"m{i}": m.mean(dim=2) for i, m in enumerate(raw)}
    rows["masks"] = batch["masks"].flatten(0, 1).long()
    if context == "video":
        return rows
    audio = model.encode_audio(batch["audio"].float())  # (B, V, Da)
    if context == "audio":
        return {**rows, "cond": audio.flatten(0, 1)}
    video_feat = torch.amax(raw[-1], dim=(2, 3, 4)).view(b, v, -1)
    vctx, actx = model.context(video_feat, audio, batch.get("directions"))
    return {**rows, "cond": torch.cat((audio, vctx, actx), dim=-1).flatten(0, 1)}


def overlay_examples(batch: dict, pred: torch.Tensor, masks: torch.Tensor) -> dict[str, np.ndarray]:
    """The first n = OVERLAYS test crops for overlay figures: mid-frame RGB (n, S, S, 3) uint8
    and the predicted and true masks (n, S, S) int16. pred, masks: (B V, S, S)."""
    video = batch["video"].flatten(0, 1)[:OVERLAYS].float()  # (n, 3, T, S, S)
    frame = video[:, :, video.shape[2] // 2].permute(0, 2, 3, 1)
    lo = frame.amin(dim=(1, 2, 3), keepdim=True)
    hi = frame.amax(dim=(1, 2, 3), keepdim=True)
    rgb = ((frame - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8)
    return {"overlay_image": rgb.cpu().numpy(),
            "overlay_pred": pred[:OVERLAYS].cpu().numpy().astype(np.int16),
            "overlay_mask": masks[:OVERLAYS].cpu().numpy().astype(np.int16)}


def crop_logits(head: FPNHead, rows: dict[str, torch.Tensor], size: int = 0) -> torch.Tensor:
    """(N, K+1, size, size) logits of the rows of `encode_crops`; size 0: the crop's, S."""
    maps = [rows[f"m{i}"] for i in range(len(head.lateral))]
    return head(maps, size or rows["masks"].shape[-1], rows.get("cond"))


def map_logits(head: FPNHead, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K+1, h, w) at the finest map's resolution and the class maps (N, h, w) int64
    sampled there (nearest): the training loss's pixels, a quarter of the crop's at stride 2."""
    h = rows["m0"].shape[-1]
    masks = F.interpolate(rows["masks"][:, None].float(), size=(h, h), mode="nearest")
    return crop_logits(head, rows, h), masks[:, 0].long()


def class_weights(masks: torch.Tensor, num_classes: int, kind: str = "median") -> torch.Tensor:
    """(C,) float32 cross-entropy weights from the training masks' pixel counts per class.

    freq_c = pixels of class c / all pixels, over the classes that occur (background included);
    "median": median(freq) / freq_c (median-frequency balancing); "inverse": 1 / (n freq_c)
    with n the classes that occur, so a balanced set weighs 1 everywhere; "none": all 1.
    Classes absent from the masks weigh 0 (no target pixel has them).
    """
    if kind not in SEG_WEIGHTS:
        raise ValueError(f"class weights must be one of {SEG_WEIGHTS}, got {kind!r}")
    if kind == "none":
        return torch.ones(num_classes)
    counts = torch.bincount(masks.reshape(-1).long().cpu(), minlength=num_classes).double()
    present = counts > 0
    freq = counts / counts.sum().clamp_min(1)
    ref = torch.quantile(freq[present], 0.5) if kind == "median" else 1 / present.sum()
    w = torch.where(present, ref / freq.clamp_min(1e-12), torch.zeros_like(freq))
    return w.float()


def segmentation_metrics(conf: np.ndarray) -> dict[str, float]:
    """The test metrics of a confusion matrix (C, C) summed over every test pixel (rows the
    truth), beside those of predicting background (class 0) everywhere (*_bg_only)."""
    bg = np.zeros_like(conf)
    bg[:, 0] = conf.sum(1)
    return {"test/pixel_acc": float(stats.pixel_accuracy(conf)),
            "test/miou": float(stats.iou(conf)),
            "test/miou_fg": float(stats.iou(conf, foreground=True)),
            "test/miou_bg_only": float(stats.iou(bg)),
            "test/miou_fg_bg_only": float(stats.iou(bg, foreground=True)),
            "test/classes_present": float(((conf.sum(0) + conf.sum(1)) > 0).sum())}


class SegmentationTask(TransferHead):
    """The FPN head on cached frozen crop features, its cross-entropy weighted by
    `class_weights(kind=weights)` of the training crops (not the held-out ones).

    num_classes counts the background: K + 1 for the source's K classes; batches hold masks
    (B, V, S, S) int64. Scores: `segmentation_metrics`; examples gets the (N, C, C) confusion
    matrix of every test crop, the clip of each ("confusion_unit": a clip's V crops share one)
    and the overlays of the first test batch.
    """

    name = "segmentation"
    # at 1e-3 the heads on these cached crops stopped after about 45 epochs, at 3e-3 after
    # about 32, with the same foreground mIoU (reproduction clips, four cells each)
    default_lr = 3e-3

    def __init__(self, model: AVSANet, source, ds: DownstreamConfig, device: torch.device):
        if ds.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {ds.context!r}")
        self.model = freeze(model.to(device))
        enc = model.video_encoder
        channels = [stage[-1].out_bn.num_features for stage in enc.stages]
        self.num_classes = source.num_classes + 1
        # half the encoder's width, at most 64 (the full model's): the 3x3 conv at the finest
        # level is most of a head's cost
        self.module = FPNHead(channels, self.num_classes, dim=min(64, enc.out_dim // 2),
                              cond_dim=cond_dim(model, ds.context)).to(device)
        self.context, self.weights, self.device = ds.context, ds.seg_class_weights, device
        self.w = torch.ones(self.num_classes, device=device)

    @classmethod
    def source(cls, data: DataConfig, ds: DownstreamConfig, memo: dict | None) -> ShardSource:
        return ShardSource.from_config(data, ds.batch_size, with_masks=True, memo=memo)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        return encode_crops(self.model, to_device(batch, self.device), self.context)

    def prepare(self, train: Cached, fit: Cached, val: Cached) -> None:
        self.w = class_weights(fit.tensors["masks"], self.num_classes, self.weights).to(self.device)

    def loss(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, masks = map_logits(self.module, rows)
        return F.cross_entropy(logits, masks, weight=self.w)

    def val_loss(self, val: Cached) -> float:
        """Pixel-weighted over the held-out crops, in chunks of EVAL_CHUNK."""
        num = den = 0.0
        for i in range(0, len(val), EVAL_CHUNK):
            chunk = torch.arange(i, min(i + EVAL_CHUNK, len(val)))
            logits, masks = map_logits(self.module, val.take(chunk))
            part = self.w[masks].sum()
            num += float(F.cross_entropy(logits, masks, weight=self.w) * part)
            den += float(part)
        return num / den if den else float("nan")

    def score(self, source, examples: dict | None) -> dict[str, float]:
        self.module.eval()
        confs, clips, seen = [], [], 0
        with torch.no_grad():
            for batch in source.test(0):
                rows = self.encode(batch)
                pred = crop_logits(self.module, rows).argmax(1)
                confs.append(stats.confusions(rows["masks"].cpu().numpy(), pred.cpu().numpy(),
                                              self.num_classes))
                b, v = batch["video"].shape[:2]
                clips.append(seen + np.arange(b).repeat(v))
                seen += b
                if examples is not None and not confs[1:]:
                    examples.update(overlay_examples(batch, pred, rows["masks"]))
        if not confs:
            raise ShardError(source.test_uri, "segmentation: no test clips")
        per_crop = np.concatenate(confs)
        if examples is not None:
            examples["confusion"] = per_crop.astype(np.int32)
            examples["confusion_unit"] = np.concatenate(clips)
        return segmentation_metrics(per_crop.sum(0))
