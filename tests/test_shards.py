"""Shards and manifests: writing from clips, streaming back, refusing bad input, resuming, S3."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from avsa import storage
from avsa.data import shard_cli
from avsa.data.ingest import find_clips
from avsa.data.manifest import (
    Manifest,
    ShardInfo,
    read_manifest,
    shard_uris,
    write_manifest,
)
from avsa.data.shards import (
    RawSample,
    iter_shard,
    open_shard,
    pack_shard,
    shard_info,
    shard_name,
    verify_shard,
    write_shards,
)
from avsa.encode import encode_clip
from avsa.errors import ShardError, StorageError
from avsa.progress import progress_bar

FPS, SR, H, W = 8, 8000, 64, 128
GOOD = ["clip-a", "clip-b", "clip-c", "clip-d", "clip-e"]  # clip-d: video-only + wav sidecar


def _frames(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (round(seconds * FPS), H, W, 3), dtype=np.uint8)


def _write_mp4(path: Path, seconds: float, channels: int | None) -> None:
    """An MP4 with `channels`-channel AAC audio, or none."""
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        if channels:
            aus = c.add_stream("aac", rate=SR, layout={2: "stereo", 4: "quad"}[channels])
        for i, img in enumerate(_frames(seconds, 0)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if channels:
            n = int(seconds * SR)
            pcm = np.zeros((channels, n), np.float32)
            for s in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 1024]),
                                                   format="fltp", layout=aus.layout.name)
                frame.sample_rate, frame.pts = SR, s
                c.mux(aus.encode(frame))
            c.mux(aus.encode(None))


def _write_wav(path: Path, seconds: float, channels: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.zeros(int(seconds * SR) * channels, np.int16).tobytes())


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    """5 good clips (one with json + masks, one with a wav sidecar) and 3 bad ones."""
    d = tmp_path_factory.mktemp("clips")
    t = np.arange(int(2 * SR)) / SR
    foa = (0.3 * np.sin(2 * np.pi * 440 * t) * np.array([[1], [0.5], [0], [0.5]])).astype("f4")
    for i, key in enumerate(["clip-a", "clip-b", "clip-c", "clip-e"]):
        encode_clip(d / f"{key}.mp4", _frames(2, i), FPS, foa, SR)
    (d / "clip-a.json").write_text(json.dumps({"classes": ["disc"], "seconds": 2}))
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=np.zeros((2, H, W), np.uint8))
    (d / "clip-a.masks.npz").write_bytes(buf.getvalue())
    _write_mp4(d / "clip-d.mp4", 2, None)
    _write_wav(d / "clip-d.wav", 2, 4)
    (d / "corrupt.mp4").write_bytes(b"this is not an mp4 " * 50)
    _write_mp4(d / "stereo.mp4", 2, 2)
    _write_mp4(d / "short.mp4", 0.5, 4)
    (d / "notes.txt").write_text("ignored")
    return d


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            payload = (data or {}).get(m.name)
            tar.addfile(m, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _file(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, b"x" * size


def test_write_local_manifest_and_members(clips_dir, tmp_path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        summary = write_shards(str(clips_dir), str(out), samples_per_shard=2, split="val",
                               progress=False)
    assert str(summary) == (f"wrote 3 shards, 5 samples (3 bad clips skipped; the shortest lasts "
                            f"2.00 s) to {out}")
    assert read_manifest(str(out)).min_seconds == 2.0
    warned = {r.getMessage().split(":")[0] for r in caplog.records}
    assert warned == {"skipping clip corrupt.mp4", "skipping clip stereo.mp4",
                      "skipping clip short.mp4"}
    assert "2-channel" in caplog.text and "0.50 s" in caplog.text

    manifest = read_manifest(str(out))
    assert (manifest.split, manifest.total_samples) == ("val", 5)
    assert [(s.name, s.samples) for s in manifest.shards] == [
        ("shard-000000.tar", 2), ("shard-000001.tar", 2), ("shard-000002.tar", 1)]
    samples = []
    for info, uri in zip(manifest.shards, shard_uris(str(out / "manifest.json"), manifest)):
        data = Path(uri).read_bytes()
        assert (info.bytes, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        samples += list(open_shard(uri, info))
    assert [s.key for s in samples] == GOOD
    by_key = {s.key: s.members for s in samples}
    assert sorted(by_key["clip-a"]) == ["json", "masks.npz", "mp4"]
    assert by_key["clip-a"]["json"] == (clips_dir / "clip-a.json").read_bytes()
    assert by_key["clip-a"]["mp4"] == (clips_dir / "clip-a.mp4").read_bytes()
    assert sorted(by_key["clip-d"]) == ["mp4", "wav"]
    assert sorted(by_key["clip-b"]) == ["mp4"]


def test_a_json_sidecar_that_training_would_refuse_is_refused_at_shard_time(tmp_path, caplog):
    clips, out = tmp_path / "clips", tmp_path / "shards"
    clips.mkdir()
    for key, meta in (("ok", '{"classes": ["disc", 3]}'), ("garbled", "{not json"),
                      ("listed", "[1, 2]"), ("unknown", '{"classes": ["drum"]}')):
        _write_mp4(clips / f"{key}.mp4", 1.5, 4)
        (clips / f"{key}.json").write_text(meta)
    with caplog.at_level(logging.WARNING):
        summary = write_shards(str(clips), str(out), progress=False)
    assert (summary.samples, sorted(name for name, _ in summary.bad)) == (
        1, ["garbled.mp4", "listed.mp4", "unknown.mp4"])
    reasons = dict(summary.bad)
    assert reasons["garbled.mp4"].startswith("garbled.json: invalid JSON: ")
    assert reasons["listed.mp4"] == "listed.json: expected a JSON object"
    assert reasons["unknown.mp4"] == "unknown.json: unknown class 'drum'"
    assert "skipping clip unknown.mp4: unknown.json: unknown class 'drum'" in caplog.text


def test_pack_is_deterministic_with_clean_metadata():
    samples = [RawSample("b", {"mp4": b"1", "json": b"{}"}), RawSample("a", {"mp4": b"22"})]
    data = pack_shard(samples)
    assert data == pack_shard(list(reversed(samples)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.mp4", "b.json", "b.mp4"]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}
    with pytest.raises(ShardError, match=r"x\.y"):
        pack_shard([RawSample("x.y", {"mp4": b""})])


def test_checksum_mismatch_is_detected(tmp_path):
    data = pack_shard([RawSample("k", {"json": b"{}"})])
    info = ShardInfo("s.tar", 1, len(data), hashlib.sha256(data).hexdigest())
    verify_shard(data, info, "s.tar")
    bad = bytearray(data)
    bad[600] ^= 1
    with pytest.raises(ShardError, match=r"s\.tar: checksum mismatch: sha256"):
        verify_shard(bytes(bad), info, "s.tar")
    uri = str(tmp_path / "s.tar")
    storage.write_bytes(uri, bytes(bad))
    with pytest.raises(ShardError, match=re.escape(f"{uri}: checksum mismatch")):
        open_shard(uri, info)
    storage.write_bytes(uri, data + b"\0" * 512)
    with pytest.raises(ShardError, match=r"checksum mismatch: \d+ bytes"):
        open_shard(uri, info)
    assert [s.key for s in open_shard(uri, info, verify=False)] == ["k"]


@pytest.mark.parametrize("cut", ["mid-data", "member-boundary", "mid-header", "garbled-header"])
def test_truncated_or_corrupt_shard_names_it(cut):
    data = pack_shard([RawSample("a", {"bin": b"x" * 512}), RawSample("b", {"bin": b"y" * 512})])
    assert len(list(iter_shard(data, "ok.tar"))) == 2
    bad = {"mid-data": data[:700], "member-boundary": data[:1024], "mid-header": data[:1300],
           "garbled-header": data[:1024] + b"\x07" * 512 + data[1536:]}[cut]
    with pytest.raises(ShardError, match=r"^shard-000007\.tar: corrupt or truncated tar"):
        list(iter_shard(bad, "shard-000007.tar"))
    with pytest.raises(ShardError, match=r"^shard-000007\.tar: corrupt"):
        list(iter_shard(io.BufferedReader(io.BytesIO(bad)), "shard-000007.tar"))


def _evil(kind: str) -> bytes:
    if kind in ("traversal", "absolute", "oversize"):
        name = {"traversal": "../../etc/k.json", "absolute": "/etc/k.json",
                "oversize": "k.bin"}[kind]
        info, payload = _file(name, 200)
        return _tar([info], {name: payload})
    info = tarfile.TarInfo("k.mp4")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "other.mp4"
    else:
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return _tar([info])


@pytest.mark.parametrize("kind,reason", [
    ("traversal", "path traversal"), ("absolute", "absolute"), ("symlink", "is a link"),
    ("hardlink", "is a link"), ("device", "device"), ("oversize", "over the 100-byte limit")])
def test_evil_members_are_refused(kind, reason):
    with pytest.raises(ShardError, match=f"^evil.tar: .*{reason}"):
        list(iter_shard(_evil(kind), "evil.tar", max_member_bytes=100))


def test_iter_shard_checks_layout_and_count():
    (a, pa), (b, pb) = _file("k.json", 1), _file("j.json", 1)
    split_key = _tar([a, b, _file("k.mp4", 1)[0]], {"k.json": pa, "j.json": pb, "k.mp4": b"x"})
    with pytest.raises(ShardError, match="not contiguous"):
        list(iter_shard(split_key, "s.tar"))
    with pytest.raises(ShardError, match=r"not named KEY\.EXT"):
        list(iter_shard(_tar([_file("noext", 1)[0]], {"noext": b"x"}), "s.tar"))
    data = pack_shard([RawSample("sub/k", {"mp4": b"1", "masks.npz": b"2"})])
    assert [(s.key, s.members) for s in iter_shard(data, "s.tar", expected_samples=1)] == [
        ("sub/k", {"masks.npz": b"2", "mp4": b"1"})]
    with pytest.raises(ShardError, match="holds 1 samples, the manifest says 2"):
        list(iter_shard(data, "s.tar", expected_samples=2))


SHA = "ab" * 32
VALID = {"format": "avsa-shards", "version": 1, "split": "train", "total_samples": 3,
         "created": "2025-01-01T00:00:00+00:00",
         "shards": [{"name": "shard-000000.tar", "samples": 2, "bytes": 10, "sha256": SHA},
                    {"name": "shard-000001.tar", "samples": 1, "bytes": 10, "sha256": SHA}]}


def _edit(path: str, value) -> str:
    body = json.loads(json.dumps(VALID))
    *parents, last = path.split(".")
    target = body
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    index = int(last) if isinstance(target, list) else last
    if value is KeyError:
        del target[index]
    else:
        target[index] = value
    return json.dumps(body)


@pytest.mark.parametrize("text,field", [
    ("{not json", "not valid JSON"), ("[1, 2]", "'manifest': expected an object"),
    ("[" * 100_000, "not valid JSON"), (b"\xff\xfe\xfa", "not valid JSON"),
    (_edit("format", "tar"), "'format'"), (_edit("version", 2), "'version'"),
    (_edit("split", KeyError), "'split': missing"), (_edit("created", 5), "'created'"),
    (_edit("total_samples", "3"), "'total_samples': expected an integer"),
    (_edit("total_samples", True), "'total_samples': expected an integer"),
    (_edit("total_samples", 4), "'total_samples': 4 but the shards hold 3"),
    (_edit("shards", {"a": 1}), "'shards': expected a list"),
    (_edit("shards", KeyError), "'shards': missing"),
    (_edit("shards.0", "x"), r"'shards\[0\]': expected an object"),
    (_edit("shards.0.samples", -1), r"'shards\[0\].samples': must be >= 0"),
    (_edit("shards.1.bytes", 1.5), r"'shards\[1\].bytes': expected an integer"),
    (_edit("shards.1.sha256", "AB" * 32), r"'shards\[1\].sha256'"),
    (_edit("shards.1.sha256", "ab"), r"'shards\[1\].sha256'"),
    (_edit("shards.1.name", KeyError), r"'shards\[1\].name': missing"),
    (_edit("shards.1.name", "shard-000000.tar"), "duplicate name"),
    (_edit("shards.1.name", "../x.tar"), "not a plain file name"),
    (_edit("shards.1.name", "sub/x.tar"), "not a plain file name"),
    (_edit("shards.1.name", ".."), "not a plain file name"),
    (_edit("shards.1.name", None), r"'shards\[1\].name': expected a string, got nothing"),
])
def test_manifest_parser_rejects_with_shard_error_only(text, field):
    assert Manifest.from_json(json.dumps(VALID), "m.json").total_samples == 3
    with pytest.raises(ShardError, match=r"^s3://b/p/manifest\.json: .*" + field):
        Manifest.from_json(text, "s3://b/p/manifest.json")


def test_manifest_round_trip_and_uris(tmp_path):
    m = Manifest.from_json(json.dumps(VALID), "m.json")
    assert Manifest.from_json(m.to_json(), "x") == m
    folder = str(tmp_path / "set")
    assert write_manifest(folder, m) == str(tmp_path / "set" / "manifest.json")
    assert read_manifest(folder) == read_manifest(folder + "/manifest.json") == m
    assert shard_uris(folder, m) == [f"{folder}/shard-000000.tar", f"{folder}/shard-000001.tar"]
    assert shard_uris("s3://b/p/manifest.json", m)[1] == "s3://b/p/shard-000001.tar"
    missing = re.escape(f"{tmp_path}/nope/manifest.json: cannot read")
    with pytest.raises(ShardError, match="^" + missing):
        read_manifest(str(tmp_path / "nope"))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_crash_leaves_no_manifest_and_rerun_resumes(clips_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for key in ("clip-a", "clip-b", "clip-c"):
        for f in clips_dir.glob(f"{key}.*"):
            (src / f.name).write_bytes(f.read_bytes())

    def crash_after_first(info: ShardInfo) -> None:
        raise RuntimeError(f"killed after {info.name}")

    with pytest.raises(RuntimeError, match=r"killed after shard-000000\.tar"):
        write_shards(str(src), str(out), samples_per_shard=1, progress=False,
                     on_shard=crash_after_first)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["_progress.json", "shard-000000.tar"]
    first = _stat(out / "shard-000000.tar")

    summary = write_shards(str(src), str(out), samples_per_shard=1, progress=False)
    assert (summary.shards, summary.written, summary.unchanged) == (3, 2, 1)
    assert _stat(out / "shard-000000.tar") == first
    assert read_manifest(str(out)).total_samples == 3
    committed = _stat(out / "manifest.json")
    again = write_shards(str(src), str(out), samples_per_shard=1, progress=False)
    assert (again.written, again.unchanged) == (0, 3)
    assert _stat(out / "manifest.json") == committed

    # Changed input + crash: the old manifest must not survive naming a rewritten shard.
    (src / "clip-a.json").write_text('{"classes": ["bell"]}')
    with pytest.raises(RuntimeError):
        write_shards(str(src), str(out), samples_per_shard=1, progress=False,
                     on_shard=crash_after_first)
    assert not (out / "manifest.json").exists()
    write_shards(str(src), str(out), samples_per_shard=1, progress=False, workers=2)
    manifest = read_manifest(str(out))
    for info, uri in zip(manifest.shards, shard_uris(str(out), manifest)):
        verify_shard(Path(uri).read_bytes(), info, uri)


def test_kill_between_shard_and_journal_writes_never_commits_a_wrong_checksum(tmp_path):
    """A process killed right after overwriting a shard, before its journal entry: a rerun
    with the first content must rewrite the shard, not trust the old entry (tar pads to 10 KiB,
    so the sizes match) and commit a manifest whose checksum the object does not have."""
    import subprocess
    import sys

    from avsa.data.ingest import ShardOutput

    def shard(label: int) -> tuple[ShardInfo, bytes]:
        data = pack_shard([RawSample("clip0", {"mp4": b"\0" * 5000,
                                               "json": b'{"classes": [%d]}' % label})])
        return shard_info(shard_name(0), data, 1), data

    (info_a, a), (info_b, _) = shard(1), shard(2)
    assert info_a.bytes == info_b.bytes and info_a.sha256 != info_b.sha256
    out = ShardOutput(str(tmp_path))
    out.put(info_a, a)
    out.commit(Manifest("train", [info_a], 1))
    child = f"""
import os, signal
from avsa import storage
from avsa.data.ingest import ShardOutput
from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name
write = storage.write_bytes
def write_then_die(uri, data):
    write(uri, data)
    if uri.endswith(".tar"):
        os.kill(os.getpid(), signal.SIGKILL)
storage.write_bytes = write_then_die
b = pack_shard([RawSample("clip0", {{"mp4": b"\\0" * 5000, "json": b'{{"classes": [2]}}'}})])
ShardOutput({str(tmp_path)!r}).put(shard_info(shard_name(0), b, 1), b)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert hashlib.sha256((tmp_path / shard_name(0)).read_bytes()).hexdigest() == info_b.sha256

    rerun = ShardOutput(str(tmp_path))
    assert rerun.put(info_a, a) is True
    rerun.commit(Manifest("train", [info_a], 1))
    manifest = read_manifest(str(tmp_path))
    uri = shard_uris(str(tmp_path), manifest)[0]
    verify_shard(Path(uri).read_bytes(), manifest.shards[0], uri)


def test_cli(clips_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = shard_cli.main([str(clips_dir), str(out), "--samples-per-shard", "4", "--split", "test",
                         "--workers", "3", "--no-progress"])
    assert rc == 0
    assert capsys.readouterr().out == (f"wrote 2 shards, 5 samples (3 bad clips skipped; the "
                                       f"shortest lasts 2.00 s) to {out}\n")
    assert read_manifest(str(out)).split == "test"
    assert shard_cli.main([str(tmp_path / "missing"), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/missing" in err
    assert shard_cli.main([str(clips_dir), str(out), "--samples-per-shard", "0"]) == 2


@pytest.mark.slow
def test_s3_round_trip_and_errors(clips_dir, s3_bucket):
    prefix = f"{s3_bucket}/sets/train"
    summary = write_shards(str(clips_dir), prefix, samples_per_shard=2, progress=False)
    assert (summary.shards, summary.samples) == (3, 5)
    manifest = read_manifest(prefix)
    assert read_manifest(f"{prefix}/manifest.json") == manifest
    uris = shard_uris(prefix, manifest)
    assert uris[0] == f"{prefix}/shard-000000.tar"
    keys = [s.key for info, uri in zip(manifest.shards, uris) for s in open_shard(uri, info)]
    assert keys == GOOD
    streamed = [s.key for info, uri in zip(manifest.shards, uris)
                for s in open_shard(uri, info, verify=False)]
    assert streamed == GOOD

    again = write_shards(str(clips_dir), prefix, samples_per_shard=2, progress=False)
    assert again.unchanged == 3
    storage.delete(uris[1])
    with pytest.raises(StorageError, match=r"shard-000001\.tar: object not found"):
        open_shard(uris[1], manifest.shards[1])
    with pytest.raises(StorageError, match=r"shard-000001\.tar: object not found"):
        open_shard(uris[1], manifest.shards[1], verify=False)
    missing = f"s3://no-such-bucket-{os.getpid()}/x"
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-\d+' does not exist"):
        write_shards(str(clips_dir), missing, progress=False)
    with pytest.raises(ShardError, match="cannot read shard manifest: bucket"):
        read_manifest(missing)


def test_a_folder_of_clips_or_one_shard_is_no_manifest_and_says_what_to_give(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.MKV").write_bytes(b"")
    with pytest.raises(ShardError, match=r"no such file or directory; this folder holds clips: "
                                         r"write shards first, `avsa shard .*clips OUT`"):
        read_manifest(str(tmp_path / "clips"))
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"; give the folder of the shards \(or its "
                                         r"manifest.json\), not one shard$"):
        read_manifest(str(tmp_path / "shard-000000.tar"))
    with pytest.raises(ShardError, match=r"no such file or directory$"):
        read_manifest(str(tmp_path / "empty"))


def test_find_clips_groups_and_flags_names(tmp_path, monkeypatch):
    for name in ["a.mp4", "a.json", "a.masks.npz", "b.MKV", "b.wav", "dup.mp4", "dup.mov",
                 "my.clip.mp4", "sub/c.webm", ".hidden/x.mp4", ".a.mp4.tmp", "orphan.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    clips, bad = find_clips(str(tmp_path))
    assert [(c.key, sorted(c.files), c.name) for c in clips] == [
        ("a", ["json", "masks.npz", "mp4"], "a.mp4"), ("b", ["mkv", "wav"], "b.MKV"),
        ("sub/c", ["webm"], "sub/c.webm")]
    assert clips[1].read_members() == {"mp4": b"b.MKV", "wav": b"b.wav"}
    assert [name for name, _ in bad] == ["dup.mp4", "my.clip.mp4"]
    assert "more than one video file for key 'dup'" in bad[0][1]
    expected = [(c.key, sorted(c.files), c.name) for c in clips]
    for cwd, folders in ((tmp_path.parent, (tmp_path.name, f"./{tmp_path.name}/")),
                         (tmp_path, (".", "./"))):  # relative folders: `avsa shard . OUT`
        monkeypatch.chdir(cwd)
        for folder in folders:
            found = find_clips(folder)[0]
            assert [(c.key, sorted(c.files), c.name) for c in found] == expected, folder
            assert found[1].read_members() == {"mp4": b"b.MKV", "wav": b"b.wav"}


def test_synth_clips_shard_with_their_labels(tmp_path):
    from avsa import synth

    paths = synth.write_dataset(tmp_path / "synth", clips=2, seconds=2, seed=3, progress=False,
                                width=128, height=64)
    summary = write_shards(str(tmp_path / "synth"), str(tmp_path / "out"), progress=False)
    assert (summary.shards, summary.samples, summary.bad) == (1, 2, [])
    manifest = read_manifest(str(tmp_path / "out"))
    samples = list(open_shard(shard_uris(str(tmp_path / "out"), manifest)[0], manifest.shards[0]))
    assert [s.key for s in samples] == [p.stem for p in paths]
    for s, p in zip(samples, paths):
        assert sorted(s.members) == ["json", "masks.npz", "mp4"]
        assert s.members["json"] == p.with_suffix(".json").read_bytes()
        assert s.members["mp4"] == p.read_bytes()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_cls, most_redraws", [(io.StringIO, 2), (_Terminal, None)])
def test_progress_bar_redraws_in_place_on_a_terminal_and_rarely_in_a_log(stream_cls,
                                                                          most_redraws):
    """A log keeps every redraw: 0.6 s of updates there are the first and the last state."""
    stream = stream_cls()
    with progress_bar(60, "probe", "clip", stream=stream) as bar:
        for _ in range(60):
            time.sleep(0.01)
            bar.update()
    redraws = [r for r in stream.getvalue().split("\r") if r.strip()]
    assert redraws[-1].startswith("probe: 100%") and "60/60" in redraws[-1]
    if most_redraws is None:
        assert len(redraws) >= 4, redraws
    else:
        assert len(redraws) <= most_redraws, redraws
    with progress_bar(3, "probe", "clip", enabled=False, stream=stream_cls()) as bar:
        bar.update(3)
        assert bar.disable


def test_the_shortest_clip_is_recorded_and_a_longer_audio_window_warned_of(tmp_path, caplog):
    from avsa.config import compose
    from avsa.downstream.sources import ShardSource
    from avsa.train.driver import check_inputs

    src = tmp_path / "clips"
    src.mkdir()
    for key, seconds in (("a", 3.0), ("b", 1.5), ("c", 2.0)):
        _write_mp4(src / f"{key}.mp4", seconds, 4)
    out = tmp_path / "shards"
    summary = write_shards(str(src), str(out), samples_per_shard=2, progress=False)
    assert str(summary).endswith(f"; the shortest lasts 1.50 s) to {out}")
    assert read_manifest(str(out)).min_seconds == pytest.approx(1.5, abs=0.05)
    says = f"{out}: its shortest clip lasts 1.50 s, less than data.audio_seconds=2"
    for seconds, warned in ((2.0, True), (1.0, False)):
        cfg = compose([f"data.shards={out}", "tracking.uri=sqlite:///" + str(tmp_path / "t.db"),
                       f"data.audio_seconds={seconds}", "train.batch_size=2"])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check_inputs(cfg)  # pretrain
            ShardSource.from_config(cfg.data, 2)  # transfer
        assert caplog.text.count(says) == (2 if warned else 0), caplog.text
    # A manifest written before the field is rewritten with it when the same clips are sharded.
    body = json.loads((out / "manifest.json").read_text())
    del body["min_seconds"]
    (out / "manifest.json").write_text(json.dumps(body))
    assert read_manifest(str(out)).min_seconds is None
    write_shards(str(src), str(out), samples_per_shard=2, progress=False)
    assert read_manifest(str(out)).min_seconds == pytest.approx(1.5, abs=0.05)
