"""The pair head, cached encodings and the binary tasks (AVC-Bin, AVSA-Bin) on tensors with
known answers."""

from __future__ import annotations

import pytest
import torch
from presets import tiny_model
from torch import nn

from avsa.config import DownstreamConfig
from avsa.downstream.binary import (
    accuracy,
    clip_decisions,
    make_pairs,
    pair_head,
    pair_loss,
    predict,
)
from avsa.downstream.fit import encode_passes, fit_head, freeze, minibatches
from avsa.downstream.run import run_task


def test_pair_head_matches_the_paper_shape():
    head = pair_head(1024)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Linear"]
    assert head[0].p == 0.5
    assert (head[1].in_features, head[1].out_features) == (1024, 512)
    assert head[3].out_features == 2


def test_head_reaches_accuracy_one_on_separable_features():
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 16
    y = torch.arange(n) % 2
    direction = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen) * 0.3 + (2 * y[:, None] - 1) * direction
    head = pair_head(d)
    logged = []
    gen = torch.Generator().manual_seed(0)
    res = fit_head(head, lambda i: nn.functional.cross_entropy(head(x[i]), y[i]),
                   lambda epoch: minibatches(n, 32, gen), epochs=20, lr=1e-3,
                   log=lambda m, s: logged.append((s, m["train/loss"])))
    assert accuracy(predict(head, x), y) == 1.0
    assert res.train_loss[-1] < res.train_loss[0] / 4
    assert (res.epochs, res.steps, res.best_epoch) == (20, 40, 19)
    assert [s for s, _ in logged] == list(range(20))


def test_accuracy_counts_top1():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_avc_pairs_roll_audio_to_the_next_clip():
    video = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 1)  # clip i, 2 viewpoints
    audio = 10 + torch.arange(3.0).view(3, 1, 1).expand(3, 2, 1)
    x, y = make_pairs("avc_bin", {"video": video, "audio": audio})
    assert x.shape == (12, 2) and y.tolist() == [1] * 6 + [0] * 6
    assert x[:6].tolist() == [[0, 10], [0, 10], [1, 11], [1, 11], [2, 12], [2, 12]]
    assert x[6:].tolist() == [[0, 11], [0, 11], [1, 12], [1, 12], [2, 10], [2, 10]]


def test_avsa_pairs_label_every_viewpoint_with_its_clip():
    video, audio = torch.zeros(2, 3, 4), torch.ones(2, 3, 5)
    x, y = make_pairs("avsa_bin", {"video": video, "audio": audio,
                                   "aligned": torch.tensor([1, 0])})
    assert x.shape == (6, 9)
    assert y.tolist() == [1, 1, 1, 0, 0, 0]


def test_clip_decisions_average_the_softmax_over_a_clips_viewpoints():
    # clip 0 (label 1): one confident wrong view outvotes two unsure right ones -> miss;
    # clip 1 (label 0): two of three views wrong, but the right one is confident -> hit
    logits = torch.tensor([[0.0, 0.2], [0.0, 0.2], [5.0, 0.0],
                           [0.0, 0.3], [0.0, 0.3], [6.0, 0.0]])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    assert accuracy(logits, labels) == pytest.approx(3 / 6)
    assert clip_decisions(logits, labels, views=3).tolist() == [False, True]
    assert clip_decisions(logits, labels, views=1).tolist() == (logits.argmax(-1) == labels).tolist()


def test_freeze_stops_gradients_and_batchnorm_updates():
    model = freeze(tiny_model())
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


class _StubNet(nn.Module):
    """Stands in for a frozen AVSANet: the video feature is each crop's mean brightness (x4),
    the audio feature the mean spectrum over channels and frames (8 mel bins)."""

    video_transformer = None
    video_dim, audio_dim = 4, 8

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)  # freeze() needs parameters to switch off

    def encode_video(self, video):
        return video.mean(dim=(2, 3, 4, 5))[..., None].expand(-1, -1, 4)

    def encode_audio(self, audio):
        return audio.mean(dim=(2, 3))

    def context(self, video, audio, directions=None):
        return video, audio


class _StubSource:
    """8 clips: even clips are bright with low-bin audio, odd ones dark with high-bin audio;
    with `misalign`, `aligned` runs 1, 1, 0, 0, ... and a 0 swaps the audio band."""

    train_uri = test_uri = "stub"

    def __init__(self, clips: int = 8, batch: int = 8, misalign: bool = False):
        self.keys = [f"clip-{i}" for i in range(clips)]
        gen = torch.Generator().manual_seed(1)
        bright = torch.arange(clips) % 2 == 0
        self.aligned = (torch.arange(clips) // 2 + 1) % 2 if misalign else torch.ones(clips).long()
        level = torch.where(bright, 200, 40).view(-1, 1, 1, 1, 1, 1)
        self.video = (level + torch.randint(0, 10, (clips, 2, 3, 1, 4, 4), generator=gen)).to(
            torch.uint8)
        low = (torch.arange(8) < 4)[None]
        band = torch.where((bright == self.aligned.bool())[:, None], low, ~low).float()
        self.audio = 3.0 * band[:, None, None, None, :] + 0.1 * torch.randn(
            clips, 2, 4, 5, 8, generator=gen)
        self.batch = batch

    def _batches(self):
        for i in range(0, len(self.video), self.batch):
            s = slice(i, i + self.batch)
            yield {"video": self.video[s], "audio": self.audio[s],
                   "directions": torch.zeros(len(self.video[s]), 2, 2),
                   "aligned": self.aligned[s], "key": self.keys[s]}

    def train(self, epoch):
        return self._batches()

    def test(self, pass_index=0):
        return self._batches()


def run_binary(task, model, source, *, log=None, examples=None, **settings):
    """The task through the registry, without held-out clips unless `settings` hold some."""
    ds = DownstreamConfig(task=task, **{"val_fraction": 0.0, "patience": 0, **settings})
    return run_task(ds, model, source, seed=0, device=torch.device("cpu"), log=log,
                    examples=examples)


@pytest.mark.parametrize("task", ["avc_bin", "avsa_bin"])
def test_binary_head_learns_a_relation_carried_by_the_features(task):
    torch.manual_seed(0)
    logged = []
    metrics = run_binary(task, _StubNet(), _StubSource(misalign=task == "avsa_bin"), epochs=60,
                         lr=3e-3, log=lambda m, s: logged.append(s))
    assert metrics["test/acc"] == 1.0
    # AVC-Bin: 8 clips x 2 viewpoints, positives and rolled negatives; AVSA-Bin: one each
    assert metrics["test/examples"] == (32 if task == "avc_bin" else 16)
    assert logged == list(range(60))


def test_max_steps_caps_training():
    logged = []
    run_binary("avc_bin", _StubNet(), _StubSource(batch=4), epochs=5, lr=1e-3, max_steps=3,
               batch_size=4, log=lambda m, s: logged.append(s))
    assert logged == [0, 1]  # 2 steps in epoch 0, the third ends epoch 1


def test_held_out_clips_stop_training_early_and_results_are_per_example():
    examples = {}
    metrics = run_binary("avsa_bin", _StubNet(), _StubSource(clips=16, misalign=True),
                         epochs=500, lr=3e-3, batch_size=4, val_fraction=0.25, patience=5,
                         examples=examples)
    assert metrics["test/acc"] == 1.0
    assert 5 < metrics["train/epochs"] < 500  # the held-out loss stopped improving
    assert metrics["train/best_epoch"] == metrics["train/epochs"] - 6
    assert examples["acc"].shape == (32,) and examples["acc"].all()


def test_encode_passes_keys_every_row_by_its_clip():
    source = _StubSource(clips=3, batch=2)
    cached = encode_passes(lambda p: source.train(p), 2,
                           lambda b: {"clip": b["video"][:, 0, 0, 0, 0, 0].float(),
                                      "view": b["audio"].flatten(0, 1)})
    assert cached.tensors["clip"].shape == (6,) and cached.tensors["view"].shape[0] == 12
    assert cached.keys == ["clip-0", "clip-1", "clip-2"] * 2
    # rows that are viewpoints take their clip's key, clip-major (V = 2)
    views = encode_passes(lambda p: source.train(p), 1,
                          lambda b: {"view": b["audio"].flatten(0, 1)})
    assert views.keys == ["clip-0", "clip-0", "clip-1", "clip-1", "clip-2", "clip-2"]
    assert encode_passes(lambda p: iter(()), 3, lambda b: {}) is None


def test_avc_negatives_from_another_pass_of_the_same_clip_are_dropped():
    torch.manual_seed(0)
    rows = {"video": torch.randn(3, 2, 4), "audio": torch.randn(3, 2, 4),
            "aligned": torch.ones(3, dtype=torch.long), "clip": torch.tensor([0, 1, 0])}
    head = pair_head(8).eval()
    x, y = make_pairs("avc_bin", rows)
    # clip 2 is clip 0 again: its "negative" (audio of the next row, clip 0) is dropped
    expected = nn.functional.cross_entropy(head(x[:10]), y[:10])
    assert torch.allclose(pair_loss("avc_bin", head, rows), expected)
    full = nn.functional.cross_entropy(head(x), y)
    assert torch.allclose(pair_loss("avc_bin", head, {**rows, "clip": torch.arange(3)}), full)
