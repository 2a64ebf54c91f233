"""The two ends of shard writing: the input clips and the output prefix.

Input (a folder or s3:// prefix, recursively): ``KEY.mp4`` (.mkv, .mov, .webm), optionally
``KEY.m4a`` / ``.wav`` / ``.flac`` / ``.aac`` (4-channel ambiX audio when the video has none),
``KEY.json`` and ``KEY.masks.npz``. In the shard the video is always ``KEY.mp4`` (readers sniff
the container).

Output (:class:`ShardOutput`): each shard is written atomically under its final name and
``manifest.json`` last, so a crash leaves no manifest or the previous complete one (deleted
before a shard it names is overwritten). ``_progress.json`` records the sha256 and size of every
shard written; a shard whose entry matches the fresh bytes and whose object has that size is
not uploaded again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm import tqdm

from avsa import media, storage
from avsa.data import labels
from avsa.data.manifest import Manifest, ShardInfo, manifest_uri, read_manifest, write_manifest
from avsa.errors import MediaError, ShardError

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "mkv", "mov", "webm")
AUDIO_EXTS = tuple(e.lstrip(".") for e in media.AUDIO_SIDECAR_EXTS)
SIDECAR_EXTS = ("json", "masks.npz")
MIN_SECONDS = 1.0
JOURNAL_NAME = "_progress.json"
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Clip:
    """One input sample: ``files`` maps a member extension (no dot) to the file's URI."""

    key: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def video_ext(self) -> str:
        return next(ext for ext in VIDEO_EXTS if ext in self.files)

    @property
    def name(self) -> str:
        """The video's path relative to the input folder, for messages."""
        folder = self.key.rpartition("/")[0]
        base = self.files[self.video_ext].rpartition("/")[2]
        return f"{folder}/{base}" if folder else base

    def read_members(self) -> dict[str, bytes]:
        """Tar members of this clip: extension (no dot) -> bytes; the video goes in as ``mp4``."""
        return {"mp4" if ext in VIDEO_EXTS else ext: storage.read_bytes(uri)
                for ext, uri in self.files.items()}


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`write_shards` did; ``str()`` is the one-line report."""

    uri: str
    shards: int
    samples: int
    bad: list[tuple[str, str]]
    written: int
    unchanged: int
    min_seconds: float = 0.0  # the shortest clip's length

    def __str__(self) -> str:
        return (f"wrote {self.shards} shards, {self.samples} samples "
                f"({len(self.bad)} bad clips skipped; the shortest lasts "
                f"{self.min_seconds:.2f} s) to {self.uri}")


def _split_name(name: str) -> tuple[str, str] | None:
    """``("KEY", "ext")`` for a file name with a known extension (case-insensitive)."""
    lower = name.lower()
    for ext in (*SIDECAR_EXTS, *VIDEO_EXTS, *AUDIO_EXTS):
        if lower.endswith("." + ext) and len(name) > len(ext) + 1:
            return name[: -len(ext) - 1], ext
    return None


def find_clips(input_dir: str) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Clips under ``input_dir`` sorted by key, and ``(name, reason)`` of unusable ones."""
    if not storage.exists(input_dir):
        raise ShardError(input_dir, "input folder does not exist or is empty")
    groups: dict[str, dict[str, str]] = {}
    bad: dict[str, str] = {}
    bad_keys: set[str] = set()
    for uri in storage.list_prefix(input_dir):
        rel = storage.relative(uri, input_dir)
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files, temporaries of atomic writes
        split = _split_name(rel)
        if split is None:
            continue
        key, ext = split
        if "." in key.rpartition("/")[2]:
            if ext in VIDEO_EXTS:
                bad[rel] = ("the name before the extension contains '.', which shards reserve "
                            "to separate key and extension; rename the clip")
            continue
        files = groups.setdefault(key, {})
        for kind, exts in (("video file", VIDEO_EXTS), ("audio sidecar", AUDIO_EXTS)):
            if ext in exts and any(e in files for e in exts):
                bad[rel] = f"more than one {kind} for key {key!r}"
                bad_keys.add(key)
        files[ext] = uri
    clips = [Clip(key, groups[key]) for key in sorted(groups)
             if key not in bad_keys and any(e in groups[key] for e in VIDEO_EXTS)]
    return clips, sorted(bad.items())


def _media_source(uri: str) -> media.Source:
    return storage.read_bytes(uri) if storage.is_s3(uri) else storage.local_path(uri)


def check_clip(clip: Clip) -> tuple[str | None, float]:
    """(why ``clip`` cannot be used, or None; its length in seconds, the shorter of its video
    and audio, 0 when unusable). Unusable: a video under ``MIN_SECONDS``, no 4-channel audio,
    packets missing before the end the header claims, a json that is no object or names an
    unknown class. No decode."""
    if "json" in clip.files:
        name = clip.files["json"].rpartition("/")[2]
        try:
            labels.label_vector(labels.parse_meta(storage.read_bytes(clip.files["json"]), name),
                                name)
        except MediaError as e:
            return str(e), 0.0
    video_uri = clip.files[clip.video_ext]
    try:
        video_src = _media_source(video_uri)
        info = media.probe(video_src, name=video_uri)
        audio = info.audio
        audio_uri = next((clip.files[e] for e in AUDIO_EXTS if e in clip.files), video_uri)
        if audio_uri != video_uri:  # a sidecar
            audio_src = _media_source(audio_uri)
            audio = media.probe_audio(audio_src, name=audio_uri)
            media.check_complete(audio_src, name=audio_uri)
        media.check_complete(video_src, name=video_uri)  # a cut file probes as whole
    except MediaError as e:
        return e.reason, 0.0
    if info.video.duration < MIN_SECONDS:
        return f"video lasts {info.video.duration:.2f} s, need >= {MIN_SECONDS:g} s", 0.0
    if audio is None:
        return ("no audio stream (need 4-channel ambiX audio in the file or a "
                "KEY.m4a/.wav/.flac)"), 0.0
    if audio.channels != 4:
        return (f"{audio_uri.rpartition('/')[2]} has {audio.channels}-channel audio, need 4 "
                "(ambiX)"), 0.0
    if audio.duration and audio.duration < MIN_SECONDS:
        return f"audio lasts {audio.duration:.2f} s, need >= {MIN_SECONDS:g} s", 0.0
    return None, min(info.video.duration, audio.duration or info.video.duration)


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int, bar: tqdm) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads, in order; an error cancels the rest."""
    with ExitStack() as stack:
        if workers <= 1:
            results = map(fn, items)
        else:
            pool = ThreadPoolExecutor(workers)
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = (f.result() for f in [pool.submit(fn, item) for item in items])
        out = []
        for result in results:
            out.append(result)
            bar.update()
        return out


class ShardOutput:
    """The output prefix: journal, previous manifest, and the one-time manifest withdrawal."""

    def __init__(self, uri: str):
        self.uri, self.manifest_uri = uri, manifest_uri(uri)
        self.journal_uri = storage.join(uri, JOURNAL_NAME)
        self.lock = threading.Lock()
        self.previous = self._previous_manifest()
        shards = self.previous.shards if self.previous else []
        self.committed = {s.name for s in shards}
        self.known: dict[str, tuple[str, int]] = {s.name: (s.sha256, s.bytes) for s in shards}
        self.journal = self._read_journal()
        self.known.update(self.journal)

    def _previous_manifest(self) -> Manifest | None:
        if not storage.exists(self.manifest_uri):
            return None
        try:
            return read_manifest(self.manifest_uri)
        except ShardError as e:
            log.warning("ignoring the existing manifest: %s", e)
            return None

    def _read_journal(self) -> dict[str, tuple[str, int]]:
        if not storage.exists(self.journal_uri):
            return {}
        try:
            body = json.loads(storage.read_bytes(self.journal_uri))
            return {str(n): (str(v["sha256"]), int(v["bytes"])) for n, v in body.items()}
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            log.warning("%s: ignoring unreadable journal (%s)", self.journal_uri, e)
            return {}

    def put(self, info: ShardInfo, data: bytes) -> bool:
        """Make the shard object hold ``data``; False when it already did (nothing written)."""
        uri = storage.join(self.uri, info.name)
        if (self.known.get(info.name) == (info.sha256, info.bytes) and storage.exists(uri)
                and storage.size(uri) == info.bytes):
            return False
        with self.lock:
            if self.previous is not None and info.name in self.committed:
                storage.delete(self.manifest_uri)  # it names this shard with other content
                self.previous = None
            if self.journal.pop(info.name, None) is not None:
                self._write_journal()  # a crash mid-overwrite must not leave it vouching
        storage.write_bytes(uri, data)
        with self.lock:
            self.journal[info.name] = (info.sha256, info.bytes)
            self._write_journal()
        return True

    def _write_journal(self) -> None:
        body = {n: {"sha256": s, "bytes": b} for n, (s, b) in sorted(self.journal.items())}
        storage.write_bytes(self.journal_uri, json.dumps(body, indent=1).encode())

    def commit(self, manifest: Manifest) -> None:
        if (self.previous is not None and self.previous.split == manifest.split
                and self.previous.shards == manifest.shards
                and self.previous.min_seconds == manifest.min_seconds):
            return  # identical shard set: keep the committed manifest (and its date)
        write_manifest(self.uri, manifest)
