"""Action and segmentation transfer: metrics on hand-computed examples, heads' shapes."""

from __future__ import annotations

import math

import pytest
import torch

from avsa.downstream.action import (
    ActionNet,
    action_loss,
    clip_video_accuracy,
    milestones,
    top1_hits,
)
from avsa.downstream.segmentation import (
    FPNHead,
    cond_dim,
    confusion_matrix,
    frozen_inputs,
    mean_iou,
    pixel_accuracy,
)
from avsa.models import build_model


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
        net = ActionNet(build_model("tiny").video_encoder, 5, finetune=finetune).train()
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
    assert pixel_accuracy(conf) == pytest.approx(4 / 6)
    # IoU: class 0 1/3, class 1 2/3, class 2 1/2; class 3 occurs nowhere and is left out
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_miou_counts_a_class_that_only_the_prediction_has():
    target = torch.zeros(4, dtype=torch.long)
    pred = torch.tensor([0, 0, 0, 3])
    conf = confusion_matrix(pred, target, 5)
    assert mean_iou(conf) == pytest.approx((3 / 4 + 0.0) / 2)
    assert pixel_accuracy(conf) == pytest.approx(3 / 4)
    assert math.isnan(mean_iou(torch.zeros(3, 3, dtype=torch.long)))


@pytest.mark.parametrize("context", ["video", "audio", "context"])
def test_fpn_head_predicts_every_pixel_of_the_crop(context):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    batch = {"video": torch.randint(0, 255, (2, 3, 3, 2, 16, 16), dtype=torch.uint8),
             "audio": torch.randn(2, 3, 4, 16, 16), "directions": torch.zeros(2, 3, 2)}
    maps, cond = frozen_inputs(model, batch, context)
    assert [m.shape[1:] for m in maps] == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]
    assert (cond is None) == (context == "video")
    if cond is not None:
        assert cond.shape == (6, cond_dim(model, context))
    head = FPNHead([8, 16, 32, 64], 9, dim=16, cond_dim=cond_dim(model, context))
    assert head(maps, 16, cond).shape == (6, 9, 16, 16)
