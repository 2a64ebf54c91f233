"""One place for URIs: plain paths, ``file://...`` and ``s3://bucket/key``.

S3 goes through the libraries' own clients and retries (:mod:`avsa.storage.clients`); a failure
that outlasts the retries is a one-line :class:`StorageError` naming the URI. Local writes are
atomic (temporary file in the same directory, fsync, ``os.replace``) and create parent
directories.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlparse

from avsa.errors import StorageError
from avsa.storage.clients import S3Settings, S3Stream, cached, call, split_s3

__all__ = ["S3Settings", "copy_tree", "create_exclusive", "delete", "exists",
           "is_s3", "join", "list_prefix", "local_path", "move_tree", "open_input_stream",
           "pyarrow_filesystem", "read_bytes", "relative", "size", "split_s3", "upload_file",
           "write_bytes"]


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | os.PathLike) -> Path:
    """Filesystem path of a plain path or ``file://`` URI (percent-encoded, RFC 8089)."""
    uri = str(uri)
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``uri`` with path segments appended (percent-encoded under ``file://``, so that
    `local_path` gives back the names: "#", "?" and "%" are data there)."""
    uri = str(uri)
    if is_s3(uri) or uri.startswith("file://"):
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if uri.startswith("file://"):
            tail = quote(tail)
        return f"{uri.rstrip('/')}/{tail}" if tail else uri
    return str(Path(uri, *parts))


def _local(uri: str, fn: Callable[[Path], Any]) -> Any:
    try:
        return fn(local_path(uri))
    except FileNotFoundError as exc:
        raise StorageError(uri, "no such file or directory") from exc
    except OSError as exc:
        raise StorageError(uri, exc.strerror or type(exc).__name__) from exc


def _atomic_write(path: Path, write: Callable[[BinaryIO], None],
                  place: Callable[[str, Path], None] = os.replace) -> None:
    """`write` a temporary file beside `path`, fsync it, then `place` it at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        place(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file/object; on S3 through s3transfer, which also retries a body cut short."""
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri, Path.read_bytes)
    from boto3.s3.transfer import TransferConfig

    def get(c: Any, bucket: str, key: str) -> bytes:
        out = io.BytesIO()
        c.download_fileobj(bucket, key, out, Config=TransferConfig(use_threads=False))
        return out.getvalue()

    return call(uri, get)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri, lambda p: _atomic_write(p, lambda f: f.write(data)))
    call(uri, lambda c, bucket, key: c.put_object(Bucket=bucket, Key=key, Body=data))


def create_exclusive(uri: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there yet, atomically; False if something is.
    Locally a temporary file is hard-linked into place (``link`` fails on an existing name); on
    S3 a conditional put (``If-None-Match: *``)."""
    uri = str(uri)
    if not is_s3(uri):
        def create(p: Path) -> bool:
            try:
                _atomic_write(p, lambda f: f.write(data), place=os.link)
                return True
            except FileExistsError:
                return False

        return _local(uri, create)
    from botocore.exceptions import ClientError

    def put(c: Any, bucket: str, key: str) -> bool:
        try:
            c.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise

    return call(uri, put)


def exists(uri: str | os.PathLike) -> bool:
    """True for an existing file/object, or a directory/prefix holding at least one object."""
    uri = str(uri)
    if not is_s3(uri):
        return local_path(uri).exists()
    from botocore.exceptions import ClientError

    def probe(c: Any, bucket: str, key: str) -> bool:
        if key and not key.endswith("/"):
            try:
                c.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NotFound"):
                    raise
        prefix = f"{key.rstrip('/')}/" if key else ""
        return c.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)["KeyCount"] > 0

    return call(uri, probe)


def size(uri: str | os.PathLike) -> int:
    """Size of a file/object in bytes."""
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri, lambda p: p.stat().st_size)
    return call(uri, lambda c, bucket, key: c.head_object(Bucket=bucket, Key=key)["ContentLength"])


def delete(uri: str | os.PathLike) -> None:
    """Delete one file/object; a missing one is not an error."""
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri, lambda p: p.unlink(missing_ok=True))
    call(uri, lambda c, bucket, key: c.delete_object(Bucket=bucket, Key=key))


def list_prefix(uri: str | os.PathLike, page_size: int = 1000) -> list[str]:
    """Every file/object under the directory/prefix ``uri``, recursively, as sorted URIs that
    each begin ``uri.rstrip("/") + "/"`` (``page_size`` keys per S3 list request)."""
    uri = str(uri)
    if not is_s3(uri):
        root = local_path(uri)
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        rel = (p.relative_to(root).as_posix() for p in files)
        if uri.startswith("file://"):
            return sorted(join(uri, r) for r in rel)
        return sorted(f"{uri.rstrip('/')}/{r}" for r in rel)  # join() would normalise uri

    def keys(c: Any, bucket: str, key: str) -> list[str]:
        pages = c.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{key.rstrip('/')}/" if key else "",
            PaginationConfig={"PageSize": page_size})
        return [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", [])]

    return sorted(call(uri, keys))


def relative(uri: str, folder: str | os.PathLike) -> str:
    """The part of ``uri``, listed by ``list_prefix(folder)``, below ``folder``."""
    return uri[len(str(folder).rstrip("/")) + 1:]


def upload_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    uri, local = str(uri), Path(local)
    if not local.is_file():
        raise StorageError(str(local), "no such file to upload")
    if not is_s3(uri):
        return _local(uri, lambda p: _atomic_write(p, lambda f: _copy(local, f)))
    call(uri, lambda c, bucket, key: c.upload_file(str(local), bucket, key))


def _copy(src: Path, dst: BinaryIO) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 1 << 20)


def copy_tree(local_dir: str | os.PathLike, uri: str | os.PathLike) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri`` keeping relative paths; returns URIs."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(str(root), "not a directory")
    out = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        out.append(join(str(uri), p.relative_to(root).as_posix()))
        upload_file(p, out[-1])
    return out


def open_input_stream(uri: str | os.PathLike, buffer_size: int = 8 << 20) -> BinaryIO:
    """A buffered binary file object reading ``uri`` front to back (caller closes it); on S3
    each ``buffer_size`` bytes are one ranged GET through ``pyarrow.fs``."""
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri, lambda p: open(p, "rb"))
    split_s3(uri)
    return io.BufferedReader(S3Stream(uri), buffer_size)


def pyarrow_filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``, e.g. Ray's ``storage_filesystem`` and
    ``storage_path``; for S3 the one streaming reads use (path ``bucket/key``). A pickled copy
    has pyarrow's default retries: pyarrow 25 does not pickle them (apache/arrow GH-47348)."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).absolute())
    split_s3(uri)
    return cached("pyarrow")[1], uri[len("s3://"):].rstrip("/")


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the directory/prefix ``src`` to ``dst`` (a rename locally; copy then delete on
    S3, where a prefix has no rename)."""
    src, dst = str(src), str(dst)
    if not is_s3(src):
        return _local(src, lambda p: p.rename(local_path(dst)))
    for uri in list_prefix(src):
        target_bucket, target = split_s3(join(dst, relative(uri, src)))
        call(uri, lambda c, b, k, tb=target_bucket, t=target: c.copy_object(
            Bucket=tb, Key=t, CopySource={"Bucket": b, "Key": k}))
        delete(uri)
