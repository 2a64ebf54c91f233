"""The read-ahead bound of the Ray Data stream (`pipeline.read_ahead_bytes`), a pure function."""

from __future__ import annotations

from itertools import pairwise

import pytest

from avsa.config import DataConfig
from avsa.data import pipeline

ROW = 2_023_528  # bytes of one bench/stream.py row (4 views, 112 px, 8 frames)


def bound(read_ahead: int, batch: int = 4, shard: int = 4, prefetch: int = 2) -> int:
    return pipeline.read_ahead_bytes(read_ahead_batches=read_ahead, batch_size=batch,
                                     shard_samples=shard, row_size=ROW, prefetch_batches=prefetch)


def test_bench_config_budgets_consumer_window_read_ahead_and_one_decoding_shard():
    # consumer: (2 + 1) batches of 4 = 3 shards + 1 partly read; 4 batches ahead = 4 shards;
    # one shard in decoding
    assert bound(4) == 9 * 4 * ROW


@pytest.mark.parametrize("batch,shard,prefetch", [(4, 4, 2), (8, 3, 2), (1, 5, 0), (16, 4, 4)])
def test_consumer_window_does_not_eat_the_read_ahead(batch, shard, prefetch):
    """The most the consumer may hold (its prefetch window and the batch in use, in whole
    shards, one of them partly read) leaves read_ahead batches of room; rounding to whole
    shards adds less than 4 shards in all."""
    for ahead in (1, 2, 4, 8):
        consumer = ((prefetch + 1) * batch + 2 * shard) * ROW
        total = bound(ahead, batch, shard, prefetch)
        assert total - consumer >= ahead * batch * ROW
        assert total < ((prefetch + 1 + ahead) * batch + 4 * shard) * ROW


def test_bound_grows_with_read_ahead_only():
    """The budget depends on batches ahead, not on how long the stream runs: each extra
    batch ahead adds one batch (here one shard)."""
    steps = [bound(a) for a in range(1, 9)]
    assert all(b - a == 4 * ROW for a, b in pairwise(steps))


def test_ingest_options_apply_the_bound():
    cfg = DataConfig(read_ahead_batches=3, decode_tasks=2, decode_cpus=1.0)
    opts = pipeline.ingest_options(cfg, batch_size=4, shard_samples=4, row_size=ROW)
    assert opts.resource_limits.object_store_memory == bound(3)
    assert opts.resource_limits.cpu == 2.0
