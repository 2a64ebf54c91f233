"""WebDataset-style tar shards: packing samples, streaming them back, checking them.

A shard is a pax tar ``shard-000000.tar`` whose members are grouped by key (the base name up to
its first dot): ``KEY.mp4``, ``KEY.json``, ``KEY.masks.npz`` form one :class:`RawSample`.
Writing is deterministic (sorted, mtime 0, uid/gid 0, mode 0644): the same samples give the same
sha256. Reading streams the tar (a non-seekable S3 body works) and refuses anything but regular
files of bounded size. :func:`write_shards` turns a folder of clips into shards plus a manifest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

from avsa import storage
from avsa.data.ingest import Clip, ShardOutput, ShardSummary, check_clip, find_clips, ordered_map
from avsa.data.manifest import Manifest, ShardInfo
from avsa.errors import ConfigError, ShardError
from avsa.progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMBER_BYTES = 2 << 30  # 2 GiB: larger members are refused before being read


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class RawSample:
    """One sample's tar members: ``members`` maps the extension without dot to the bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)


def _check_key(key: str, ext: str) -> None:
    base = key.rpartition("/")[2]
    if (not base or "." in base or key.startswith("/") or ".." in PurePosixPath(key).parts
            or "\\" in key or not ext or "/" in ext or ext.startswith(".")):
        raise ShardError(f"{key}.{ext}", "not a valid KEY.EXT member name (the key's base name "
                                         "must be non-empty without '.', no '..' or leading '/')")


def pack_shard(samples: Iterable[RawSample]) -> bytes:
    """A deterministic tar holding ``samples`` (sorted by key, members sorted by extension)."""
    ordered = sorted(samples, key=lambda s: s.key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        previous = None
        for sample in ordered:
            if sample.key == previous:
                raise ShardError(sample.key, "duplicate sample key in one shard")
            previous = sample.key
            for ext in sorted(sample.members):
                _check_key(sample.key, ext)
                data = sample.members[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_info(name: str, data: bytes, samples: int) -> ShardInfo:
    return ShardInfo(name=name, samples=samples, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


class _Corrupt(tarfile.ReadError):
    """Raised from inside tarfile for damage it would otherwise treat as a normal end."""


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that turns a missing end-of-archive marker or a bad header into an error (plain
    ``tarfile`` stops silently there: a shard cut at a member boundary would read as valid)."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the regular end of the archive
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            raise _Corrupt(f"archive ends without an end-of-archive marker ({e})") from None
        except tarfile.InvalidHeaderError as e:
            raise _Corrupt(f"invalid member header ({e})") from None


def _member_key(member: tarfile.TarInfo, name: str, max_bytes: int) -> tuple[str, str]:
    """``(key, ext)`` of a regular-file member, ext "" for a directory; ShardError if unsafe."""
    path = member.name
    if not path or path.startswith("/") or "\\" in path or ".." in PurePosixPath(path).parts:
        raise ShardError(name, f"unsafe member name {path!r} (absolute or path traversal)")
    if member.isdir():
        return path, ""
    if not member.isreg():
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise ShardError(name, f"member {path!r} is a {kind}, not a regular file")
    if member.size > max_bytes:
        raise ShardError(name, f"member {path!r} is {member.size} bytes, over the "
                               f"{max_bytes}-byte limit")
    folder, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not (stem and dot and ext):
        raise ShardError(name, f"member {path!r} is not named KEY.EXT")
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_shard(src: bytes | BinaryIO, name: str, *,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               expected_samples: int | None = None) -> Iterator[RawSample]:
    """Stream the samples of the shard ``src`` (bytes or a binary file object). Unsafe or
    oversized members, keys whose members are not consecutive, duplicates, a corrupt tar and a
    count other than ``expected_samples`` raise :class:`ShardError` naming ``name``."""
    fileobj = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    seen: set[str] = set()  # one key per sample begun
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                key, ext = _member_key(member, name, max_member_bytes)
                if not ext:
                    continue  # a directory entry
                if current is None or key != current.key:
                    if key in seen:
                        raise ShardError(name, f"members of key {key!r} are not contiguous")
                    if current is not None:
                        yield current
                    current = RawSample(key)
                    seen.add(key)
                if ext in current.members:
                    raise ShardError(name, f"duplicate member {member.name!r}")
                current.members[ext] = tar.extractfile(member).read()
                tar.members.clear()  # the stream never revisits members; keep memory flat
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(name, f"corrupt or truncated tar: {e}") from None
    if current is not None:
        yield current
    if expected_samples is not None and len(seen) != expected_samples:
        raise ShardError(name, f"holds {len(seen)} samples, the manifest says {expected_samples}")


def verify_shard(data: bytes, info: ShardInfo, uri: str) -> None:
    """Check ``data`` against the manifest entry ``info``: size, then sha256."""
    if len(data) != info.bytes:
        raise ShardError(uri, f"checksum mismatch: {len(data)} bytes, the manifest says "
                              f"{info.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ShardError(uri, f"checksum mismatch: sha256 {digest[:12]}..., the manifest says "
                              f"{info.sha256[:12]}...")


def open_shard(uri: str, info: ShardInfo | None = None,
               verify: bool = True) -> Iterator[RawSample]:
    """The samples of the shard at ``uri``. With ``info`` and ``verify`` the shard is read whole
    (keep shards to a few hundred MB) and its size and sha256 checked first; otherwise it is
    streamed. A missing shard raises StorageError here, not at the first ``next``."""
    expected = info.samples if info is not None else None
    if info is not None and verify:
        data = storage.read_bytes(uri)
        verify_shard(data, info, uri)
        return iter_shard(data, uri, expected_samples=expected)
    stream = storage.open_input_stream(uri)
    return _closing(iter_shard(stream, uri, expected_samples=expected), stream)


def _closing(samples: Iterator[RawSample], stream: BinaryIO) -> Iterator[RawSample]:
    with stream:
        yield from samples


def write_shards(input_dir: str, output_uri: str, *, samples_per_shard: int = 32,
                 split: str = "train", workers: int = 1, progress: bool = True,
                 on_shard: Callable[[ShardInfo], None] | None = None) -> ShardSummary:
    """Validate the clips in ``input_dir``; write shards, then ``manifest.json`` (the commit
    point, see :mod:`avsa.data.ingest`) to ``output_uri``. Bad clips are skipped with a warning
    each; valid ones, sorted by key, fill shards of ``samples_per_shard``, so the same input
    gives the same shards. ``on_shard(info)`` runs after each shard is in place. ShardError
    when no clip is usable."""
    if samples_per_shard < 1:
        raise ConfigError("samples_per_shard", f"must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    clips, bad = find_clips(input_dir)
    out = ShardOutput(output_uri)  # a bad output URI fails here, before any probing
    with progress_bar(len(clips), "probe", "clip", enabled=progress) as bar:
        checks = ordered_map(check_clip, clips, workers, bar)
    bad += [(c.name, r) for c, (r, _) in zip(clips, checks) if r]
    for name, reason in bad:
        log.warning("skipping clip %s: %s", name, reason)
    good = [c for c, (r, _) in zip(clips, checks) if r is None]
    if not good:
        raise ShardError(input_dir, f"no usable clips ({len(bad)} bad)")
    chunks = [good[i: i + samples_per_shard] for i in range(0, len(good), samples_per_shard)]

    def build(job: tuple[int, list[Clip]]) -> tuple[ShardInfo, bool]:
        index, chunk = job
        data = pack_shard(RawSample(c.key, c.read_members()) for c in chunk)
        info = shard_info(shard_name(index), data, len(chunk))
        written = out.put(info, data)
        if on_shard is not None:
            on_shard(info)
        return info, written

    with progress_bar(len(chunks), "shards", "shard", enabled=progress) as bar:
        results = ordered_map(build, list(enumerate(chunks)), workers, bar)
    infos = [info for info, _ in results]
    written = sum(w for _, w in results)
    shortest = round(min(t for r, t in checks if r is None), 3)
    out.commit(Manifest(split=split, shards=infos, total_samples=sum(i.samples for i in infos),
                        min_seconds=shortest))
    summary = ShardSummary(uri=output_uri, shards=len(infos), samples=len(good), bad=bad,
                           written=written, unchanged=len(infos) - written, min_seconds=shortest)
    log.debug("%s (%d shards already in place)", summary, summary.unchanged)
    return summary
