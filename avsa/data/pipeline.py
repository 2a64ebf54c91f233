"""Streaming input pipeline: shards -> transformed samples, on Ray Data or in one process.

One work item per (epoch, shard), shards permuted by (seed, epoch). A Ray task (or the local
iterator) opens the shard (checksum verified) and runs `transform.make_sample` on each sample;
Ray Data gets at most MAX_BLOCKS blocks of consecutive items, a task taking a block's shards in
turn, so a run of many epochs over few shards does not wait minutes for Ray to plan its tasks;
the consumer's local shuffle buffer mixes rows across shards. Rows hold the sample's arrays plus
numeric bookkeeping (so `iter_torch_batches` converts every field):
  "key_id" () int64   63-bit sha256 of the sample key; "key" (str) only with keys=True
  "epoch"  () int64
  "labels" (K,) float32 (zeros when the sample names no classes)
  "valid"  () int64   1 for a real sample, 0 for a placeholder row
  "skipped" () int64  samples lost before this row (their transform raised an AvsaError)
  "missing_shards" () int64  unreadable shards (with skip_missing_shards)

A lost sample is counted on a real row of the same shard; only a shard with no decodable
sample yields a placeholder (zeros, valid=0). Consumers sum "skipped" as rows arrive and drop
valid=0 rows, then shuffle in their own buffer (`drawn_batches`; avsa.train.batches says why:
behind Ray Data's local shuffle a count could wait unreported); `iter_local` folds placeholders
away itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import cv2
import numpy as np
import torch

from avsa import storage
from avsa.config import audio_channels
from avsa.data import manifest as manifest_mod
from avsa.data import shards
from avsa.data.labels import NUM_CLASSES
from avsa.data.manifest import ShardInfo
from avsa.data.transform import collate, make_sample
from avsa.errors import AvsaError, ShardError, StorageError

log = logging.getLogger(__name__)
# Ray Data plans every block's task up front, about 2 ms each: 100,000 steps over 6 clips in 2
# shards are 66,668 items, and took 200 s to the first step as one block each (5 s as 1,024)
MAX_BLOCKS = 1024


def key_id(key: str) -> int:
    """Stable non-negative int64 id of a sample key (first 63 bits of its sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def shard_items(uri: str, *, epochs: int, seed: int, start_epoch: int = 0, shuffle: bool = True,
                manifest: manifest_mod.Manifest | None = None) -> list[dict[str, Any]]:
    """Work items, epoch by epoch, shards permuted per epoch by (seed, epoch):
    [{"uri", "sha256", "bytes", "samples", "epoch"}]."""
    man = manifest if manifest is not None else manifest_mod.read_manifest(uri)
    uris = manifest_mod.shard_uris(uri, man)
    items = []
    for epoch in range(start_epoch, start_epoch + epochs):
        rng = np.random.default_rng([int(seed), epoch])
        order = rng.permutation(len(uris)) if shuffle else np.arange(len(uris))
        for i in order:
            info = man.shards[int(i)]
            items.append({"uri": uris[i], "sha256": info.sha256, "bytes": info.bytes,
                          "samples": info.samples, "epoch": epoch})
    return items


def _work(uri: str, cfg, skip: bool | None, **kw) -> tuple[list[dict[str, Any]], bool]:
    """(work items, skip_missing_shards resolved); checks shard presence unless skipping."""
    skip = cfg.skip_missing_shards if skip is None else bool(skip)
    man = manifest_mod.read_manifest(uri)
    if not man.shards:
        raise ShardError(manifest_mod.manifest_uri(uri), "manifest lists no shards")
    if not skip:
        check_shards_present(uri, man)
    return shard_items(uri, manifest=man, **kw), skip


def placeholder_row(cfg, *, epoch: int, skipped: int, missing: int = 0, other_time: bool = False,
                    misalign_prob: float = 0.0, with_masks: bool = False,
                    keys: bool = False) -> dict[str, Any]:
    """A valid=0 row with zero arrays of the shapes make_sample produces, carrying counts."""
    v, s, t = cfg.num_viewpoints, cfg.crop_size, cfg.frames
    c = audio_channels(cfg)
    f = round(cfg.audio_seconds * cfg.sample_rate) // cfg.hop
    row: dict[str, Any] = {
        "video": np.zeros((v, 3, t, s, s), np.uint8),
        "audio": np.zeros((v, c, f, cfg.n_mels), np.float32),
        "directions": np.zeros((v, 2), np.float32),
        "labels": np.zeros(NUM_CLASSES, np.float32),
    }
    if other_time:
        row["audio_other"] = row["audio"].copy()
    if misalign_prob > 0:
        row["aligned"] = np.array(0, np.int64)
    if with_masks:
        row["masks"] = np.zeros((v, s, s), np.int64)
    row.update(key_id=np.int64(-1), epoch=np.int64(epoch), valid=np.int64(0),
               skipped=np.int64(skipped), missing_shards=np.int64(missing))
    if keys:
        row["key"] = ""
    return row


def decode_shard(item: dict[str, Any], *, cfg, seed: int, other_time: bool = False,
                 misalign_prob: float = 0.0, with_masks: bool = False,
                 skip_missing_shards: bool = False, keys: bool = False,
                 torch_threads: int | None = None) -> Iterator[dict[str, Any]]:
    """One work item -> rows of its shard's samples (see the module docstring for the fields)."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(torch_threads)  # the crops' remap: no pool wider than the task
    uri, epoch = str(item["uri"]), int(item["epoch"])
    opts = dict(other_time=other_time, misalign_prob=misalign_prob, with_masks=with_masks)
    info = ShardInfo(name=uri.rsplit("/", 1)[-1], samples=int(item["samples"]),
                     bytes=int(item["bytes"]), sha256=str(item["sha256"]))
    held: dict[str, Any] | None = None
    pending = seen = 0
    try:
        for raw in shards.open_shard(uri, info):
            seen += 1
            try:
                row = make_sample(raw, cfg, seed=seed, epoch=epoch, **opts)
            except AvsaError as exc:
                log.warning("skipping sample %s in shard %s: %s", raw.key, uri, exc)
                if held is None:
                    pending += 1
                else:
                    held["skipped"] += 1
                continue
            row.setdefault("labels", np.zeros(NUM_CLASSES, np.float32))
            row.update(key_id=np.int64(key_id(raw.key)), epoch=np.int64(epoch),
                       valid=np.int64(1), skipped=np.int64(pending), missing_shards=np.int64(0))
            if keys:
                row["key"] = raw.key
            pending = 0
            if held is not None:
                yield held
            held = row
    except (ShardError, StorageError) as exc:
        if not skip_missing_shards:
            raise ShardError(uri, f"cannot read shard: {getattr(exc, 'reason', exc)}") from None
        lost = max(0, info.samples - seen)
        log.warning("skipping unreadable shard %s (%d samples lost): %s", uri, lost, exc)
        pending += lost
        if held is None:
            yield placeholder_row(cfg, epoch=epoch, skipped=pending, missing=1, keys=keys, **opts)
            return
        held["skipped"] += pending
        held["missing_shards"] += 1
        pending = 0
    if held is not None:
        yield held
    elif pending:
        yield placeholder_row(cfg, epoch=epoch, skipped=pending, keys=keys, **opts)


def row_bytes(cfg, *, other_time: bool = False, misalign_prob: float = 0.0,
              with_masks: bool = False) -> int:
    """Bytes of one row as make_sample produces it (the arrays of placeholder_row)."""
    row = placeholder_row(cfg, epoch=0, skipped=0, other_time=other_time,
                          misalign_prob=misalign_prob, with_masks=with_masks)
    return sum(np.asarray(v).nbytes for v in row.values())


# Batches each consumer's iter_torch_batches fetches ahead (avsa.train.loop, bench/stream.py).
CONSUMER_PREFETCH_BATCHES = 2


def read_ahead_bytes(*, read_ahead_batches: int, batch_size: int, shard_samples: int,
                     row_size: int, prefetch_batches: int = CONSUMER_PREFETCH_BATCHES) -> int:
    """Object-store bytes (int) for a stream that keeps read_ahead_batches global batches
    (rows of batch_size) decoded ahead of its consumer, in whole shards (one decode task
    yields one block of shard_samples rows of row_size bytes).

    Ray Data charges the decode operator for every live block it produced, those its consumer
    holds included: (prefetch_batches + 1) batches plus one partly read shard. One more shard
    lets two decode tasks run, not one in lockstep with the consumer. Read through
    streaming_split (the executor in its own actor) a bounded stream keeps pace with an
    unbounded one; read in the consumer's process, its executor thread waits for the
    consumer's GIL and falls behind (bench/RESULTS.md, stream)."""
    shard = max(int(shard_samples), 1)
    held = -(-(prefetch_batches + 1) * batch_size // shard) + 1
    ahead = -(-read_ahead_batches * batch_size // shard)
    return (held + ahead + 1) * shard * int(row_size)


def ingest_options(cfg, *, batch_size: int, shard_samples: int, row_size: int,
                   preserve_order: bool = False,
                   prefetch_batches: int = CONSUMER_PREFETCH_BATCHES):
    """Ray Data ExecutionOptions that keep decoding at the consumer's pace: the object store
    holds the consumer's prefetch window plus cfg.read_ahead_batches global batches of rows
    (`read_ahead_bytes`), and decoding uses cfg.decode_tasks * cfg.decode_cpus CPUs (0 tasks:
    whatever Ray Train leaves). Unbounded, Ray Data decoded the demo's 11 epochs ahead
    (1.8 GB) on the trainers' cores."""
    from ray.data import ExecutionOptions, ExecutionResources

    cpu = cfg.decode_tasks * cfg.decode_cpus if cfg.decode_tasks else None
    limit = read_ahead_bytes(read_ahead_batches=cfg.read_ahead_batches, batch_size=batch_size,
                             shard_samples=shard_samples, row_size=row_size,
                             prefetch_batches=prefetch_batches)
    return ExecutionOptions(preserve_order=preserve_order, resource_limits=ExecutionResources(
        cpu=cpu, object_store_memory=limit))


def build_dataset(uri: str, cfg, *, epochs: int, seed: int, other_time: bool = False,
                  misalign_prob: float = 0.0, with_masks: bool = False,
                  skip_missing_shards: bool | None = None, start_epoch: int = 0,
                  keys: bool = False, shuffle: bool = True, batch_size: int | None = None,
                  limit: int | None = None):
    """Ray Data dataset of transformed samples for `epochs` epochs from `start_epoch`.

    A missing shard is a ShardError now, unless skip_missing_shards (default
    cfg.skip_missing_shards): then its samples count as skipped. With batch_size (the global
    batch) the context bounds read-ahead (`ingest_options`; Ray Train takes options only from
    its DataConfig, so the driver passes the same there). limit keeps the first rows only.
    Rows come in the seeded shard order when cfg.preserve_order (always when unshuffled).
    """
    import ray.data

    items, skip = _work(uri, cfg, skip_missing_shards, epochs=epochs, seed=seed,
                        start_epoch=start_epoch, shuffle=shuffle)
    kwargs = dict(cfg=cfg, seed=seed, other_time=other_time, misalign_prob=misalign_prob,
                  with_masks=with_masks, skip_missing_shards=skip, keys=keys,
                  torch_threads=max(1, int(cfg.decode_cpus)))
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    ds = ds.flat_map(decode_shard, fn_kwargs=kwargs, num_cpus=cfg.decode_cpus)
    if limit is not None:
        ds = ds.limit(limit)
    ordered = cfg.preserve_order or not shuffle
    if batch_size is not None:
        ds.context.execution_options = ingest_options(
            cfg, batch_size=batch_size, shard_samples=max(int(i["samples"]) for i in items),
            row_size=row_bytes(cfg, other_time=other_time, misalign_prob=misalign_prob,
                               with_masks=with_masks), preserve_order=ordered)
    else:
        ds.context.execution_options.preserve_order = ordered
    return ds


def check_shards_present(uri: str, man: manifest_mod.Manifest) -> None:
    """ShardError naming the first shard of `man` absent from its folder (one listing)."""
    folder = manifest_mod.shard_dir(uri)
    try:
        present = {storage.relative(u, folder) for u in storage.list_prefix(folder)}
    except StorageError as exc:
        raise ShardError(folder, f"cannot list shards: {exc.reason}") from None
    for shard_uri, info in zip(manifest_mod.shard_uris(uri, man), man.shards):
        if info.name not in present:
            raise ShardError(shard_uri, "shard listed in the manifest is missing")


def _fold_placeholders(rows: Iterator[dict[str, Any]], uri: str) -> Iterator[dict[str, Any]]:
    """Drop valid=0 rows, moving their counts onto a real row (one is held back for that)."""
    held, pending, missing = None, 0, 0
    for row in rows:
        if int(row["valid"]) == 0:
            if held is None:
                pending += int(row["skipped"])
                missing += int(row["missing_shards"])
            else:
                held["skipped"] += row["skipped"]
                held["missing_shards"] += row["missing_shards"]
            continue
        row["skipped"] += pending
        row["missing_shards"] += missing
        pending = missing = 0
        if held is not None:
            yield held
        held = row
    if held is None and (pending or missing):
        raise ShardError(uri, f"no decodable samples ({pending} skipped, {missing} unreadable "
                              f"shards)")
    if held is not None:
        yield held


class ShuffleBuffer:
    """Rows in preallocated host slots (room for `capacity` rows, grown when a chunk does not
    fit); `take` draws `size` of them (at random with a generator, else the oldest first) and
    refills the holes from the end, so a draw copies O(size) rows whatever the buffer's
    length. Batches come out in pinned memory with `pin`."""

    def __init__(self, generator: torch.Generator | None, capacity: int, pin: bool = False):
        self.generator, self.capacity, self.pin = generator, capacity, pin
        self.slots: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        m = len(next(iter(rows.values()))) if rows else 0
        if m == 0:
            return
        if not self.slots or self.n + m > len(next(iter(self.slots.values()))):
            cap, old = max(self.capacity, 2 * (self.n + m)), self.slots
            self.slots = {k: v.new_empty((cap, *v.shape[1:])) for k, v in rows.items()}
            for k, v in old.items():  # every chunk has the same fields
                self.slots[k][:self.n] = v[:self.n]
        for k, v in rows.items():
            self.slots[k][self.n:self.n + m] = v
        self.n += m

    def take(self, size: int) -> dict[str, torch.Tensor]:
        """`size` rows (size <= n) out of the buffer."""
        n, gen = self.n, self.generator
        idx = torch.randperm(n, generator=gen)[:size] if gen is not None else torch.arange(size)
        out = {k: torch.index_select(v[:n], 0, idx, out=torch.empty(
            (size, *v.shape[1:]), dtype=v.dtype, pin_memory=self.pin))
            for k, v in self.slots.items()}
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


def drawn_batches(chunks: Iterable[dict[str, torch.Tensor]], size: int, buffer_rows: int,
                  generator: torch.Generator | None = None, *, pin: bool = False,
                  drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Batches {field: (size, ...)} drawn through a ShuffleBuffer from chunks {field: (n, ...)},
    a chunk read only when the buffer needs rows. A batch is drawn once the buffer holds
    `buffer_rows` rows beyond it (0 or 1: no shuffle, rows in arrival order; a generator is
    needed otherwise); at the end the rest, fewer than `size` rows dropped with drop_last, else
    one short batch."""
    shuffle = buffer_rows > 1
    if shuffle and generator is None:
        raise ValueError("a shuffle buffer needs a generator")
    keep = buffer_rows if shuffle else 0
    buf = ShuffleBuffer(generator if shuffle else None, keep + 2 * size, pin)
    for chunk in chunks:
        buf.add(chunk)
        while buf.n >= size + keep:
            yield buf.take(size)
    while buf.n >= size or (buf.n and not drop_last):
        yield buf.take(min(size, buf.n))


def iter_local(uri: str, cfg, *, epochs: int = 1, seed: int, batch_size: int,
               shuffle: bool = True, start_epoch: int = 0, other_time: bool = False,
               misalign_prob: float = 0.0, with_masks: bool = False,
               skip_missing_shards: bool | None = None) -> Iterator[dict[str, Any]]:
    """Batches {field: torch.Tensor (B, ...)} plus "key": list[str], in this process: the rows
    of build_dataset, placeholders folded away, drawn through a `cfg.shuffle_buffer` buffer
    seeded by (seed, start_epoch). Without shuffle the order is the manifest's."""
    items, skip = _work(uri, cfg, skip_missing_shards, epochs=epochs, seed=seed,
                        start_epoch=start_epoch, shuffle=shuffle)
    opts = dict(cfg=cfg, seed=seed, other_time=other_time, misalign_prob=misalign_prob,
                with_masks=with_masks, skip_missing_shards=skip, keys=True)
    rows = (row for item in items for row in decode_shard(item, **opts))
    rows = _fold_placeholders(rows, uri)
    state = np.random.SeedSequence([int(seed), start_epoch]).generate_state(1)[0]
    names: dict[int, str] = {}  # row number -> key, the one field a tensor cannot hold

    def numbered() -> Iterator[dict[str, torch.Tensor]]:
        for i, row in enumerate(rows):
            names[i] = row.pop("key")
            row["row"] = np.int64(i)
            yield {k: torch.from_numpy(v) for k, v in collate([row]).items()}

    for batch in drawn_batches(numbered(), batch_size, cfg.shuffle_buffer if shuffle else 0,
                               torch.Generator().manual_seed(int(state)), drop_last=False):
        batch["key"] = [names.pop(i) for i in batch.pop("row").tolist()]
        yield batch
