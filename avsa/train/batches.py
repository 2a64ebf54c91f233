"""A train worker's local batches: fixed-size batches of real samples, drawn at random from a
shuffle buffer in the worker (avsa.data.pipeline.drawn_batches, not Ray Data's), so that the
samples skipped upstream are counted when their rows reach the worker. The pipeline counts a
skipped sample on a row of the same shard; behind Ray Data's local shuffle that row could wait
in the buffer past the end of the run, or of an attempt a worker death ends, and never count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

from avsa.data.pipeline import drawn_batches

# Row fields the pipeline adds for accounting (see avsa/data/pipeline.py), not model inputs.
BOOKKEEPING = ("key_id", "epoch", "valid", "skipped", "missing_shards", "labels")
T = TypeVar("T")


def model_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The real rows (valid=1) of a host batch, without the bookkeeping fields."""
    valid = batch["valid"] == 1
    keep = bool(valid.all())
    return {k: v if keep else v[valid] for k, v in batch.items() if k not in BOOKKEEPING}


def local_batches(batches: Iterable[dict[str, torch.Tensor]], size: int, buffer_rows: int,
                  generator: torch.Generator | None = None, pin: bool = False,
                  ) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(batch of `size` real rows, samples skipped upstream since the previous batch) from host
    batches as the pipeline emits them (with its bookkeeping fields), drawn as by
    `drawn_batches`. Placeholder rows (valid=0) are dropped, their counts kept; the skip counts
    of every row that has arrived go with the next batch, whether or not that row is in it.
    Rows left over at the end (fewer than `size`) are dropped, like counts arriving after it.
    """
    skipped = 0

    def arriving() -> Iterator[dict[str, torch.Tensor]]:
        nonlocal skipped
        for batch in batches:
            skipped += int(batch["skipped"].sum())
            yield model_rows(batch)

    for batch in drawn_batches(arriving(), size, buffer_rows, generator, pin=pin):
        yield batch, skipped
        skipped = 0


def fetch_first_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, its first item fetched by a background thread from this call on, so that what
    the caller does before iterating (building the model, reaching MLflow) overlaps the data
    pipeline's start (Ray Data's coordinator and decode processes: tens of seconds on a small
    machine). An error raised by that fetch is raised at the first `next`."""
    box: dict[str, Any] = {}

    def fetch() -> None:
        try:
            box["item"] = next(items)
        except BaseException as e:  # StopIteration too: handed to the consumer
            box["error"] = e

    thread = threading.Thread(target=fetch, name="avsa-first-batch", daemon=True)
    thread.start()

    def resumed() -> Iterator[T]:
        thread.join()
        if isinstance(box.get("error"), StopIteration):
            return
        if "error" in box:
            raise box["error"]
        yield box["item"]
        yield from items

    return resumed()
