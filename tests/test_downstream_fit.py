"""The shared head-training loop: cached features against end-to-end encoding, early stopping,
held-out clips."""

from __future__ import annotations

import pytest
import torch
from presets import tiny_model
from torch import nn
from torch.nn import functional as F

from avsa.downstream.binary import encode_clips, pair_head, pair_loss
from avsa.downstream.fit import encode_passes, fit_head, freeze, holdout, minibatches
from avsa.downstream.segmentation import FPNHead, cond_dim, crop_logits, encode_crops


class _Clips:
    """6 random clips (V = 3, 16x16 crops, 2 frames) in batches of 4, with masks and keys."""

    def __init__(self, clips: int = 6, batch: int = 4):
        gen = torch.Generator().manual_seed(3)
        self.data = {
            "video": torch.randint(0, 255, (clips, 3, 3, 2, 16, 16), generator=gen,
                                   dtype=torch.uint8),
            "audio": torch.randn(clips, 3, 4, 16, 16, generator=gen),
            "directions": torch.rand(clips, 3, 2, generator=gen),
            "aligned": torch.arange(clips) % 2,
            "masks": torch.randint(0, 4, (clips, 3, 16, 16), generator=gen),
        }
        self.keys = [f"c{i}" for i in range(clips)]
        self.batch = batch

    def train(self, epoch):
        for i in range(0, len(self.keys), self.batch):
            yield {**{k: v[i : i + self.batch] for k, v in self.data.items()},
                   "key": self.keys[i : i + self.batch]}


def _train_twice(make_head, cached_loss, e2e_loss, n, *, epochs=3, batch=2, seed=7):
    """The same head trained on cached rows and on clips re-encoded every step."""
    heads = []
    for loss in (cached_loss, e2e_loss):
        torch.manual_seed(0)
        head = make_head()
        gen = torch.Generator().manual_seed(seed)
        fit_head(head, lambda idx, h=head, f=loss: f(h, idx),
                 lambda epoch, g=gen: minibatches(n, batch, g), epochs=epochs, lr=1e-3)
        heads.append(head)
    return heads


@pytest.mark.parametrize("task", ["avc_bin", "avsa_bin"])
def test_cached_pair_head_matches_end_to_end_frozen_training(task):
    # an unseeded encoder now and then put float reordering (batches of 4 against 2) over
    # 1e-5 after Adam's nine steps; a wrong cached row moves weights by about 1e-2
    torch.manual_seed(0)
    model = freeze(tiny_model())
    source = _Clips()
    cached = encode_passes(source.train, 1, lambda b: encode_clips(model, b))
    assert cached.keys == source.keys

    def e2e(head, idx):  # decode-and-encode the clips of this minibatch, as before caching
        return pair_loss(task, head, encode_clips(
            model, {k: v[idx] for k, v in source.data.items()}))

    a, b = _train_twice(lambda: pair_head(model.video_dim + model.audio_dim),
                        lambda head, idx: pair_loss(task, head, cached.take(idx)), e2e, 6)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=5e-5), name
    x = torch.cat((cached.tensors["video"], cached.tensors["audio"]), -1)
    assert torch.allclose(a.eval()(x), b.eval()(x), atol=5e-5)


@pytest.mark.parametrize("context", ["video", "context"])
def test_cached_segmentation_head_matches_end_to_end_frozen_training(context):
    torch.manual_seed(0)
    model = freeze(tiny_model())
    source = _Clips()
    cached = encode_passes(source.train, 1, lambda b: encode_crops(model, b, context))
    assert len(cached) == 18 and cached.keys[:4] == ["c0", "c0", "c0", "c1"]
    views = 3

    def e2e(head, idx):  # crops idx: encode their clips, keep those viewpoints
        clips = {k: v[idx // views] for k, v in source.data.items()}
        rows = encode_crops(model, clips, context)
        pick = torch.arange(len(idx)) * views + idx % views
        rows = {k: v[pick] for k, v in rows.items()}
        return F.cross_entropy(crop_logits(head, rows), rows["masks"])

    def make():
        return FPNHead([8, 16, 32, 64], 4, dim=8, cond_dim=cond_dim(model, context))

    a, b = _train_twice(make, lambda head, idx: F.cross_entropy(
        crop_logits(head, cached.take(idx)), cached.take(idx)["masks"]), e2e, 18, batch=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def _line_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    return x, (x[:, 0] > 0).long()


def _fit(epochs, validate=None, patience=0):
    x, y = _line_data()
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    gen = torch.Generator().manual_seed(1)
    res = fit_head(head, lambda i: F.cross_entropy(head(x[i]), y[i]),
                   lambda epoch: minibatches(40, 8, gen), epochs=epochs, lr=0.05,
                   validate=validate, patience=patience)
    return head, res


def test_early_stopping_restores_the_best_epoch():
    scripted = iter([5.0, 3.0, 2.0, 4.0, 6.0, 7.0, 1.0, 0.5])
    head, res = _fit(50, validate=lambda: next(scripted), patience=3)
    assert res.val_loss == [5.0, 3.0, 2.0, 4.0, 6.0, 7.0]  # 3 epochs past the best: stop
    assert (res.best_epoch, res.epochs, res.steps) == (2, 6, 30)
    best, plain = _fit(3)  # the same training, 3 epochs, no validation
    assert plain.best_epoch == 2
    for p, q in zip(head.parameters(), best.parameters()):
        assert torch.equal(p, q)
    last, _ = _fit(6)
    assert not torch.equal(head.weight, last.weight)


def test_without_patience_every_epoch_runs_and_the_best_is_kept():
    losses = iter([3.0, 1.0, 2.0, 2.5, 4.0])
    head, res = _fit(5, validate=lambda: next(losses))
    assert (res.epochs, res.best_epoch) == (5, 1)
    for p, q in zip(head.parameters(), _fit(2)[0].parameters()):
        assert torch.equal(p, q)


def test_lr_milestones_and_skipped_batches():
    p = nn.Parameter(torch.zeros(1))
    holder = nn.Module()
    holder.p = p
    seen = []

    def loss(batch):
        return None if batch is None else (p - 1).pow(2).sum()

    res = fit_head(holder, loss, lambda epoch: [None, 1, 2], epochs=4, lr=0.1,
                   lr_milestones=[2], lr_gamma=0.5, log=lambda m, s: seen.append(s))
    assert (res.steps, seen) == (8, [0, 1, 2, 3])
    assert fit_head(holder, loss, lambda epoch: [None], epochs=3, lr=0.1).steps == 0


@pytest.mark.parametrize("n, sizes", [(16, [16]), (17, [17]), (33, [16, 17]), (34, [16, 16, 2])])
def test_minibatches_cover_every_row_once_and_never_train_batchnorm_on_one(n, sizes):
    """The linear probe's head starts with BatchNorm1d, which refuses a one-row batch in
    training: n % batch_size == 1 used to end every epoch with one."""
    gen = torch.Generator().manual_seed(0)
    parts = minibatches(n, 16, gen)
    assert [len(p) for p in parts] == sizes
    assert sorted(torch.cat(parts).tolist()) == list(range(n))
    head = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.Linear(4, 3))
    x, y = torch.randn(n, 4), torch.arange(n) % 3
    fit_head(head, lambda idx: F.cross_entropy(head(x[idx]), y[idx]),
             lambda epoch: minibatches(n, 16, gen), epochs=2, lr=1e-2)


def test_holdout_takes_whole_clips_by_key_hash():
    keys = [f"clip-{i}" for i in range(10)] * 3  # three passes
    held = holdout(keys, 0.2)
    chosen = {k for k, h in zip(keys, held.tolist()) if h}
    assert len(chosen) == 2 and int(held.sum()) == 6  # 2 clips, all 3 passes of each
    shuffled = list(reversed(keys))
    assert {k for k, h in zip(shuffled, holdout(shuffled, 0.2).tolist()) if h} == chosen
    assert not holdout(keys, 0.0).any()
    assert int(holdout(["a", "b", "c", "d"], 0.1, min_keys=2).sum()) == 2
    assert not holdout(["a", "b", "c"], 0.5, min_keys=2).any()  # 2 each side: too few
    assert int(holdout(["a", "b"], 0.9).sum()) == 1
