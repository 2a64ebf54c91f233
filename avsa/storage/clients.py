"""The S3 clients behind :mod:`avsa.storage`: settings, per-process clients, one-line errors.

boto3 serves whole objects, listings and conditional puts; ``pyarrow.fs.S3FileSystem`` streaming
reads and Ray's storage. Both retry on their own; nothing here loops on top. Clients are made
lazily, once per process and AWS environment, and never pickled.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from avsa.errors import ConfigError, StorageError

_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken"}
# Environment that decides which clients a process gets; hashed, so no secret is kept in a key.
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_MAX_ATTEMPTS",
               "AWS_RETRY_MODE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@dataclass(frozen=True)
class S3Settings:
    """How this process reaches S3: plain values (they pickle), read from the environment.

    Both libraries retry throttling, 5xx and connection failures with full-jitter backoff:
    botocore's 12 attempts wait at most 66 s, pyarrow's 8 at most 71 s (docs/reliability.md).
    ``AWS_MAX_ATTEMPTS`` sets both counts, ``AWS_RETRY_MODE`` botocore's mode. ``endpoint``:
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else the AWS config file's, which boto3
    reads and pyarrow would not; None: AWS itself.
    """

    endpoint: str | None = None
    region: str | None = None
    retry_mode: str = "standard"
    max_attempts: int = 12  # botocore, first attempt included
    stream_max_attempts: int = 8  # pyarrow, first attempt included
    connect_timeout: float = 5.0  # seconds per attempt
    read_timeout: float = 60.0  # seconds without data per attempt

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        mode = env.get("AWS_RETRY_MODE") or cls.retry_mode
        if mode not in ("standard", "adaptive"):
            raise ConfigError("AWS_RETRY_MODE", f"must be standard or adaptive, got {mode!r}")
        attempts = {}
        if raw := env.get("AWS_MAX_ATTEMPTS"):
            if not raw.strip().isdecimal() or int(raw) < 1:
                raise ConfigError("AWS_MAX_ATTEMPTS", "must be a whole number of attempts >= 1, "
                                                      f"got {raw!r}")
            attempts = {"max_attempts": int(raw), "stream_max_attempts": int(raw)}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(endpoint=endpoint or _config_file_endpoint(),
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                   retry_mode=mode, **attempts)

    def boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
                        connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, config=config)

    def pyarrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {"region": self.region or ("us-east-1" if self.endpoint else None)}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs.update(scheme=parsed.scheme or "https",
                          endpoint_override=parsed.netloc or self.endpoint)
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=self.stream_max_attempts)
        return pafs.S3FileSystem(connect_timeout=self.connect_timeout,
                                 request_timeout=self.read_timeout, retry_strategy=retry, **kwargs)


def cached(kind: str) -> tuple[S3Settings, Any]:
    """This process's settings and ``kind`` ("boto3" or "pyarrow") client for the AWS env."""
    env = "\0".join(os.environ.get(k, "") for k in _CLIENT_ENV)
    return _client(kind, os.getpid(), hashlib.sha256(env.encode()).hexdigest())


def _config_file_endpoint() -> str | None:
    """The S3 endpoint the AWS config file sets (``endpoint_url``, of the profile or its
    ``services`` section), resolved by boto3 itself: the endpoint it picks against the one it
    picks ignoring the file. None when they agree, or when the profile does not exist (boto3
    says so when the client is made)."""
    path = os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    try:
        if "endpoint_url" not in Path(path).read_text(errors="replace"):
            return None  # the common case, without making two clients (0.3 s)
    except OSError:
        return None
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound

    try:
        resolved, default = (
            boto3.session.Session().client("s3", config=config).meta.endpoint_url
            for config in (Config(), Config(ignore_configured_endpoint_urls=True)))
    except ProfileNotFound:
        return None
    return resolved if resolved != default else None


@functools.lru_cache(maxsize=16)
def _client(kind: str, pid: int, env_digest: str) -> tuple[S3Settings, Any]:
    s3 = S3Settings.from_env()
    return s3, s3.boto3_client() if kind == "boto3" else s3.pyarrow_filesystem()


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(uri, "S3 URI has no bucket")
    return bucket, key


def call(uri: str, fn: Callable[[Any, str, str], Any]) -> Any:
    """``fn(client, bucket, key)`` of ``uri`` once (botocore retries inside it); failures become
    a StorageError."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError

    bucket, key = split_s3(uri)
    s3, client = cached("boto3")
    start = time.monotonic()
    try:
        return fn(client, bucket, key)
    except (BotoCoreError, ClientError, Boto3Error, RetriesExceededError) as exc:
        cause = getattr(exc, "last_exception", None) or exc  # s3transfer's retries ran out
        raise _boto3_error(uri, cause, s3, time.monotonic() - start) from exc


def _boto3_error(uri: str, exc: Exception, s3: S3Settings, elapsed: float) -> StorageError:
    from botocore import exceptions as e

    if isinstance(exc, (e.NoCredentialsError, e.PartialCredentialsError)):
        return StorageError(uri, "no AWS credentials found (env, shared files or metadata)")
    if isinstance(exc, (e.ConnectionError, e.HTTPClientError)):
        return _unreachable(uri, s3, elapsed, type(exc).__name__, s3.max_attempts)
    if not isinstance(exc, e.ClientError):
        return StorageError(uri, " ".join(str(exc).split()))
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return StorageError(uri, f"bucket {split_s3(uri)[0]!r} does not exist")
    if code in ("404", "NotFound", "NoSuchKey"):
        return _missing(uri)
    if code in _DENIED_CODES:
        return StorageError(uri, f"access denied ({code}); check credentials and bucket policy")
    message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
    return StorageError(uri, f"S3 error {code}: {message}".rstrip(": "))


def _pyarrow_error(uri: str, exc: OSError, s3: S3Settings, elapsed: float) -> StorageError:
    """pyarrow reports S3 failures as OSError text holding the AWS SDK's error name."""
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        return _missing(uri)
    if "NETWORK_CONNECTION" in text:
        return _unreachable(uri, s3, elapsed, "NETWORK_CONNECTION", s3.stream_max_attempts)
    if "ACCESS_DENIED" in text:
        return StorageError(uri, "access denied (ACCESS_DENIED); check credentials and bucket policy")
    return StorageError(uri, text)


def _unreachable(uri: str, s3: S3Settings, elapsed: float, what: str, attempts: int) -> StorageError:
    return StorageError(uri, f"{s3.endpoint or 'the S3 endpoint'} unreachable after {elapsed:.1f} s "
                             f"({what}; at most {attempts} attempts)")


def _missing(uri: str) -> StorageError:
    """'object not found', or 'bucket ... does not exist' when that is why."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = split_s3(uri)[0]
    try:
        cached("boto3")[1].head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
            return StorageError(uri, f"bucket {bucket!r} does not exist")
    except BotoCoreError:
        pass
    return StorageError(uri, "object not found")


class S3Stream(io.RawIOBase):
    """A pyarrow S3 input stream as a Python file whose failures are StorageErrors naming the
    URI; each ``readinto`` is one ranged GET, which the AWS SDK retries."""

    def __init__(self, uri: str):
        self.uri = uri
        self.s3, fs = cached("pyarrow")
        self.stream = self._call(lambda: fs.open_input_stream(uri[len("s3://"):],
                                                              compression=None))

    def _call(self, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return fn()
        except OSError as exc:
            raise _pyarrow_error(self.uri, exc, self.s3, time.monotonic() - start) from exc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._call(lambda: self.stream.readinto(buffer))

    def readall(self) -> bytes:
        return self._call(self.stream.read)

    def close(self) -> None:
        if hasattr(self, "stream"):
            self.stream.close()
        super().close()
