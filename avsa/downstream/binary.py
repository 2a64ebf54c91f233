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

Each split is encoded once (the training split over `feature_passes` augmented passes, each
with its own windows, viewpoints and misalignments) and the head trains on the cached features;
a minibatch is a set of clips, and AVC-Bin pairs each with the next clip of its minibatch.

test/acc is the accuracy over all test examples: 2 x clips x viewpoints for AVC-Bin (negatives
roll over the whole test set, so no clip is paired with itself), clips x viewpoints for AVSA-Bin.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avsa.downstream.fit import EpochLog, fit_head, holdout, minibatches
from avsa.downstream.heads import (
    PairHead,
    accuracy,
    encode_passes,
    freeze,
    frozen_features,
    predict,
)
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.inputs import to_device

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
    x, y = make_pairs(task, rows["video"], rows["audio"], rows["aligned"])
    if task == "avc_bin" and "clip" in rows:
        other = rows["clip"] != rows["clip"].roll(-1)
        keep = torch.cat((torch.ones_like(other), other)).repeat_interleave(rows["video"].shape[1])
        x, y = x[keep], y[keep]
    return F.cross_entropy(head(x), y)


def run_binary(
    task: str,
    model: AVSANet,
    source,
    *,
    epochs: int,
    lr: float,
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
    """Encode `feature_passes` passes of `source.train(p)` and `source.test(0)` once, train the
    pair head on the cached training clips (minibatches of `batch_size` clips, shuffled by
    `seed`) and score it on the test clips.

    `val_fraction` of the training clips (by key) are held out: the head keeps its epoch of
    lowest loss on them, stopping after `patience` epochs without improvement. Returns
    {"test/acc", "test/examples", "train/acc", "train/best_epoch", "train/epochs"}; the test
    hit of every example goes to examples["acc"] when `examples` is given.
    """
    if task not in TASKS:
        raise ValueError(f"not a binary task: {task!r}")
    torch.manual_seed(seed)
    model = freeze(model.to(device))
    use_context = model.video_transformer is not None
    head = PairHead(model.video_dim + model.audio_dim).to(device)

    def encode(batch):
        return encode_clips(model, to_device(batch, device), use_context)

    train = encode_passes(source.train, feature_passes, encode)
    if train is None or (task == "avc_bin" and len(train) < 2):
        raise ShardError(source.train_uri, f"{task}: no training batch (need >= 2 clips)")
    ids = {k: i for i, k in enumerate(dict.fromkeys(train.keys))}
    train.tensors["clip"] = torch.tensor([ids[k] for k in train.keys], device=device)
    held = holdout(train.keys, val_fraction, min_keys=2 if task == "avc_bin" else 1)
    fit, val = train.subset(~held), train.subset(held)
    gen = torch.Generator().manual_seed(seed)
    result = fit_head(
        head, lambda idx: pair_loss(task, head, fit.take(idx)),
        lambda epoch: minibatches(len(fit), batch_size, gen),
        epochs=epochs, lr=lr, max_steps=max_steps, patience=patience, log=log_metrics,
        validate=(lambda: float(pair_loss(task, head, val.tensors))) if len(val) else None)
    if result.steps == 0:
        raise ShardError(source.train_uri, f"{task}: no training batch (need >= 2 clips)")

    test = encode_passes(lambda p: source.test(0), 1, encode)
    if test is None or (task == "avc_bin" and len(test) < 2):
        raise ShardError(source.test_uri, f"{task}: the test split needs at least 2 clips")
    x, y = make_pairs(task, *(test.tensors[k] for k in ("video", "audio", "aligned")))
    guess = predict(head, x).argmax(-1)
    hits = guess == y
    if examples is not None:
        examples["acc"] = hits.cpu().numpy().astype(np.uint8)
        examples["target"] = y.cpu().numpy().astype(np.int16)  # for the confusion matrix
        examples["pred"] = guess.cpu().numpy().astype(np.int16)
    fx, fy = make_pairs(task, *(fit.tensors[k] for k in ("video", "audio", "aligned")))
    return {"test/acc": float(hits.float().mean()), "test/examples": float(len(y)),
            "train/acc": accuracy(predict(head, fx), fy),
            "train/best_epoch": float(result.best_epoch), "train/epochs": float(result.epochs)}
