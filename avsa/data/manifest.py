"""The shard manifest: which shards make up a split, their sample counts and checksums.
``manifest.json`` is written after its shards: its presence commits the shard set.

    {"format": "avsa-shards", "version": 1, "split": "train", "total_samples": 64,
     "shards": [{"name": "shard-000000.tar", "samples": 32, "bytes": 12345, "sha256": "ab12..."}],
     "created": "2025-01-01T00:00:00+00:00"}
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from avsa import storage
from avsa.errors import ShardError, StorageError

MANIFEST_NAME = "manifest.json"
FORMAT = "avsa-shards"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name next to the manifest, sample count, size in bytes, sha256 (hex)."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """A split's shards in read order; ``total_samples`` is the sum of their sample counts;
    ``min_seconds`` the length of its shortest clip (None in manifests written before it)."""

    split: str
    shards: list[ShardInfo]
    total_samples: int
    version: int = VERSION
    format: str = FORMAT
    created: str = field(default_factory=_now)
    min_seconds: float | None = None

    def to_json(self) -> str:
        body = {"format": self.format, "version": self.version, "split": self.split,
                "total_samples": self.total_samples,
                "shards": [asdict(s) for s in self.shards], "created": self.created}
        if self.min_seconds is not None:
            body["min_seconds"] = self.min_seconds
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> Manifest:
        """Parse and validate; any problem raises ShardError naming ``uri`` and the field."""
        try:
            body = _object(uri, json.loads(text), "manifest")
        except (ValueError, RecursionError) as e:
            raise ShardError(uri, f"manifest is not valid JSON ({e})") from None
        fmt = _field(uri, body, "format", str)
        if fmt != FORMAT:
            raise _fail(uri, "format", f"expected {FORMAT!r}, got {fmt!r}")
        version = _field(uri, body, "version", int)
        if version != VERSION:
            raise _fail(uri, "version", f"unsupported version {version} (this reader knows "
                                        f"{VERSION})")
        split = _field(uri, body, "split", str)
        total = _field(uri, body, "total_samples", int)
        created = _field(uri, body, "created", str)
        shards = [_shard(uri, item, f"shards[{i}]")
                  for i, item in enumerate(_field(uri, body, "shards", list))]
        duplicates = sorted(n for n, k in Counter(s.name for s in shards).items() if k > 1)
        if duplicates:
            raise _fail(uri, "shards", f"duplicate name {duplicates[0]!r}")
        counted = sum(s.samples for s in shards)
        if counted != total:
            raise _fail(uri, "total_samples", f"{total} but the shards hold {counted}")
        seconds = body.get("min_seconds")
        if seconds is not None and (not isinstance(seconds, (int, float))
                                    or isinstance(seconds, bool)
                                    or not 0 <= seconds < math.inf):
            raise _fail(uri, "min_seconds", f"expected a number >= 0, got {seconds!r:.40}")
        return cls(split=split, shards=shards, total_samples=total, version=version,
                   format=fmt, created=created,
                   min_seconds=None if seconds is None else float(seconds))


_EXPECTED = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _fail(uri: str, where: str, problem: str) -> ShardError:
    return ShardError(uri, f"manifest field {where!r}: {problem}")


def _object(uri: str, value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(uri, where, f"expected an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _field(uri: str, body: dict, key: str, kind: type, where: str | None = None) -> Any:
    """``body[key]`` of type ``kind`` (an int must be >= 0); ShardError naming the field."""
    where = where or key
    if key not in body:
        raise _fail(uri, where, "missing")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(uri, where, f"expected {_EXPECTED[kind]}, got {_kind(value)}")
    if kind is int and value < 0:
        raise _fail(uri, where, f"must be >= 0, got {value}")
    return value


def _shard(uri: str, item: Any, where: str) -> ShardInfo:
    item = _object(uri, item, where)
    name = _field(uri, item, "name", str, f"{where}.name")
    if not is_plain_name(name):
        raise _fail(uri, f"{where}.name", f"{name!r} is not a plain file name")
    sha = _field(uri, item, "sha256", str, f"{where}.sha256")
    if not _SHA256.fullmatch(sha):
        raise _fail(uri, f"{where}.sha256", "expected 64 lowercase hex digits")
    return ShardInfo(name=name, samples=_field(uri, item, "samples", int, f"{where}.samples"),
                     bytes=_field(uri, item, "bytes", int, f"{where}.bytes"), sha256=sha)


def is_plain_name(name: str) -> bool:
    """A file name with no directory part: no '/', '\\', NUL, and not '', '.' or '..'."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def manifest_uri(uri: str) -> str:
    """``uri`` itself when it names a ``.json`` file, else ``uri/manifest.json``."""
    uri = str(uri)
    return uri if uri.endswith(".json") else storage.join(uri, MANIFEST_NAME)


def shard_dir(uri: str) -> str:
    """The folder holding the shards of the manifest at (or in) ``uri``."""
    uri = manifest_uri(uri)
    head, sep, _ = uri.rpartition("/")
    return (head or "/") if sep else "."


def _hint(uri: str) -> str:
    """What to give instead, when ``uri`` is a shard or a folder of clips (local only: a
    listing on S3 would cost a request on an error path that already names the URI)."""
    if uri.endswith(".tar"):
        return "; give the folder of the shards (or its manifest.json), not one shard"
    from avsa.data.ingest import VIDEO_EXTS

    if not storage.is_s3(uri) and any(p.suffix[1:].lower() in VIDEO_EXTS
                                      for p in storage.local_path(uri).glob("*.*")):
        return f"; this folder holds clips: write shards first, `avsa shard {uri} OUT`"
    return ""


def read_manifest(uri: str) -> Manifest:
    """Read and validate the manifest at ``uri`` (a ``.json`` URI or a folder holding one)."""
    path = manifest_uri(uri)
    try:
        text = storage.read_bytes(path)
    except StorageError as e:
        raise ShardError(path, f"cannot read shard manifest: {e.reason}{_hint(str(uri))}") from None
    return Manifest.from_json(text, path)


def write_manifest(uri: str, manifest: Manifest) -> str:
    """Write ``manifest`` atomically to ``uri`` (a ``.json`` URI or a folder); returns its URI."""
    path = manifest_uri(uri)
    storage.write_bytes(path, manifest.to_json().encode())
    return path


def shard_uris(manifest_uri_: str, manifest: Manifest) -> list[str]:
    """Full URIs of the manifest's shards, in manifest order."""
    base = shard_dir(manifest_uri_)
    return [storage.join(base, s.name) for s in manifest.shards]
