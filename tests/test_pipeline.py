"""avsa.data.pipeline on a tiny synthetic shard set: local iterator, Ray Data, Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avsa import storage, synth
from avsa.config import DataConfig
from avsa.data import pipeline
from avsa.data.manifest import Manifest, write_manifest
from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name, write_shards
from avsa.errors import ShardError

pytestmark = pytest.mark.slow

CLIPS = 8  # even: Ray Train's equal split drops rows beyond a multiple of the workers
PER_SHARD = 3


def tiny_cfg(**kw) -> DataConfig:
    base = dict(num_viewpoints=2, frames=4, crop_size=32, n_mels=32, shuffle_buffer=4,
                decode_cpus=1.0)
    return DataConfig(**{**base, **kw})


def _members(clip_dir: Path, key: str) -> dict[str, bytes]:
    return {ext: (clip_dir / f"{key}.{ext}").read_bytes() for ext in ("mp4", "json", "masks.npz")}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    synth.write_dataset(out, CLIPS, 1.5, seed=0, progress=False, width=128, height=64)
    return out


@pytest.fixture(scope="module")
def shard_set(clip_dir, tmp_path_factory) -> tuple[str, list[str]]:
    """(shard folder URI, sample keys) of the clean set: 8 clips in shards of 3, 3 and 2."""
    uri = str(tmp_path_factory.mktemp("shards"))
    write_shards(str(clip_dir), uri, samples_per_shard=PER_SHARD, progress=False)
    keys = sorted(p.stem for p in clip_dir.glob("*.mp4"))
    return uri, keys


def _write_set(uri: str, shards: list[list[RawSample]]) -> None:
    infos = []
    for i, samples in enumerate(shards):
        data = pack_shard(samples)
        storage.write_bytes(storage.join(uri, shard_name(i)), data)
        infos.append(shard_info(shard_name(i), data, len(samples)))
    write_manifest(uri, Manifest(split="train", shards=infos,
                                 total_samples=sum(i.samples for i in infos)))


@pytest.fixture(scope="module")
def corrupt_set(clip_dir, tmp_path_factory) -> str:
    """Shard 0: three samples, the middle one's video truncated; shard 1: one sample, corrupt."""
    keys = sorted(p.stem for p in clip_dir.glob("*.mp4"))[:4]
    samples = [RawSample(k, _members(clip_dir, k)) for k in keys]
    samples[1].members["mp4"] = samples[1].members["mp4"][:2000]
    samples[3].members["mp4"] = b"\x00" * 500
    uri = str(tmp_path_factory.mktemp("corrupt"))
    _write_set(uri, [samples[:3], samples[3:]])
    return uri


def test_items_visit_every_shard_once_per_epoch_in_seeded_order(shard_set):
    uri, _ = shard_set
    items = pipeline.shard_items(uri, epochs=3, seed=7)
    assert len(items) == 9
    for epoch in range(3):
        names = sorted(i["uri"] for i in items if i["epoch"] == epoch)
        assert names == sorted(storage.join(uri, shard_name(k)) for k in range(3))
    assert items == pipeline.shard_items(uri, epochs=3, seed=7)
    orders = {tuple(i["uri"] for i in pipeline.shard_items(uri, epochs=1, seed=s)) for s in range(8)}
    assert len(orders) > 1


def test_iter_local_batches(shard_set):
    uri, keys = shard_set
    cfg = tiny_cfg()
    batches = list(pipeline.iter_local(uri, cfg, seed=0, batch_size=3, with_masks=True,
                                       misalign_prob=0.5))
    assert [len(b["key"]) for b in batches] == [3, 3, 2]
    b = batches[0]
    assert tuple(b["video"].shape) == (3, 2, 3, 4, 32, 32)
    assert tuple(b["audio"].shape) == (3, 2, 4, 100, 32)
    assert tuple(b["masks"].shape) == (3, 2, 32, 32)
    assert tuple(b["labels"].shape) == (3, len(synth.CLASSES))
    assert tuple(b["aligned"].shape) == (3,)
    seen = [k for b in batches for k in b["key"]]
    assert sorted(seen) == keys
    assert sum(int(b["skipped"].sum()) for b in batches) == 0
    # the same seed gives the same stream; no shuffle gives manifest order
    again = next(pipeline.iter_local(uri, cfg, seed=0, batch_size=3, with_masks=True,
                                     misalign_prob=0.5))
    assert again["key"] == b["key"]
    assert (again["video"] == b["video"]).all()
    ordered = list(pipeline.iter_local(uri, cfg, seed=0, batch_size=4, shuffle=False))
    assert [k for b in ordered for k in b["key"]] == keys


def test_iter_local_skips_and_counts_corrupt_samples(corrupt_set):
    batches = list(pipeline.iter_local(corrupt_set, tiny_cfg(), seed=0, batch_size=8,
                                       shuffle=False))
    assert len(batches) == 1
    assert len(batches[0]["key"]) == 2
    assert int(batches[0]["skipped"].sum()) == 2


def test_placeholder_row_matches_real_rows(shard_set):
    uri, _ = shard_set
    cfg = tiny_cfg(audio_seconds=0.5)  # AVTS needs clips of 2 x audio_seconds: these are 1.5 s
    opts = dict(other_time=True, misalign_prob=0.5, with_masks=True)
    item = pipeline.shard_items(uri, epochs=1, seed=0, shuffle=False)[2]
    real = next(pipeline.decode_shard(item, cfg=cfg, seed=0, **opts))
    fake = pipeline.placeholder_row(cfg, epoch=0, skipped=3, **opts)
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in fake.items()} == \
        {k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}
    assert int(fake["valid"]) == 0 and int(real["valid"]) == 1


def test_missing_shard_is_named_or_skipped_and_counted(shard_set, tmp_path):
    src, keys = shard_set
    uri = str(tmp_path / "set")
    storage.copy_tree(src, uri)
    storage.delete(storage.join(uri, shard_name(1)))
    storage.write_bytes(storage.join(uri, "old", shard_name(1)), b"a namesake elsewhere")
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        pipeline.build_dataset(uri, tiny_cfg(), epochs=1, seed=0)
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        next(pipeline.iter_local(uri, tiny_cfg(), seed=0, batch_size=2))
    batches = list(pipeline.iter_local(uri, tiny_cfg(), seed=0, batch_size=2,
                                       skip_missing_shards=True))
    assert sorted(k for b in batches for k in b["key"]) == keys[:PER_SHARD] + keys[2 * PER_SHARD:]
    assert sum(int(b["skipped"].sum()) for b in batches) == PER_SHARD
    assert sum(int(b["missing_shards"].sum()) for b in batches) == 1


def test_read_ahead_is_bounded_by_batches_and_shards(shard_set):
    """The object store may hold the consumer's prefetch window plus read_ahead_batches
    global batches of rows, in whole shards, and decoding decode_tasks * decode_cpus CPUs
    (no cap with 0 tasks)."""
    cfg = tiny_cfg(read_ahead_batches=2, decode_tasks=3, decode_cpus=0.5)
    row = pipeline.row_bytes(cfg)
    assert row == sum(np.asarray(v).nbytes for v in pipeline.placeholder_row(
        cfg, epoch=0, skipped=0).values())
    opts = pipeline.ingest_options(cfg, batch_size=4, shard_samples=3, row_size=row)
    # (2 + 1) batches of 4 held by the consumer: 4 shards + 1 partly read; 2 batches ahead:
    # 3 shards; 1 shard in decoding: 9 shards of 3 rows
    assert opts.resource_limits.object_store_memory == 27 * row
    assert opts.resource_limits.cpu == 1.5
    small = pipeline.ingest_options(tiny_cfg(read_ahead_batches=1), batch_size=1,
                                    shard_samples=3, row_size=row)
    assert small.resource_limits.object_store_memory == 4 * 3 * row  # 2 held, 1 ahead, 1 decoding
    assert small.resource_limits.cpu == float("inf")  # None: no cap


def test_bounded_ray_dataset_yields_every_row(ray_session, shard_set):
    """Backpressure at the smallest budget (4 shards' rows) still delivers every sample,
    and a limited, unshuffled stream (the validation set) is the manifest's first rows."""
    uri, keys = shard_set
    cfg = tiny_cfg(read_ahead_batches=1)
    ds = pipeline.build_dataset(uri, cfg, epochs=2, seed=0, batch_size=1, keys=True)
    assert ds.context.execution_options.resource_limits.object_store_memory == (
        4 * PER_SHARD * pipeline.row_bytes(cfg))
    rows = list(ds.iter_rows())
    assert sorted(r["key"] for r in rows) == sorted(keys * 2)
    val = pipeline.build_dataset(uri, cfg, epochs=1, seed=0, batch_size=2, keys=True,
                                 shuffle=False, limit=4)
    assert [r["key"] for r in val.iter_rows()] == keys[:4]


def test_ray_dataset_skips_corrupt_samples_without_ending_the_epoch(ray_session, corrupt_set):
    ds = pipeline.build_dataset(corrupt_set, tiny_cfg(), epochs=1, seed=0)
    skipped, ids, placeholders = 0, [], 0
    # every row converts to torch, the all-corrupt shard's placeholder included
    for batch in ds.iter_torch_batches(batch_size=4):
        real = batch["valid"] == 1
        placeholders += int((~real).sum())
        skipped += int(batch["skipped"].sum())
        ids += batch["key_id"][real].tolist()
    assert skipped == 2
    assert placeholders == 1
    assert sorted(ids) == sorted(pipeline.key_id(k) for k in ("clip-000000", "clip-000002"))


def test_ray_dataset_with_missing_shard_skipped(ray_session, shard_set, tmp_path):
    src, keys = shard_set
    uri = str(tmp_path / "set")
    storage.copy_tree(src, uri)
    storage.delete(storage.join(uri, shard_name(0)))
    ds = pipeline.build_dataset(uri, tiny_cfg(), epochs=1, seed=0, skip_missing_shards=True,
                                keys=True)
    rows = list(ds.iter_rows())
    assert {r["key"] for r in rows if r["valid"]} == set(keys[PER_SHARD:])
    assert sum(int(r["skipped"]) for r in rows) == PER_SHARD
    assert sum(int(r["missing_shards"]) for r in rows) == 1
    assert sum(int(r["valid"]) for r in rows) == CLIPS - PER_SHARD


def test_two_ray_train_workers_see_each_sample_once_per_epoch(ray_session, shard_set, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    uri, keys = shard_set
    ds = pipeline.build_dataset(uri, tiny_cfg(), epochs=1, seed=0)
    out = tmp_path / "seen"
    out.mkdir()

    def collect(config):
        shard = ray.train.get_dataset_shard("train")
        ids, epochs, skipped = [], [], 0
        for batch in shard.iter_torch_batches(batch_size=2, local_shuffle_buffer_size=4):
            real = batch["valid"] == 1
            skipped += int(batch["skipped"].sum())
            ids += batch["key_id"][real].tolist()
            epochs += batch["epoch"][real].tolist()
            assert tuple(batch["video"].shape[1:]) == (2, 3, 4, 32, 32)
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(
            json.dumps({"ids": ids, "epochs": epochs, "skipped": skipped}))

    trainer = TorchTrainer(
        collect, train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="pipeline-test", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["ids"] for r in reports)  # both workers got data
    pairs = sorted((e, i) for r in reports for e, i in zip(r["epochs"], r["ids"]))
    expected = sorted((0, pipeline.key_id(k)) for k in keys)
    assert pairs == expected
    assert sum(r["skipped"] for r in reports) == 0


def _seeded_keys(uri: str, keys: list[str], *, epochs: int, seed: int) -> list[str]:
    """The shard set's keys in the order of its seeded work items."""
    by_uri = {storage.join(uri, shard_name(i)): keys[PER_SHARD * i:PER_SHARD * (i + 1)]
              for i in range(3)}
    items = pipeline.shard_items(uri, epochs=epochs, seed=seed)
    return [k for item in items for k in by_uri[item["uri"]]]


def test_a_run_of_many_epochs_plans_at_most_max_blocks_in_the_seeded_order(
        ray_session, shard_set, monkeypatch):
    """Items past MAX_BLOCKS share blocks (a decode task takes several shards in turn), so a
    long run over few shards starts in seconds rather than minutes; it still sees every sample
    once per epoch, in the seeded order."""
    uri, keys = shard_set
    monkeypatch.setattr(pipeline, "MAX_BLOCKS", 4)
    ds = pipeline.build_dataset(uri, tiny_cfg(), epochs=5, seed=3, batch_size=2, keys=True)
    assert [r["key"] for r in ds.iter_rows()] == _seeded_keys(uri, keys, epochs=5, seed=3)
    assert "FlatMap(decode_shard): 4 tasks executed" in ds.stats()


def test_shuffled_ray_dataset_keeps_the_seeded_shard_order(ray_session, shard_set):
    """A training stream (shuffled, read-ahead bounded or not) tells Ray Data to keep the seeded
    shard order, so a run sees the same samples in the same order each time; a decode task
    that finishes early may overtake only when data.preserve_order is off."""
    uri, keys = shard_set
    seeded = _seeded_keys(uri, keys, epochs=1, seed=3)
    for batch_size in (None, 2):
        ds = pipeline.build_dataset(uri, tiny_cfg(), epochs=1, seed=3, batch_size=batch_size,
                                    keys=True)
        assert ds.context.execution_options.preserve_order
        assert [r["key"] for r in ds.iter_rows()] == seeded
        loose = pipeline.build_dataset(uri, tiny_cfg(preserve_order=False), epochs=1, seed=3,
                                       batch_size=batch_size)
        assert not loose.context.execution_options.preserve_order
