"""Bootstrap intervals and IoU from confusion matrices on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avsa.downstream import stats


def test_a_constant_vector_has_a_zero_width_interval():
    assert stats.bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    assert stats.bootstrap_ci([np.zeros(10), np.zeros(30)]) == (0.0, 0.0)


def test_bernoulli_interval_covers_the_mean_with_the_normal_width():
    rng = np.random.default_rng(0)
    n, p = 2000, 0.3
    hits = (rng.random(n) < p).astype(np.uint8)
    lo, hi = stats.bootstrap_ci(hits, n=4000, seed=1)
    mean = hits.mean()
    assert lo < mean < hi
    expected = 2 * 1.96 * math.sqrt(mean * (1 - mean) / n)
    assert hi - lo == pytest.approx(expected, rel=0.1)
    assert stats.bootstrap_ci(hits, n=4000, seed=1) == (lo, hi)  # fixed seed, same interval


def test_seeds_that_disagree_widen_the_interval():
    # two runs, each perfectly consistent within itself: all hits against all misses.
    # Resampling runs gives pooled means 0, 1/2, 1 with chances 1/4, 1/2, 1/4.
    runs = [np.ones(500), np.zeros(500)]
    assert stats.bootstrap_ci(runs, n=4000) == (0.0, 1.0)
    pooled = stats.bootstrap_ci(np.concatenate(runs), n=4000)
    assert 0.45 < pooled[0] < 0.5 < pooled[1] < 0.55  # examples alone would hide the seeds


def test_iou_of_confusion_matrices():
    conf = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    # IoU: class 0 1/3, class 1 2/3, class 2 1/2; class 3 occurs nowhere and is left out
    assert stats.iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert stats.iou(conf, foreground=True) == pytest.approx((2 / 3 + 1 / 2) / 2)
    batched = stats.iou(np.stack([conf, np.eye(4, dtype=int)]))
    assert batched.shape == (2,) and batched[1] == 1.0
    assert math.isnan(stats.iou(np.zeros((3, 3))))
    background = np.array([[5, 0], [0, 0]])
    assert math.isnan(stats.iou(background, foreground=True))


def test_miou_interval_resamples_crops():
    # every crop alike: the interval has no width; crops that differ give a real one
    crop = np.array([[8, 1], [1, 2]])
    same = np.repeat(crop[None], 20, axis=0)
    stat = stats.of_sums(stats.iou)
    lo, hi = stats.bootstrap_ci(same, statistic=stat)
    assert lo == pytest.approx(hi) and lo == pytest.approx(stats.iou(crop))
    mixed = np.stack([crop, np.array([[10, 0], [0, 0]]), np.array([[2, 3], [3, 4]])] * 10)
    lo, hi = stats.bootstrap_ci(mixed, statistic=stat)
    assert lo < stats.iou(mixed.sum(0)) < hi
    acc = stats.bootstrap_ci(same, statistic=stats.of_sums(stats.pixel_accuracy))
    assert acc == pytest.approx((10 / 12, 10 / 12))


def test_rows_of_one_unit_are_resampled_together():
    # 100 videos of 5 windows each, every window of a video hit or missed alike: the test set
    # holds 100 independent examples, not 500
    rng = np.random.default_rng(0)
    video_hits = (rng.random(100) < 0.5).astype(np.uint8)
    hits, video = np.repeat(video_hits, 5), np.repeat(np.arange(100), 5)
    p = hits.mean()
    lo, hi = stats.bootstrap_ci(hits, n=4000, clusters=[video])
    assert lo < p < hi
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 100), rel=0.1)
    by_row = stats.bootstrap_ci(hits, n=4000)
    assert (hi - lo) / (by_row[1] - by_row[0]) == pytest.approx(math.sqrt(5), rel=0.15)
    # one unit per row is the plain bootstrap, draw for draw
    assert stats.bootstrap_ci(hits, n=500, clusters=[np.arange(500)]) == stats.bootstrap_ci(
        hits, n=500)
    with pytest.raises(ValueError, match="3 cluster ids for 4 rows"):
        stats.bootstrap_ci(np.ones(4), clusters=[np.zeros(3)])
