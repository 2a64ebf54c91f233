"""Bad input, end to end: broken clips given to `avsa shard` and packed inside shards, hostile
tar members and a shard that no longer matches its manifest, read through the pipeline.

Already covered elsewhere (not repeated here): tests/test_shards.py (traversal, links, devices
and oversize members in `iter_shard`, checksum mismatch in `open_shard`, truncated tars, a
corrupt/stereo/short clip in `avsa shard`), tests/test_media.py (truncated and garbage media),
tests/test_pipeline.py (a truncated and a corrupt sample skipped and counted, missing shards)."""

from __future__ import annotations

import io
import logging
import re
import struct
import tarfile
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from avsa import storage
from avsa.config import DataConfig
from avsa.data import pipeline, shard_cli
from avsa.data.manifest import Manifest, read_manifest, write_manifest
from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name
from avsa.encode import encode_clip
from avsa.errors import ShardError

pytestmark = pytest.mark.reliability

FPS, SR, H, W = 8, 8000, 32, 64


def _mp4(path: Path, seconds: float, seed: int) -> bytes:
    """A valid 2:1 clip with 4-channel audio (H.264 + AAC, front-loaded header)."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 255, (round(seconds * FPS), H, W, 3), dtype=np.uint8)
    t = np.arange(round(seconds * SR)) / SR
    foa = (0.2 * np.sin(2 * np.pi * 300 * t) * np.array([[1.0], [0.5], [0.2], [0.7]]))
    encode_clip(path, video, FPS, foa.astype(np.float32), SR)
    return path.read_bytes()


def _wav(channels: int, seconds: float = 2.0, format_tag: int | None = None) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.zeros(round(seconds * SR) * channels, np.int16).tobytes())
    data = bytearray(buf.getvalue())
    if format_tag is not None:  # a codec id no decoder knows
        at = data.index(b"fmt ") + 8
        data[at:at + 2] = struct.pack("<H", format_tag)
    return bytes(data)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("good")
    return [_mp4(folder / f"{seed}.mp4", 2.0, seed) for seed in range(3)]


def _bad_samples(good: list[bytes]) -> dict[str, tuple[dict[str, bytes], str]]:
    """{key: (members, what the skip warning must say)} for each kind of broken clip."""
    clip = good[0]
    assert clip.count(b"avc1") >= 1
    return {
        "zero-length": ({"mp4": b""}, "not a media file"),
        "truncated": ({"mp4": clip[: len(clip) * 3 // 10]}, "truncated"),
        "corrupt": ({"mp4": bytes(np.random.default_rng(1).integers(0, 256, 4000, np.uint8))},
                    "not a media file"),
        "wrong-codec-video": ({"mp4": clip.replace(b"avc1", b"zzzz")},
                              "unsupported video codec"),
        "wrong-codec-audio": ({"mp4": clip, "wav": _wav(4, format_tag=0x7777)},
                              "unsupported audio codec"),
        "wrong-channels": ({"mp4": clip, "wav": _wav(2)}, "expected 4-channel"),
        "bad-json": ({"mp4": clip, "json": b"{not json"}, "invalid JSON"),
    }


# ----------------------------------------------------------------------------- avsa shard


def test_avsa_shard_skips_counts_and_names_each_bad_clip(good, tmp_path, capsys, caplog):
    src = tmp_path / "clips"
    src.mkdir()
    for i, data in enumerate(good[:2]):
        (src / f"ok-{i}.mp4").write_bytes(data)
    (src / "zero-length.mp4").write_bytes(b"")
    (src / "truncated.mp4").write_bytes(good[2][: len(good[2]) * 6 // 10])
    (src / "wrong-codec-video.mp4").write_bytes(good[2].replace(b"avc1", b"zzzz"))
    (src / "wrong-codec-audio.mp4").write_bytes(good[2])
    (src / "wrong-codec-audio.wav").write_bytes(_wav(4, format_tag=0x7777))
    (src / "wrong-channels.mp4").write_bytes(good[2])
    (src / "wrong-channels.wav").write_bytes(_wav(1))
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="avsa"):
        rc = shard_cli.main([str(src), str(out), "--samples-per-shard", "4", "--no-progress"])
    assert rc == 0
    assert re.fullmatch(r"wrote 1 shards, 2 samples \(5 bad clips skipped; the shortest lasts "
                        rf"\d+\.\d\d s\) to {re.escape(str(out))}",
                        capsys.readouterr().out.strip())
    reasons = {r.getMessage().split(":")[0].removeprefix("skipping clip "): r.getMessage()
               for r in caplog.records if r.getMessage().startswith("skipping clip")}
    assert sorted(reasons) == ["truncated.mp4", "wrong-channels.mp4", "wrong-codec-audio.mp4",
                               "wrong-codec-video.mp4", "zero-length.mp4"]
    assert "not a media file" in reasons["zero-length.mp4"]
    assert "truncated: " in reasons["truncated.mp4"]
    assert "unsupported video codec" in reasons["wrong-codec-video.mp4"]
    assert "unsupported audio codec" in reasons["wrong-codec-audio.mp4"]
    assert "wrong-channels.wav has 1-channel audio, need 4" in reasons["wrong-channels.mp4"]
    manifest = read_manifest(str(out))
    assert manifest.total_samples == 2
    keys = [s.key for s in pipeline.shards.open_shard(str(out / shard_name(0)),
                                                        manifest.shards[0])]
    assert keys == ["ok-0", "ok-1"]


def test_avsa_shard_with_only_bad_clips_is_an_error(good, tmp_path, capsys):
    src = tmp_path / "clips"
    src.mkdir()
    (src / "zero-length.mp4").write_bytes(b"")
    rc = shard_cli.main([str(src), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"avsa shard: error: {src}: no usable clips (1 bad)"
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------- inside shards


def _write_set(uri: str, shards: list[list[RawSample]]) -> list[bytes]:
    blobs, infos = [], []
    for i, samples in enumerate(shards):
        data = pack_shard(samples)
        storage.write_bytes(storage.join(uri, shard_name(i)), data)
        blobs.append(data)
        infos.append(shard_info(shard_name(i), data, len(samples)))
    write_manifest(uri, Manifest(split="train", shards=infos,
                                 total_samples=sum(i.samples for i in infos)))
    return blobs


def _cfg() -> DataConfig:
    return DataConfig(num_viewpoints=2, frames=2, fps=FPS, crop_size=16, n_mels=16,
                      shuffle_buffer=0, augment=False)


def test_bad_clips_inside_shards_are_skipped_counted_and_named(good, tmp_path, caplog):
    bad = _bad_samples(good)
    samples = [RawSample(f"good-{i}", {"mp4": g}) for i, g in enumerate(good)]
    samples += [RawSample(key, members) for key, (members, _) in bad.items()]
    uri = str(tmp_path / "set")
    _write_set(uri, [samples[:5], samples[5:]])
    with caplog.at_level(logging.WARNING, logger="avsa"):
        batches = list(pipeline.iter_local(uri, _cfg(), seed=0, batch_size=4, shuffle=False))
    assert sorted(k for b in batches for k in b["key"]) == ["good-0", "good-1", "good-2"]
    assert sum(int(b["skipped"].sum()) for b in batches) == len(bad)
    warned = {r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()}
    assert len(warned) == len(bad)
    for key, (_, says) in bad.items():
        (line,) = [w for w in warned if w.startswith(f"skipping sample {key} in shard ")]
        assert says in line, line
        assert "\n" not in line


# ----------------------------------------------------------------------------- hostile shards


def _tar_with_header_size(name: str, size: int) -> bytes:
    """A tar whose one member header claims `size` bytes but carries 512 (a lying header)."""
    info = tarfile.TarInfo(name)
    info.size = 512
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"x" * 512))
    data = bytearray(buf.getvalue())
    field = f"{size:011o}".encode() + b"\0" if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    data[124:136] = field
    data[148:156] = b"        "
    data[148:156] = f"{sum(data[:512]):06o}".encode() + b"\0 "
    return bytes(data)


def _committed(uri: str, blob: bytes, samples: int = 1) -> None:
    storage.write_bytes(storage.join(uri, shard_name(0)), blob)
    write_manifest(uri, Manifest(split="train", shards=[shard_info(shard_name(0), blob, samples)],
                                 total_samples=samples))


@pytest.mark.parametrize("name, size, says", [
    ("k.mp4", 1 << 40, "is 1099511627776 bytes, over the 2147483648-byte limit"),
    ("k.mp4", (1 << 62) + 7, "over the 2147483648-byte limit"),
    ("../../../etc/k.mp4", 512, "unsafe member name '../../../etc/k.mp4'"),
    ("/root/k.mp4", 512, "unsafe member name '/root/k.mp4'"),
])
def test_hostile_member_in_a_committed_shard_is_refused_by_the_pipeline(name, size, says,
                                                                      tmp_path):
    """The manifest's checksum matches (the shard was committed as is), so the refusal comes
    from the reader, before anything is allocated for the claimed size or written anywhere."""
    uri = str(tmp_path / "set")
    _committed(uri, _tar_with_header_size(name, size))
    start = time.monotonic()
    with pytest.raises(ShardError) as e:
        list(pipeline.iter_local(uri, _cfg(), seed=0, batch_size=1))
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert msg.startswith(storage.join(uri, shard_name(0))) and "\n" not in msg
    assert says in msg
    assert not (tmp_path / "etc").exists()


def test_shard_changed_after_its_manifest_is_a_clear_error(good, tmp_path):
    uri = str(tmp_path / "set")
    (blob,) = _write_set(uri, [[RawSample("good-0", {"mp4": good[0]})]])
    changed = bytearray(blob)
    changed[len(blob) // 2] ^= 0xFF
    storage.write_bytes(storage.join(uri, shard_name(0)), bytes(changed))
    shard = storage.join(uri, shard_name(0))
    with pytest.raises(ShardError, match=rf"^{shard}: cannot read shard: checksum mismatch: "
                                         r"sha256 [0-9a-f]{12}\.\.\., the manifest says"):
        list(pipeline.iter_local(uri, _cfg(), seed=0, batch_size=1))
    # with skip_missing_shards the shard is skipped and its samples counted, not returned
    with pytest.raises(ShardError, match=r"no decodable samples \(1 skipped, 1 unreadable "):
        list(pipeline.iter_local(uri, _cfg(), seed=0, batch_size=1, skip_missing_shards=True))


def test_only_unreadable_empty_shards_are_an_error_not_an_empty_epoch(tmp_path):
    """A missing shard the manifest lists with no samples loses none, but its count must not
    vanish with it: an epoch of nothing is refused, counting the shards it could not read."""
    uri = str(tmp_path / "set")
    _committed(uri, b"", samples=0)
    storage.delete(storage.join(uri, shard_name(0)))
    with pytest.raises(ShardError, match=r"no decodable samples \(0 skipped, 1 unreadable "):
        list(pipeline.iter_local(uri, _cfg(), seed=0, batch_size=1, skip_missing_shards=True))
