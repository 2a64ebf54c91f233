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
from avsa.downstream.fit import Cached, TransferHead, encode_passes, freeze
from avsa.downstream.sources import ShardSource
from avsa.errors import ShardError
from avsa.models import AVSANet
from avsa.models.inputs import normalize_video, to_device

MISALIGN_PROB = 0.5


def pair_head(in_dim: int) -> nn.Sequential:
    """METHOD.md §6 binary head: (..., in_dim) concatenated (video, audio) features ->
    Dropout 0.5 -> Linear(in_dim, 512) -> ReLU -> Linear(512, 2) -> (..., 2) logits."""
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(in_dim, 512), nn.ReLU(inplace=True),
                         nn.Linear(512, 2))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits (N, C) against class indices (N,); nan for N = 0."""
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def predict(head: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `head` in eval mode over (N, D) features, in chunks."""
    head.eval()
    return torch.cat([head(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def make_pairs(task: str, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of the clips in `rows` (see `encode_clips`): video (B, V, Dv), audio
    (B, V, Da), aligned (B,) 1/0 -> x (N, Dv + Da), y (N,) int64.

    AVSA-Bin: the B V pairs, each labelled with its clip's `aligned`. AVC-Bin (B >= 2): first
    the B V positives (label 1), then the B V negatives (audio of clip (i + 1) mod B).
    """
    video, audio = rows["video"], rows["audio"]
    x = torch.cat((video, audio), dim=-1).flatten(0, 1)
    if task == "avsa_bin":
        return x, rows["aligned"].long().repeat_interleave(video.shape[1])
    if len(video) < 2:
        raise ValueError("avc_bin pairs need at least 2 clips")
    neg = torch.cat((video, audio.roll(-1, dims=0)), dim=-1).flatten(0, 1)
    y = torch.cat((torch.ones(len(x)), torch.zeros(len(neg)))).long().to(video.device)
    return torch.cat((x, neg)), y


def clip_decisions(logits: torch.Tensor, labels: torch.Tensor, views: int) -> torch.Tensor:
    """One decision per clip (the paper's "4 viewpoints averaged"): hits (N / V,) bool of the
    softmax averaged over each run of `views` consecutive examples, as `make_pairs` lays a
    clip's viewpoints out, against its label. logits (N, 2), labels (N,)."""
    probs = logits.softmax(-1).view(-1, views, logits.shape[-1]).mean(1)
    return probs.argmax(-1) == labels.view(-1, views)[:, 0]


@torch.no_grad()
def encode_clips(model: AVSANet, batch: dict) -> dict[str, torch.Tensor]:
    """One row per clip of a batch on device: the frozen model's per-viewpoint features
    (its viewpoint transformers' context when it has them) video (B, V, Dv), audio (B, V, Da)
    and aligned (B,) (1 without the key).

    batch: video (B, V, 3, T, S, S) uint8, audio (B, V, C, F, M), directions (B, V, 2).
    """
    video = model.encode_video(normalize_video(batch["video"]))
    audio = model.encode_audio(batch["audio"].float())
    video, audio = model.context(video, audio, batch.get("directions"))
    aligned = batch.get("aligned")
    if aligned is None:
        aligned = torch.ones(len(video), dtype=torch.long, device=video.device)
    return {"video": video, "audio": audio, "aligned": aligned.long()}


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
    test/clip_acc decides once per clip (and per negative clip pair) from its viewpoints'
    averaged softmax (`clip_decisions`); train/acc is over the training rows; examples gets
    each test hit ("acc", "clip_acc") with the clip it belongs to ("acc_unit",
    "clip_acc_unit": an AVC-Bin negative belongs to its video's clip), target and prediction.
    """

    def __init__(self, model: AVSANet, source, ds: DownstreamConfig, device: torch.device):
        self.name, self.device = ds.task, device
        self.model = freeze(model.to(device))
        self.module = pair_head(model.video_dim + model.audio_dim).to(device)
        self.min_rows = self.min_keys = 2 if ds.task == "avc_bin" else 1
        self.fit_rows: Cached | None = None

    @classmethod
    def source(cls, data: DataConfig, ds: DownstreamConfig, memo: dict | None) -> ShardSource:
        """AVSA-Bin's clips have their sound field yawed with probability MISALIGN_PROB."""
        prob = MISALIGN_PROB if ds.task == "avsa_bin" else 0.0
        return ShardSource.from_config(data, ds.batch_size, misalign_prob=prob, memo=memo)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        return encode_clips(self.model, to_device(batch, self.device))

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
        logits = predict(self.module, x)
        guess = logits.argmax(-1)
        hits = guess == y
        clips, views = test.tensors["video"].shape[:2]
        clip_hits = clip_decisions(logits, y, views)
        if examples is not None:
            examples["acc"] = hits.cpu().numpy().astype(np.uint8)
            examples["acc_unit"] = np.arange(len(hits)) // views % clips
            examples["clip_acc"] = clip_hits.cpu().numpy().astype(np.uint8)
            examples["clip_acc_unit"] = np.arange(len(clip_hits)) % clips
            examples["target"] = y.cpu().numpy().astype(np.int16)  # for the confusion matrix
            examples["pred"] = guess.cpu().numpy().astype(np.int16)
        fx, fy = make_pairs(self.name, self.fit_rows.tensors)
        return {"test/acc": float(hits.float().mean()), "test/examples": float(len(y)),
                "test/clip_acc": float(clip_hits.float().mean()),
                "train/acc": accuracy(predict(self.module, fx), fy)}
