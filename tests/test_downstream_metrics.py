"""Action and segmentation transfer: metrics on hand-computed examples, heads' shapes."""

from __future__ import annotations

import math

import pytest
import torch
from presets import tiny_model
from torch.nn import functional as F

from avsa.config import DownstreamConfig
from avsa.downstream import stats
from avsa.downstream.action import (
    ActionNet,
    action_loss,
    clip_video_hits,
    is_single_label,
    majority_class,
    milestones,
    score,
    top1_hits,
)
from avsa.downstream.fit import fit_head, minibatches
from avsa.downstream.run import run_task
from avsa.downstream.segmentation import (
    FPNHead,
    class_weights,
    cond_dim,
    crop_logits,
    encode_crops,
    map_logits,
    segmentation_metrics,
)


def clip_video_accuracy(keys, logits, targets) -> tuple[float, float]:
    """(clip@1, video@1): the mean hits of `clip_video_hits`."""
    clip, video, _ = clip_video_hits(keys, logits, targets)
    return float(clip.double().mean()), float(video.double().mean())


def confusion_matrix(pred, target, num_classes):
    """The (C, C) confusion matrix of all pixels, as one crop's."""
    return stats.confusions(target[None].numpy(), pred[None].numpy(), num_classes)[0]


def test_clip_and_video_accuracy_on_known_logits():
    keys = ["a", "a", "b", "b", "c"]
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 1], [0, 0, 1]]).float()
    logits = torch.tensor([
        [2.0, 0, 0],  # a: hit
        [0, 3.0, 0],  # a: miss; mean softmax of a picks class 1 -> video a misses
        [0, 0, 1.0],  # b: class 2 is one of b's labels -> hit
        [0.5, 0, 0],  # b: miss; mean softmax (.33, .24, .43) picks class 2 -> video b hits
        [0, 0, 1.0],  # c: hit
    ])
    clip, video = clip_video_accuracy(keys, logits, targets)
    assert clip == pytest.approx(3 / 5)
    assert video == pytest.approx(2 / 3)


def test_single_label_top1_and_the_majority_baseline():
    keys = ["a", "b", "c", "d"]
    targets = torch.eye(3)[[0, 1, 1, 2]]
    logits = torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [3.0, 0, 0], [0, 0, 1.0]])
    assert is_single_label(targets) and not is_single_label(torch.tensor([[1.0, 1.0]]))
    assert not is_single_label(torch.zeros(0, 3))
    train = torch.eye(3)[[2, 1, 2, 0, 1, 2]]  # class 2 is labelled most often
    assert majority_class(train) == 2
    assert majority_class(torch.eye(3)[[1, 0]]) == 0  # a tie goes to the lowest index
    examples = {}
    m = score(keys, logits, targets, majority_class(train), examples)
    assert m["test/clip_acc"] == 0.75  # top-1: c is wrong
    assert m["test/majority_clip_acc"] == 0.25  # only d is class 2
    assert m["test/majority_video_acc"] == 0.25 and m["test/videos"] == 4
    assert examples["clip_acc"].tolist() == [1, 1, 0, 1]


def test_multi_label_keeps_the_hit_if_top_class_is_a_label_metric():
    keys = ["a", "a", "b"]
    targets = torch.tensor([[1.0, 1.0, 0], [1.0, 1.0, 0], [0, 1.0, 1.0]])
    logits = torch.tensor([[0, 2.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    clip, video, _ = clip_video_hits(keys, logits, targets)
    assert clip.tolist() == [True, False, True] and video.tolist() == [True, True]
    m = score(keys, logits, targets, majority=1)
    assert m["test/majority_clip_acc"] == 1.0  # class 1 is a label of every clip


class _ActionSource:
    """Single-label clips: 10 training clips (class 2 six times), 4 test clips (one class 2)."""

    train_uri = test_uri = "stub"
    num_classes = 3

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.split = {"train": [2, 2, 0, 2, 1, 2, 2, 0, 1, 2], "test": [0, 1, 2, 1]}
        self.video = {k: torch.randint(0, 255, (len(v), 1, 3, 2, 16, 16), generator=gen,
                                       dtype=torch.uint8) for k, v in self.split.items()}

    def _batches(self, split):
        labels = torch.eye(3)[self.split[split]]
        for i in range(0, len(labels), 4):
            yield {"video": self.video[split][i : i + 4], "labels": labels[i : i + 4],
                   "key": [f"{split}{j}" for j in range(i, min(i + 4, len(labels)))]}

    def train(self, epoch):
        return self._batches("train")

    def train_labels(self):
        return torch.eye(3)[self.split["train"]]

    def test(self, pass_index=0):
        return self._batches("test")


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_action_reports_the_majority_class_beside_its_accuracy(mode):
    examples, losses = {}, []
    ds = DownstreamConfig(task="action", mode=mode, epochs=3, eval_clips=2,
                          val_fraction=0.2, patience=2)
    m = run_task(ds, tiny_model(), _ActionSource(), seed=0, device=torch.device("cpu"),
                 examples=examples, log=lambda metrics, step: losses.append(metrics["train/loss"]))
    assert m["test/majority_clip_acc"] == 0.25 and m["test/majority_video_acc"] == 0.25
    # single-label clips train with cross-entropy in both protocols: about ln 3 at the start,
    # where the per-class binary cross-entropy would start near ln 2
    assert m["test/single_label"] == 1.0 and losses[0] > 0.95
    assert m["test/videos"] == 4 and examples["clip_acc"].shape == (8,)
    # two windows of each of the 4 test videos: a video's windows are resampled together
    assert examples["clip_acc_unit"].tolist() == [0, 1, 2, 3] * 2
    assert 0.0 <= m["test/clip_acc"] <= 1.0 and examples["video_acc"].shape == (4,)
    assert m["train/lr"] == (1e-3 if mode == "linear" else 1e-4)  # each protocol's default


def test_a_linear_probe_learns_from_features_of_any_scale():
    # random-init encoders give features of ~1e-2; unstandardised, a probe at any sane learning
    # rate barely moves its logits before early stopping ends it
    net = ActionNet(tiny_model().video_encoder, 8, finetune=False)
    dim = net.head[-1].in_features
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat(16)
    centres = torch.randn(8, dim, generator=gen)
    x = 1e-3 * (centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=gen))
    fit_head(net.head, lambda idx: action_loss(net.head(x[idx]), F.one_hot(labels[idx], 8), True),
             lambda epoch: minibatches(len(x), 16, gen), epochs=30, lr=1e-3)
    net.head.eval()
    assert (net.head(x).argmax(-1) == labels).float().mean() > 0.95


def test_video_accuracy_averages_probabilities_not_votes():
    # one very confident right window outweighs two mildly wrong ones (a vote would miss)
    keys = ["v", "v", "v"]
    targets = torch.tensor([[1.0, 0.0]] * 3)
    logits = torch.tensor([[8.0, 0.0], [0.0, 0.5], [0.0, 0.5]])
    clip, video = clip_video_accuracy(keys, logits, targets)
    assert clip == pytest.approx(1 / 3) and video == 1.0


def test_clip_video_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        clip_video_accuracy(["a"], torch.zeros(2, 3), torch.zeros(2, 3))
    assert all(math.isnan(v) for v in clip_video_accuracy([], torch.zeros(0, 3),
                                                          torch.zeros(0, 3)))


def test_top1_hits_and_losses():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    multi = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert top1_hits(logits, multi).tolist() == [True, False]
    onehot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    assert action_loss(logits, onehot, single_label=True) == pytest.approx(float(ce))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, multi)
    assert action_loss(logits, multi, single_label=False) == pytest.approx(float(bce))


def test_lr_milestones_follow_the_paper_schedule():
    assert milestones(20) == [8, 12, 16]
    assert milestones(1) == []
    assert milestones(5) == [2, 3, 4]


def test_linear_mode_freezes_the_encoder_and_finetune_trains_it():
    video = torch.randint(0, 255, (2, 3, 3, 2, 16, 16), dtype=torch.uint8)
    for finetune in (False, True):
        net = ActionNet(tiny_model().video_encoder, 5, finetune=finetune).train()
        logits = net(video)
        assert logits.shape == (2, 5)
        logits.sum().backward()
        enc_grads = [p.grad for p in net.encoder.parameters()]
        assert all(g is not None for g in enc_grads) == finetune
        assert net.encoder.training == finetune
        assert net.head[1].weight.grad is not None


def test_pixel_accuracy_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert stats.pixel_accuracy(conf) == pytest.approx(4 / 6)
    # IoU: class 0 1/3, class 1 2/3, class 2 1/2; class 3 occurs nowhere and is left out
    assert stats.iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_class_weights_from_known_masks():
    masks = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 3]])  # pixels: 6, 2, 0, 1 of 9
    w = class_weights(masks, 4, "median")  # median of the present frequencies: 2/9
    assert w.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 2.0])
    assert class_weights(masks, 4, "inverse").tolist() == pytest.approx([0.5, 1.5, 0.0, 3.0])
    assert class_weights(masks, 4, "none").tolist() == [1.0] * 4
    balanced = torch.arange(4).repeat(5)
    assert class_weights(balanced, 4, "inverse").tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(ValueError):
        class_weights(masks, 4, "sqrt")


def test_foreground_miou_and_the_all_background_level():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, target, 4)
    assert stats.iou(conf, foreground=True) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # predicting background everywhere: [[2, 0, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0], [0] * 4]
    m = segmentation_metrics(conf)
    assert m["test/miou_bg_only"] == pytest.approx((2 / 6 + 0 + 0) / 3)
    assert m["test/miou_fg_bg_only"] == 0.0
    assert m["test/miou_fg"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["test/classes_present"] == 3 and m["test/pixel_acc"] == pytest.approx(4 / 6)
    per_crop = stats.confusions(target.view(2, 1, 3).numpy(), pred.view(2, 1, 3).numpy(), 4)
    assert per_crop.shape == (2, 4, 4) and (per_crop.sum(0) == conf).all()
    assert per_crop[0].tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_miou_counts_a_class_that_only_the_prediction_has():
    target = torch.zeros(4, dtype=torch.long)
    pred = torch.tensor([0, 0, 0, 3])
    conf = confusion_matrix(pred, target, 5)
    assert stats.iou(conf) == pytest.approx((3 / 4 + 0.0) / 2)
    assert stats.pixel_accuracy(conf) == pytest.approx(3 / 4)
    assert math.isnan(stats.iou(torch.zeros(3, 3, dtype=torch.long)))


@pytest.mark.parametrize("context", ["video", "audio", "context"])
def test_fpn_head_predicts_every_pixel_of_the_crop(context):
    torch.manual_seed(0)
    model = tiny_model().eval()
    batch = {"video": torch.randint(0, 255, (2, 3, 3, 2, 16, 16), dtype=torch.uint8),
             "audio": torch.randn(2, 3, 4, 16, 16), "directions": torch.zeros(2, 3, 2),
             "masks": torch.zeros(2, 3, 16, 16, dtype=torch.long)}
    rows = encode_crops(model, batch, context)
    maps, cond = [rows[f"m{i}"] for i in range(4)], rows.get("cond")
    assert [m.shape[1:] for m in maps] == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]
    assert (cond is None) == (context == "video")
    if cond is not None:
        assert cond.shape == (6, cond_dim(model, context))
    head = FPNHead([8, 16, 32, 64], 9, dim=16, cond_dim=cond_dim(model, context))
    assert head(maps, 16, cond).shape == (6, 9, 16, 16)


def test_heads_train_on_the_finest_map_with_the_class_map_sampled_there():
    torch.manual_seed(0)
    model = tiny_model().eval()
    masks = torch.arange(8).repeat_interleave(2).expand(16, 16)  # class = column // 2
    batch = {"video": torch.randint(0, 255, (1, 2, 3, 2, 16, 16), dtype=torch.uint8),
             "audio": torch.randn(1, 2, 4, 16, 16), "masks": masks.expand(1, 2, 16, 16)}
    rows = encode_crops(model, batch, "video")
    head = FPNHead([8, 16, 32, 64], 9, dim=16)
    logits, sampled = map_logits(head, rows)
    assert logits.shape == (2, 9, 8, 8)
    assert sampled.dtype == torch.long
    assert sampled.tolist() == [[list(range(8))] * 8] * 2
    full = crop_logits(head, rows)  # what scoring sees: the same logits, upsampled
    assert torch.allclose(full, F.interpolate(logits, size=(16, 16), mode="bilinear"))
