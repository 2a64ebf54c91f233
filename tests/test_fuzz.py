"""Bounded property-based fuzzing of the parsers that read untrusted bytes: the shard manifest,
a sample's metadata sidecar (KEY.json, through the public `make_sample`) and the tar shard
reader. Whatever the input, the only exceptions that may escape are the project's own
(`AvsaError` subclasses, one line each). Examples are derandomized, so CI runs the same ones
every time; raise `FUZZ_EXAMPLES` locally for a longer search."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avsa.config import DataConfig
from avsa.data.manifest import Manifest, ShardInfo
from avsa.data.shards import RawSample, iter_shard, pack_shard
from avsa.data.transform import make_sample
from avsa.encode import encode_clip
from avsa.errors import MediaError, ShardError

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# Any JSON value, small.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def _valid_manifest() -> dict:
    shards = [ShardInfo("shard-000000.tar", 2, 10, "a" * 64),
              ShardInfo("shard-000001.tar", 1, 7, "b" * 64)]
    return json.loads(Manifest(split="train", shards=shards, total_samples=3,
                               min_seconds=2.0).to_json())


VALID_MANIFEST = _valid_manifest()
MANIFEST_FIELDS = sorted(VALID_MANIFEST)
SHARD_FIELDS = sorted(VALID_MANIFEST["shards"][0])


def _with_field(kv: tuple[str, object]) -> str:
    return json.dumps({**VALID_MANIFEST, kv[0]: kv[1]})


def _with_shard_field(kv: tuple[str, object]) -> str:
    shards = [dict(s) for s in VALID_MANIFEST["shards"]]
    shards[0][kv[0]] = kv[1]
    return json.dumps({**VALID_MANIFEST, "shards": shards})


def _without(key: str) -> str:
    return json.dumps({k: v for k, v in VALID_MANIFEST.items() if k != key})


def _mutate_text(data) -> str:
    text = json.dumps(VALID_MANIFEST)
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, min(len(text), i + 8)))
    return text[:i] + data.draw(st.text(max_size=8)) + text[j:]


MANIFEST_TEXT = st.one_of(
    st.text(), st.binary(), JSON.map(json.dumps),
    st.tuples(st.sampled_from(MANIFEST_FIELDS), JSON).map(_with_field),
    st.tuples(st.sampled_from(SHARD_FIELDS), JSON).map(_with_shard_field),
    st.sampled_from(MANIFEST_FIELDS).map(_without),
)


def test_the_valid_manifest_parses():
    m = Manifest.from_json(json.dumps(VALID_MANIFEST), "m.json")
    assert (m.total_samples, [s.samples for s in m.shards]) == (3, [2, 1])
    assert m.min_seconds == 2.0
    for bad in ("2", -1, True, float("nan"), float("inf")):
        with pytest.raises(ShardError, match="manifest field 'min_seconds': expected a number"):
            Manifest.from_json(json.dumps({**VALID_MANIFEST, "min_seconds": bad}), "m.json")
    older = {k: v for k, v in VALID_MANIFEST.items() if k != "min_seconds"}
    assert Manifest.from_json(json.dumps(older), "m.json").min_seconds is None


@FUZZ
@given(text=MANIFEST_TEXT)
def test_manifest_parser_raises_only_shard_errors(text):
    try:
        m = Manifest.from_json(text, "s3://b/x/manifest.json")
    except ShardError as e:
        assert str(e).startswith("s3://b/x/manifest.json: ") and "\n" not in str(e)
        return
    # Accepted: then it is self-consistent.
    assert m.total_samples == sum(s.samples for s in m.shards)
    assert all("/" not in s.name and len(s.sha256) == 64 for s in m.shards)
    assert m.min_seconds is None or 0 <= m.min_seconds < math.inf


@FUZZ
@given(data=st.data())
def test_manifest_parser_on_mutated_text(data):
    text = _mutate_text(data)
    try:
        Manifest.from_json(text, "m.json")
    except ShardError as e:
        assert "\n" not in str(e)


# ----------------------------------------------------------------------------- shard reader

BASE_SAMPLES = [RawSample("a", {"mp4": b"x" * 700, "json": b"{}"}),
                RawSample("dir/b", {"mp4": b"y" * 100, "masks.npz": b"z" * 3})]
BASE_SHARD = pack_shard(BASE_SAMPLES)


class _Stream(io.RawIOBase):
    """A non-seekable stream, like an S3 body."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._buf.read(min(len(b), 37))
        b[:len(chunk)] = chunk
        return len(chunk)


def _mutated_shard(data) -> bytes:
    b = bytearray(BASE_SHARD)
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if kind == "truncate":
        return bytes(b[:data.draw(st.integers(0, len(b) - 1))])
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        return bytes(b)
    if kind == "splice":
        i = data.draw(st.integers(0, len(b)))
        b[i:i + data.draw(st.integers(0, 64))] = data.draw(st.binary(max_size=64))
        return bytes(b)
    return data.draw(st.binary(max_size=2048))


def test_the_base_shard_reads_back():
    got = [(s.key, s.members) for s in iter_shard(BASE_SHARD, "s.tar", expected_samples=2)]
    assert got == [(s.key, s.members) for s in BASE_SAMPLES]


@FUZZ
@given(data=st.data(), streamed=st.booleans())
def test_shard_reader_raises_only_shard_errors(data, streamed):
    blob = _mutated_shard(data)
    src = io.BufferedReader(_Stream(blob)) if streamed else blob
    try:
        samples = list(iter_shard(src, "s3://b/shard-000000.tar", expected_samples=2,
                                  max_member_bytes=4096))
    except ShardError as e:
        assert str(e).startswith("s3://b/shard-000000.tar: ") and "\n" not in str(e)
        return
    # Accepted: two samples with safe keys, nothing bigger than the cap.
    assert len(samples) == 2
    for s in samples:
        assert not s.key.startswith("/") and ".." not in s.key.split("/")
        assert all(len(v) <= 4096 for v in s.members.values())


# ----------------------------------------------------------------------------- sample metadata


@functools.cache
def clip() -> dict[str, bytes]:
    """Members of one tiny valid sample: a 1.25 s 64x32 clip and a 2-frame class mask."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (10, 32, 64, 3), dtype=np.uint8)
    foa = (0.1 * rng.standard_normal((4, 10000))).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.mp4"
        encode_clip(path, video, 8.0, foa, 8000)
        mp4 = path.read_bytes()
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=np.ones((2, 32, 64), np.uint8))
    return {"mp4": mp4, "masks.npz": buf.getvalue()}


CFG = DataConfig(num_viewpoints=2, frames=2, fps=8.0, crop_size=8, n_mels=8, sample_rate=8000,
                 hop=80, n_fft=256, augment=False)

META_KEYS = ["classes", "fps", "mask_fps", "label_fps", "sources", "seconds"]
# Numbers JSON can carry that break arithmetic: infinities, NaN, an int no float holds.
AWKWARD = [math.inf, -math.inf, math.nan, 10**400, 1e308, -1, 0.5, "8", [8], {"fps": 8}, True]
META = st.one_of(
    st.tuples(st.sampled_from(META_KEYS[1:4]), st.sampled_from(AWKWARD)).map(
        lambda kv: json.dumps({kv[0]: kv[1]}).encode()),
    st.binary(max_size=64),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(META_KEYS), JSON, max_size=3).map(
        lambda d: json.dumps(d).encode()),
    st.lists(st.one_of(st.sampled_from(["drum", "speech", "nope"]), st.integers(-2, 20),
                       st.floats()), max_size=4).map(
        lambda c: json.dumps({"classes": c, "fps": 8}).encode()),
)


def test_the_valid_sample_decodes():
    raw = RawSample("k", {**clip(), "json": json.dumps({"classes": [1], "fps": 8}).encode()})
    out = make_sample(raw, CFG, seed=0, epoch=0, with_masks=True)
    assert out["labels"][0] == 1.0 and out["labels"].sum() == 1.0
    assert out["masks"].shape == (2, 8, 8) and set(np.unique(out["masks"])) == {1}


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))  # each example decodes a clip
@given(meta=META)
def test_sample_metadata_raises_only_media_errors(meta):
    raw = RawSample("k", {**clip(), "json": meta})
    try:
        out = make_sample(raw, CFG, seed=0, epoch=0, with_masks=True)
    except MediaError as e:
        assert str(e).startswith("k.json: ") and "\n" not in str(e)
        return
    assert out["video"].shape == (2, 3, 2, 8, 8)
    assert set(np.unique(out.get("labels", np.zeros(1)))) <= {0.0, 1.0}
