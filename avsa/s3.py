"""S3 access behind one object: a lazy boto3 client, bounded retries and one-line errors.

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or the AWS config files)
and credentials from the standard AWS chain (env, shared files, instance metadata); nothing here
takes keys as arguments or logs them. Each operation retries transient failures (connection
refused/reset, timeouts, 5xx, throttling) with exponential backoff for at most
``AVSA_S3_RETRY_SECONDS`` (default 30), then raises :class:`StorageError` naming the URI.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from avsa.errors import ConfigError, StorageError

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken"}
# Environment that decides which client a process gets; hashed, so no secret is kept in a key.
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AVSA_S3_RETRY_SECONDS")
_SESSIONS: dict[tuple[int, str], S3Session] = {}


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(uri, "S3 URI has no bucket")
    return bucket, key


@dataclass
class S3Session:
    """Lazy boto3 S3 client (dropped when pickled) and the retry budget in seconds per operation.

    ``endpoint`` None lets boto3 resolve it from the AWS config files.
    """

    endpoint: str | None = None
    region: str | None = None
    retry_seconds: float = 30.0
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> S3Session:
        env = os.environ
        try:
            retry_seconds = float(env.get("AVSA_S3_RETRY_SECONDS", "30"))
        except ValueError:
            raise ConfigError("AVSA_S3_RETRY_SECONDS", "must be a number of seconds") from None
        return cls(endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                   retry_seconds=retry_seconds)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "max_attempts": 3},
                            connect_timeout=5, read_timeout=60)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=self.region, config=config)
        return self._client

    def call(self, uri: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` with bounded exponential backoff on transient errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        start, delay, attempts = time.monotonic(), 0.25, 0
        while True:
            attempts += 1
            try:
                return fn(self.client)
            except (BotoCoreError, ClientError) as exc:
                left = self.retry_seconds - (time.monotonic() - start)
                if not _transient(exc) or left <= 0:
                    raise self._error(uri, exc, attempts, time.monotonic() - start) from exc
                time.sleep(min(delay, left))
                delay = min(2 * delay, 4.0)

    def _error(self, uri: str, exc: Exception, attempts: int, elapsed: float) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(uri, "no AWS credentials found (env, shared files or metadata)")
        if not isinstance(exc, ClientError):
            if _transient(exc):
                where = self.endpoint or "the S3 endpoint"
                return StorageError(uri, f"{where} unreachable after {attempts} attempts in "
                                         f"{elapsed:.1f} s ({type(exc).__name__})")
            return StorageError(uri, " ".join(str(exc).split()))
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket":
            return StorageError(uri, f"bucket {bucket!r} does not exist")
        if code in ("404", "NotFound", "NoSuchKey"):
            return StorageError(uri, f"bucket {bucket!r} does not exist"
                                if not self._bucket_exists(bucket) else "object not found")
        if code in _DENIED_CODES:
            return StorageError(uri, f"access denied ({code}); check credentials and bucket policy")
        message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
        return StorageError(uri, f"S3 error {code}: {message}".rstrip(": "))

    def _bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket")
        except BotoCoreError:
            pass
        return True


def _transient(exc: Exception) -> bool:
    from botocore import exceptions as e

    if isinstance(exc, (e.ConnectionError, e.HTTPClientError, e.IncompleteReadError)):
        return True
    if isinstance(exc, e.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500
    return False


def session() -> S3Session:
    """This process's :class:`S3Session` for the current AWS environment."""
    env = "\0".join(os.environ.get(k, "") for k in _CLIENT_ENV)
    key = (os.getpid(), hashlib.sha256(env.encode()).hexdigest())
    if key not in _SESSIONS:
        if len(_SESSIONS) >= 8:
            _SESSIONS.clear()
        _SESSIONS[key] = S3Session.from_env()
    return _SESSIONS[key]


class S3Reader(io.RawIOBase):
    """Seekable reader over one S3 object; a dropped connection resumes with a Range request."""

    def __init__(self, uri: str, s3: S3Session):
        self.uri, self.s3, self.pos, self.body = uri, s3, 0, None
        self.bucket, self.key = split_s3(uri)
        self.length = s3.call(uri, self._get)

    def _get(self, client: Any) -> int:
        """(Re)open the body at ``self.pos``; returns the object length in bytes."""
        args = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        response = client.get_object(Bucket=self.bucket, Key=self.key, **args)
        self.body = response["Body"]
        return self.pos + response["ContentLength"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        if target != self.pos:
            self._drop()
            self.pos = max(0, target)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.length:
            return 0

        def chunk(c: Any) -> bytes:
            if self.body is None:
                self._get(c)
            try:
                return self.body.read(len(buffer))
            except Exception:
                self._drop()
                raise

        data = self.s3.call(self.uri, chunk)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _drop(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def close(self) -> None:
        self._drop()
        super().close()
