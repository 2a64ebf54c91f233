"""The connection to MLflow: tracking URIs, the client, its HTTP settings, reachability.

Tracking URIs: ``http(s)://HOST:PORT`` or ``sqlite:///PATH``; the local default is
``sqlite:///<cwd>/mlruns/mlflow.db`` (MLflow 3 refuses the old file store), artifacts beside it.

Retries are MLflow's own (connection errors, timeouts, 429, 5xx). Its defaults retry for
minutes, which would stall a training step: unless the environment sets them, this process
uses 2 retries (about 2.5 s) and a 15 s timeout; a longer outage is the run's buffer's
(:mod:`avsa.tracking.buffer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from avsa.errors import TrackingError

# Userinfo runs to the last "@" of the authority, as urllib splits it (a password may hold "@",
# a token be kilobytes long); the bounded scheme length keeps the scan linear.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,30}://)[^/?#\s]+@")

# MLflow's HTTP settings (mlflow.environment_variables) where the environment sets none.
# Backoff: 0 s before the first retry, FACTOR * 2 s (+ up to JITTER s) before the second.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

T = TypeVar("T")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlruns/mlflow.db`` (absolute, for
    Ray workers elsewhere); TrackingError inside a submitted Ray job, where it would be lost."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return resolve_tracking_uri(env)
    from avsa.ray_job import refuse_untracked_job

    refuse_untracked_job()
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI to use: the default for None/empty, relative local paths made absolute."""
    if not uri:
        return default_tracking_uri()
    uri = str(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{db.resolve()}"
    if urllib.parse.urlparse(uri).scheme == "" and uri != "databricks":
        return Path(uri).resolve().as_uri()
    return uri


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(str(uri)).scheme in ("http", "https")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of any URI in it replaced by ``***@``."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def one_line(e: BaseException, limit: int = 300) -> str:
    """An error as one redacted line of at most ``limit`` characters."""
    text = redact(" ".join(str(e).split()) or type(e).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def connect(uri: str):
    """An MlflowClient for ``uri`` with this process's HTTP settings; prepares the local
    folder of a SQLite store."""
    from mlflow.tracking import MlflowClient

    if is_remote(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def is_transient(e: BaseException) -> bool:
    """Worth trying again later: connection trouble, timeouts, HTTP 5xx and 429 (MLflow
    reports a failed connection as an INTERNAL_ERROR, HTTP 500)."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(e, OSError)


def health(uri: str, timeout_s: float) -> None:
    """One ``GET /health`` through MLflow's request helper (its credentials and TLS settings),
    without retries. Raises when not OK."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    resp = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                        timeout=timeout_s)
    if resp.status_code != 200:
        raise TrackingError(redact(uri), f"MLflow tracking server unhealthy "
                                         f"(HTTP {resp.status_code})")


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """TrackingError("URI: reason"), before any compute, when the store cannot be used: a
    server must answer ``/health`` within ``timeout_s`` and list experiments (credentials)."""
    uri = str(uri)
    where = redact(uri)
    if is_remote(uri):
        try:
            health(uri, timeout_s)
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(where, f"MLflow tracking server unreachable ({one_line(e)})"
                                ) from e
    scheme = urllib.parse.urlparse(uri).scheme
    file_store = uri != "databricks" and scheme in ("", "file")
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(
            where,
            "MLflow 3 refuses the file store; use sqlite:///mlruns/mlflow.db "
            "(or set MLFLOW_ALLOW_FILE_STORE=true)",
        )
    try:
        with _creating(sqlite_path(uri)):
            connect(uri).search_experiments(max_results=1)
    except Exception as e:
        kind = "MLflow tracking server unusable" if is_remote(uri) else "MLflow store unusable"
        raise TrackingError(where, f"{kind} ({one_line(e)})") from e


@contextlib.contextmanager
def _creating(db: Path | None) -> Iterator[None]:
    """One process at a time (a lock on ``<db>.lock``) for a SQLite store's first use, in
    which MLflow creates or migrates its tables: commands started together on a new store
    would otherwise all create them, and all but one fail."""
    with contextlib.ExitStack() as stack:
        if db is not None:
            with contextlib.suppress(OSError):  # a read-only folder: read there, never created
                db.parent.mkdir(parents=True, exist_ok=True)
                lock = stack.enter_context(open(db.with_name(db.name + ".lock"), "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def reading(uri: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()``; any failure (after MLflow's retries) as TrackingError("URI: what failed")."""
    try:
        return fn()
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(redact(uri), f"{what} failed ({one_line(e)})") from e
