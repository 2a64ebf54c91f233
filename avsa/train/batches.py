"""A train worker's local batches: fixed-size batches of real samples, drawn at random from a
shuffle buffer that this module owns (not Ray Data's), so that the samples skipped upstream
are counted when their rows reach the worker, not when a row is drawn.

The pipeline counts a skipped sample on a row of the same shard (avsa/data/pipeline.py). Behind
Ray Data's local shuffle that row could wait in the buffer past the end of the run, or of an
attempt that a worker death ends: with `data.shuffle_buffer=8`, batches of one and 16 rows per
worker, Ray's buffer took 13 rows before the first draw, and a 4-step attempt then trained on 4
of them, so the skip counts on the other 9 never reached a metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

# Row fields the pipeline adds for accounting (see avsa/data/pipeline.py), not model inputs.
BOOKKEEPING = ("key_id", "epoch", "valid", "skipped", "missing_shards", "labels")


def model_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The real rows (valid=1) of a host batch, without the bookkeeping fields."""
    valid = batch["valid"] == 1
    keep = bool(valid.all())
    return {k: v if keep else v[valid] for k, v in batch.items() if k not in BOOKKEEPING}


class ShuffleBuffer:
    """Rows in preallocated host slots (room for `capacity` rows, grown when a chunk does not
    fit); `take` draws `size` of them (at random with a generator, else the oldest first) and
    refills the holes from the end, so a step copies O(size) rows whatever the buffer's
    length. Batches come out in pinned memory with `pin`."""

    def __init__(self, generator: torch.Generator | None, capacity: int, pin: bool = False):
        self.generator, self.capacity, self.pin = generator, capacity, pin
        self.slots: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        m = len(next(iter(rows.values()))) if rows else 0
        if m == 0:
            return
        if not self.slots or self.n + m > len(self.slots["video"]):
            cap = max(self.capacity, 2 * (self.n + m))
            self.slots = {k: _grown(self.slots.get(k), v, self.n, cap) for k, v in rows.items()}
        for k, v in rows.items():
            self.slots[k][self.n:self.n + m] = v
        self.n += m

    def take(self, size: int) -> dict[str, torch.Tensor]:
        """`size` rows (size <= n) out of the buffer."""
        n, gen = self.n, self.generator
        idx = torch.randperm(n, generator=gen)[:size] if gen is not None else torch.arange(size)
        out = {k: torch.index_select(v[:n], 0, idx, out=torch.empty(
            (size, *v.shape[1:]), dtype=v.dtype, pin_memory=self.pin)) for k, v in self.slots.items()}
        if gen is None:  # first in, first out: the rest moves to the front
            for v in self.slots.values():
                v[:n - size] = v[size:n].clone()
        else:  # the undrawn rows at the end fill the drawn slots before it
            drawn = torch.zeros(n, dtype=torch.bool)
            drawn[idx] = True
            holes = idx[idx < n - size]
            tail = torch.arange(n - size, n)[~drawn[n - size:]]
            for v in self.slots.values():
                v[holes] = v[tail]
        self.n = n - size
        return out


def _grown(old: torch.Tensor | None, like: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """Slots for `cap` rows shaped like `like`'s, holding the first `n` rows of `old`."""
    out = like.new_empty((cap, *like.shape[1:]))
    if old is not None:
        out[:n] = old[:n]
    return out


def local_batches(batches: Iterable[dict[str, torch.Tensor]], size: int, buffer_rows: int,
                  generator: torch.Generator | None = None, pin: bool = False,
                  ) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(batch of `size` real rows, samples skipped upstream since the previous batch) from host
    batches as the pipeline emits them (with its bookkeeping fields).

    A batch is drawn once the buffer holds `buffer_rows` rows beyond it (0 or 1: no shuffle,
    rows in arrival order; a generator is needed otherwise). Placeholder rows (valid=0) are
    dropped, their counts kept. The skip counts of every row that has arrived are reported with
    the next batch, whether or not that row is in it. Rows left over at the end (fewer than
    `size`) are dropped, like counts arriving after the last batch.
    """
    shuffle = buffer_rows > 1
    if shuffle and generator is None:
        raise ValueError("a shuffle buffer needs a generator")
    keep = buffer_rows if shuffle else 0
    buf = ShuffleBuffer(generator if shuffle else None, keep + 2 * size, pin)
    skipped = 0
    for batch in batches:
        skipped += int(batch["skipped"].sum())
        buf.add(model_rows(batch))
        while buf.n >= size + keep:
            yield buf.take(size), skipped
            skipped = 0
    while buf.n >= size:
        yield buf.take(size), skipped
        skipped = 0
