"""MLflow tracking behind a few narrow functions.

Everything talks to MLflow through :class:`mlflow.tracking.MlflowClient` with explicit run ids
(never the fluent active-run API), so a :class:`RunLogger` is safe in threads and Ray workers.

Tracking URIs: ``http(s)://HOST:PORT`` (a tracking server), ``sqlite:///PATH`` (a local
database). MLflow 3 refuses the old ``./mlruns`` file store unless
``MLFLOW_ALLOW_FILE_STORE=true``, so the local default is ``sqlite:///<cwd>/mlruns/mlflow.db``
with artifacts in ``<cwd>/mlruns/artifacts``; browse it with
``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Robustness: a :class:`RunLogger` never lets an unreachable server kill training. Metrics, params
and tags that cannot be delivered are buffered in memory (bounded) and delivered, in order and
with their original steps and timestamps, by a later call or by :meth:`RunLogger.end`. MLflow's
own HTTP retries (minutes of backoff by default) are turned down to zero for the process unless
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set, because this
module retries with its own bounded policy.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import logging
import numbers
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from avsa.code_version import code_version_tags
from avsa.errors import TrackingError

logger = logging.getLogger(__name__)

# Tags linking runs together.
KIND = "avsa.kind"  # pretrain | sweep | trial | transfer
TASK = "avsa.task"
PRETRAIN_RUN = "avsa.pretrain_run_id"
CHECKPOINT = "avsa.checkpoint_uri"
PARENT = "mlflow.parentRunId"
KINDS = ("pretrain", "sweep", "trial", "transfer")

_NOTE = "mlflow.note.content"  # the run description shown by the MLflow UI
# The experiment tag MLflow 3's UI reads to open an experiment on its runs table ("Model
# training") instead of the GenAI views (traces).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_VALUE = "custom_model_development"

DEFAULT_LOCAL_DIR = "mlruns"
_SECRET_MARKERS = ("secret", "password", "token", "key_id", "access_key")
# Bounded scheme length keeps the scan linear on long values.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,30}://)[^/@\s]{1,512}@")
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_BATCH_TEXT_BUDGET = 300_000  # chars of params (and of tags) per log_batch request

# Defaults for MLflow's HTTP client, applied only where the environment does not set them.
_HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}

T = TypeVar("T")


# ----------------------------------------------------------------------------- URIs


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlruns/mlflow.db`` (absolute, so
    Ray workers with another working directory write to the same store). Inside a submitted Ray
    job, where that store would be lost, raises TrackingError instead."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return resolve_tracking_uri(env)
    from avsa.ray_job import refuse_untracked_job

    refuse_untracked_job()
    return f"sqlite:///{Path.cwd() / DEFAULT_LOCAL_DIR / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI to use: the default for None/empty, relative local paths made absolute."""
    if not uri:
        return default_tracking_uri()
    uri = str(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if rel and rel != ":memory:":
            return f"sqlite:///{Path(rel).resolve()}"
    if scheme == "" and uri not in ("databricks",):
        return Path(uri).resolve().as_uri()
    return uri


def is_remote(uri: str) -> bool:
    """True for ``http://`` and ``https://`` tracking URIs."""
    return urllib.parse.urlparse(str(uri)).scheme in ("http", "https")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of any URI in it replaced by ``***@``."""
    text = str(text)
    if "@" not in text or "://" not in text:
        return text
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if not path or path == ":memory:" else Path(path)


def _is_file_store(uri: str) -> bool:
    return uri != "databricks" and urllib.parse.urlparse(uri).scheme in ("", "file")


def _client(uri: str):
    """An MlflowClient for ``uri``; prepares the local folder of a SQLite store."""
    from mlflow.tracking import MlflowClient

    if is_remote(uri):
        for name, value in _HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ssl_context() -> ssl.SSLContext | None:
    """TLS settings as MLflow's client takes them from the environment."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


def _health(uri: str, timeout_s: float) -> None:
    """GET ``uri/health``; raises OSError (incl. URLError) or ValueError when not OK."""
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    if parts.username is not None:  # user:password@ as MLflow's client (requests) takes it
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        request = urllib.request.Request(f"{parts._replace(netloc=host).geturl().rstrip('/')}"
                                         f"/health")
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    context = _ssl_context() if uri.startswith("https") else None
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
        if resp.status != 200:
            raise ValueError(f"/health answered HTTP {resp.status}")


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any compute, when the tracking store cannot be used.

    http(s): ``/health`` must answer within ``timeout_s`` and the REST API must list
    experiments (this catches bad credentials too). Local stores: the store must open.
    Raises TrackingError("URI: reason") on failure.
    """
    uri = str(uri)
    where = redact(uri)
    if is_remote(uri):
        try:
            _health(uri, timeout_s)
        except urllib.error.HTTPError as e:
            raise TrackingError(where, f"MLflow tracking server unhealthy (HTTP {e.code})") from e
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                where, f"MLflow tracking server unreachable ({_one_line(reason)})"
            ) from e
    if _is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(
            where,
            "MLflow 3 refuses the file store; use sqlite:///mlruns/mlflow.db "
            "(or set MLFLOW_ALLOW_FILE_STORE=true)",
        )
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        kind = "MLflow tracking server unusable" if is_remote(uri) else "MLflow store unusable"
        raise TrackingError(where, f"{kind} ({_one_line(e)})") from e


# ----------------------------------------------------------------------------- config


def _is_secret(name: str) -> bool:
    low = name.lower()
    return any(marker in low for marker in _SECRET_MARKERS)


def _leaf_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_leaf_text(v) for v in value) + "]"
    else:
        text = str(value)
    return redact(text)


def _children(obj: Any) -> Iterable[tuple[str, Any]] | None:
    """(name, value) pairs of a structured value; None for a leaf."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        try:
            obj = OmegaConf.to_container(obj, resolve=True)
        except Exception:
            obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)) and any(_children(v) is not None for v in obj):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


def flatten_config(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested dataclasses / dicts / OmegaConf configs into MLflow params.

    Keys are dotted paths (``data.num_viewpoints``); values are strings truncated to MLflow's
    param limit (6000 chars); lists of scalars stay one value (``[0.4, 0.4]``). Any key whose
    name contains secret/password/token/key_id/access_key (case-insensitive) is dropped with
    its whole subtree, and ``user:password@`` inside URI values is masked.
    """
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        children = _children(value)
        if children is None:
            out[(path or "value")[:MAX_KEY]] = _leaf_text(value)[:MAX_PARAM_VALUE]
            return
        for name, child in children:
            if _is_secret(name):
                continue
            walk(child, f"{path}.{name}" if path else name)

    walk(obj, prefix)
    return out


# ----------------------------------------------------------------------------- retries


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard a RunLogger tries before it buffers or gives up.

    attempts: tries per call while the server is believed up (backoff_s, 2*backoff_s, ...
    seconds between them); retry_interval_s: while it is down, the least time between
    delivery attempts (calls in between only buffer); end_timeout_s: how long end() keeps
    trying to deliver the buffer; max_buffer: buffered metric points kept (oldest dropped);
    probe_timeout_s: the ``/health`` probe that precedes a retry while the server is down.
    """

    attempts: int = 3
    backoff_s: float = 0.5
    retry_interval_s: float = 30.0
    end_timeout_s: float = 60.0
    max_buffer: int = 100_000
    probe_timeout_s: float = 2.0


def _is_transient(e: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, HTTP 5xx and 429."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(e, OSError)  # requests' and urllib's errors, timeouts included


def _with_retries(fn: Callable[[], T], attempts: int, backoff_s: float) -> T:
    """``fn()``, retried on transient errors up to ``attempts`` tries in all."""
    attempts = max(1, attempts)
    for i in range(attempts - 1):
        try:
            return fn()
        except Exception as e:
            if not _is_transient(e):
                raise
            time.sleep(backoff_s * 2**i)
    return fn()


def _reading(uri: str, what: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    policy = policy or RetryPolicy()
    try:
        return _with_retries(fn, policy.attempts, policy.backoff_s)
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(redact(uri), f"{what} failed ({_one_line(e)})") from e


# ----------------------------------------------------------------------------- lookups


def _experiment_id(client, uri: str, name: str, *, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        if not create:
            return None
        client.restore_experiment(exp.experiment_id)
    if exp is not None:
        if create and EXPERIMENT_KIND not in exp.tags:  # a kind someone chose is kept
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, EXPERIMENT_KIND_VALUE)
        return exp.experiment_id
    if not create:
        return None
    location = None
    db = _sqlite_path(uri)
    if db is not None:  # next to the database, not relative to whoever creates it
        location = (db.parent / "artifacts").resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND: EXPERIMENT_KIND_VALUE})
    except MlflowException as e:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise e
        return exp.experiment_id


def _quote(uri: str, value: str) -> str:
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise TrackingError(redact(uri), f"run name {value!r} holds both quote characters")


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """Id of the newest active run named ``run_name`` in ``experiment``; None if none."""
    uri = str(uri)
    client = _client(uri)

    def search() -> str | None:
        exp_id = _experiment_id(client, uri, experiment, create=False)
        if exp_id is None:
            return None
        runs = client.search_runs(
            [exp_id],
            filter_string=f"attributes.run_name = {_quote(uri, run_name)}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    return _reading(uri, f"finding run {run_name!r} in experiment {experiment!r}", search)


def get_run(uri: str, run_id: str):
    """The :class:`mlflow.entities.Run`; TrackingError if it does not exist."""
    from mlflow.exceptions import MlflowException

    uri = str(uri)
    client = _client(uri)
    try:
        return _with_retries(lambda: client.get_run(run_id), 3, 0.5)
    except MlflowException as e:
        if e.get_http_status_code() == 404 or e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(redact(uri), f"no run {run_id}") from e
        raise TrackingError(redact(uri), f"reading run {run_id} failed ({_one_line(e)})") from e
    except Exception as e:
        raise TrackingError(redact(uri), f"reading run {run_id} failed ({_one_line(e)})") from e


def resolve_run_artifact(
    uri: str, run_id: str, tag_or_path: str, dst_dir: str | os.PathLike | None = None
) -> str:
    """A run's tag value (e.g. ``CHECKPOINT``) or, if no such tag, the local path of its
    artifact ``tag_or_path`` downloaded into ``dst_dir`` (a temporary folder if None)."""
    uri = str(uri)
    run = get_run(uri, run_id)
    if tag_or_path in run.data.tags:
        return run.data.tags[tag_or_path]
    client = _client(uri)
    parent = os.path.dirname(tag_or_path.rstrip("/")) or None

    def listed() -> bool:
        return any(f.path == tag_or_path.rstrip("/") for f in client.list_artifacts(run_id, parent))

    if not _reading(uri, f"listing artifacts of run {run_id}", listed):
        raise TrackingError(redact(uri), f"run {run_id} has no tag or artifact {tag_or_path!r}")
    dst = None if dst_dir is None else str(dst_dir)
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    return _reading(
        uri,
        f"downloading artifact {tag_or_path!r} of run {run_id}",
        lambda: client.download_artifacts(run_id, tag_or_path, dst),
    )


# ----------------------------------------------------------------------------- run logger


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_key(uri: str, key: str) -> str:
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    key = str(key)
    if not key or len(key) > MAX_KEY or not validate_param_and_metric_name(key):
        raise TrackingError(redact(uri), f"invalid MLflow key {key!r}")
    if path_not_unique(key):
        raise TrackingError(redact(uri), f"invalid MLflow key {key!r} (not a normalised path)")
    return key


def _metric_value(uri: str, key: str, value: Any) -> float:
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise TrackingError(redact(uri), f"metric {key!r} is not a scalar ({e})") from e
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrackingError(redact(uri), f"metric {key!r} is not a number: {value!r}")
    return float(value)


def _head(items: Mapping[str, str], count: int, chars: int) -> list[tuple[str, str]]:
    """The first ``count`` items whose keys and values hold at most ``chars`` characters
    together (at least one item), to stay under MLflow's 1 MB batch request limit."""
    out: list[tuple[str, str]] = []
    used = 0
    for k, v in items.items():
        used += len(k) + len(v)
        if len(out) == count or (out and used > chars):
            break
        out.append((k, v))
    return out


class RunLogger:
    """One MLflow run, written through a buffering, retrying client.

    Create with :meth:`start`. ``log_metrics``, ``log_params``, ``set_tags`` and the artifact
    methods never raise because the server is down (bad keys or values still raise
    TrackingError). ``end`` never raises. Usable as a context manager (ends FAILED on error).
    A pickled copy (e.g. sent to a Ray worker) logs to the same run with an empty buffer.
    """

    def __init__(self, uri: str, run_id: str, experiment_id: str, policy: RetryPolicy):
        self.uri = str(uri)
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.policy = policy
        self._sent_params: dict[str, str] = {}
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.RLock()
        self._client_obj = None
        self._metrics: deque = deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._dropped = 0
        self._down = False
        self._next_try = 0.0
        self._ended = False

    def __getstate__(self) -> dict:
        return {
            "uri": self.uri,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "policy": self.policy,
            "_sent_params": dict(self._sent_params),
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()

    @property
    def _client(self):
        if self._client_obj is None:
            self._client_obj = _client(self.uri)
        return self._client_obj

    # -- creation

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        params: Any = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        description: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> RunLogger:
        """Create (or, with ``resume_run_id``, reopen) a run in ``experiment`` (created if
        missing) and log ``params`` (a dict or a config dataclass, see :meth:`log_params`).
        Raises TrackingError if the store cannot be reached now."""
        uri = str(uri)
        policy = policy or RetryPolicy()
        client = _client(uri)
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if not resume_run_id:
            all_tags = {**code_version_tags(), **all_tags}
        if parent_run_id:
            all_tags[PARENT] = parent_run_id
        if description:
            all_tags[_NOTE] = description
        sent_params: dict[str, str] = {}

        def open_run() -> tuple[str, str]:
            if resume_run_id:
                run = client.get_run(resume_run_id)
                client.update_run(resume_run_id, status="RUNNING")
                sent_params.update(run.data.params)
                return run.info.run_id, run.info.experiment_id
            exp_id = _experiment_id(client, uri, experiment, create=True)
            tags_now = {k: v[:MAX_TAG_VALUE] for k, v in all_tags.items()}
            run = client.create_run(exp_id, tags=tags_now, run_name=run_name)
            return run.info.run_id, exp_id

        what = f"resuming run {resume_run_id}" if resume_run_id else f"starting run {run_name!r}"
        run_id, exp_id = _reading(uri, what, open_run, policy)
        self = cls(uri, run_id, exp_id, policy)
        self._client_obj = client
        self._sent_params = sent_params
        if resume_run_id and all_tags:
            self.set_tags(all_tags)
        if params is not None:
            self.log_params(params)
        return self

    # -- logging

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Log ``{key: number}`` at integer ``step`` (timestamp: now, in ms since the epoch)."""
        from mlflow.entities import Metric

        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        points = [
            Metric(_check_key(self.uri, k), _metric_value(self.uri, k, v), ts, int(step))
            for k, v in metrics.items()
        ]
        with self._lock:
            self._metrics.extend(points)
            overflow = len(self._metrics) - self.policy.max_buffer
            if overflow > 0:
                for _ in range(overflow):
                    self._metrics.popleft()
                if self._dropped == 0:
                    logger.warning(
                        "MLflow buffer for run %s is full (%d metrics); dropping the oldest",
                        self.run_id,
                        self.policy.max_buffer,
                    )
                self._dropped += overflow
            self._deliver()

    def log_params(self, params: Any) -> None:
        """Log a dict or config as params, through :func:`flatten_config` (so nested values get
        dotted keys and secret-looking keys are dropped). A key already logged with another
        value is skipped with a warning (MLflow params are immutable)."""
        flat = flatten_config(params)
        with self._lock:
            for k, value in flat.items():
                key = _check_key(self.uri, k)
                old = self._sent_params.get(key, self._params.get(key))
                if old is None:
                    self._params[key] = value
                elif old != value:
                    logger.warning(
                        "MLflow run %s: param %r already %r; not changing it to %r",
                        self.run_id,
                        key,
                        old,
                        value,
                    )
            self._deliver()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values stringified and truncated to 8000 chars."""
        with self._lock:
            for k, v in tags.items():
                self._tags[str(k)] = str(v)[:MAX_TAG_VALUE]
            self._deliver()

    @property
    def pending(self) -> int:
        """Metric points, params and tags not yet delivered."""
        with self._lock:
            return len(self._metrics) + len(self._params) + len(self._tags)

    def flush(self) -> bool:
        """Try to deliver everything buffered now; True when nothing is left."""
        with self._lock:
            self._deliver(force=True)
            return self.pending == 0

    def _deliver(self, force: bool = False) -> None:
        """Send buffered entries in order; on a transient failure keep them and back off."""
        if not (self._metrics or self._params or self._tags):
            return
        now = time.monotonic()
        if self._down and not force and now < self._next_try:
            return
        if self._down and is_remote(self.uri):
            try:
                _health(self.uri, self.policy.probe_timeout_s)
            except Exception as e:
                self._next_try = time.monotonic() + self.policy.retry_interval_s
                logger.debug("MLflow at %s still unreachable: %s", redact(self.uri), e)
                return
        # A server that just answered /health gets the full retries; a failing local store one.
        attempts = 1 if self._down and not is_remote(self.uri) else self.policy.attempts
        backlog = len(self._metrics)
        try:
            while self._params or self._tags or self._metrics:
                self._send_one_batch(attempts)
        except Exception as e:
            if not _is_transient(e):  # pragma: no cover - _send_one_batch drops those
                raise
            if not self._down:
                logger.warning(
                    "MLflow unreachable at %s; buffering %d metrics, will retry (%s)",
                    redact(self.uri),
                    len(self._metrics),
                    _one_line(e, 160),
                )
            self._down = True
            self._next_try = time.monotonic() + self.policy.retry_interval_s
            return
        if self._down:
            logger.info(
                "MLflow reachable again at %s; delivered %d buffered metrics",
                redact(self.uri),
                backlog,
            )
        self._down = False

    def _send_one_batch(self, attempts: int) -> None:
        from mlflow.entities import Param, RunTag

        params = _head(self._params, MAX_PARAMS_TAGS_PER_BATCH, _BATCH_TEXT_BUDGET)
        tags = _head(self._tags, MAX_PARAMS_TAGS_PER_BATCH, _BATCH_TEXT_BUDGET)
        room = MAX_METRICS_PER_BATCH - len(params) - len(tags)
        metrics = [self._metrics[i] for i in range(min(room, len(self._metrics)))]

        def send() -> None:
            self._client.log_batch(
                self.run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags],
                synchronous=True,
            )

        try:
            _with_retries(send, attempts, self.policy.backoff_s)
        except Exception as e:
            if _is_transient(e):
                raise
            logger.warning(
                "MLflow at %s rejected a batch for run %s (%d metrics, %d params, %d tags): %s",
                redact(self.uri),
                self.run_id,
                len(metrics),
                len(params),
                len(tags),
                _one_line(e, 200),
            )
        else:
            self._sent_params.update(params)
        for k, _ in params:
            del self._params[k]
        for k, v in tags:
            if self._tags.get(k) == v:
                del self._tags[k]
        for _ in metrics:
            self._metrics.popleft()

    # -- artifacts

    def _artifact(self, what: str, fn: Callable[[], None]) -> bool:
        """Run an artifact upload with retries; warn (never raise) on failure."""
        with self._lock:
            attempts = 1 if self._down else self.policy.attempts
        try:
            _with_retries(fn, attempts, self.policy.backoff_s)
            return True
        except Exception as e:
            logger.warning(
                "MLflow at %s: could not log artifact %s for run %s (%s)",
                redact(self.uri),
                what,
                self.run_id,
                _one_line(e, 200),
            )
            return False

    def attempt(self, what: str, fn: Callable[[Any], None]) -> bool:
        """``fn(client)`` with this run's retries; warns and returns False on failure."""
        return self._artifact(what, lambda: fn(self._client))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a file or a folder (its contents) under ``artifact_path``; False on failure."""
        path = Path(local_path)
        if not path.exists():
            raise TrackingError(str(path), "no such file or folder to log as an artifact")
        upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        return self._artifact(str(path), lambda: upload(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> bool:
        """Write ``text`` to the run artifact ``artifact_file``; False on failure."""
        return self._artifact(
            artifact_file, lambda: self._client.log_text(self.run_id, text, artifact_file)
        )

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> bool:
        """Write ``d`` as JSON (or YAML for .yaml/.yml) to ``artifact_file``; False on failure."""
        return self._artifact(
            artifact_file, lambda: self._client.log_dict(self.run_id, dict(d), artifact_file)
        )

    # -- the end

    def drain(self, timeout_s: float | None = None) -> bool:
        """Keep delivering the buffer, backing off, for at most ``timeout_s`` seconds (default
        ``policy.end_timeout_s``): a process about to exit calls this so that what it logged
        while the server was down still arrives when the server returns in time. Warns about
        whatever is still undelivered; returns True when nothing is. Never raises."""
        timeout_s = self.policy.end_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            deadline = time.monotonic() + timeout_s
            pause = self.policy.backoff_s
            while True:
                try:
                    self._deliver(force=True)
                except Exception as e:  # never let tracking kill the caller
                    logger.warning("MLflow at %s: %s", redact(self.uri), _one_line(e, 200))
                    break
                if not self.pending or time.monotonic() + pause > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            lost_metrics = len(self._metrics) + self._dropped
            lost_other = len(self._params) + len(self._tags)
            if lost_metrics or lost_other:
                logger.warning(
                    "MLflow at %s: %d metrics (and %d params/tags) could not be delivered "
                    "to run %s",
                    redact(self.uri),
                    lost_metrics,
                    lost_other,
                    self.run_id,
                )
            return not (lost_metrics or lost_other)

    def end(self, status: str = "FINISHED") -> None:
        """Deliver what is buffered (for at most ``policy.end_timeout_s``), then mark the run
        ``status`` (FINISHED, FAILED or KILLED). Warns, never raises, if the server stays down."""
        if status not in _END_STATUSES:
            raise TrackingError(redact(self.uri), f"run status {status!r} not in {_END_STATUSES}")
        with self._lock:
            if self._ended:
                return
            self.drain()
            end_ms = _now_ms()
            try:
                _with_retries(
                    lambda: self._client.set_terminated(self.run_id, status, end_ms),
                    1 if self._down else self.policy.attempts,
                    self.policy.backoff_s,
                )
            except Exception as e:
                logger.warning(
                    "MLflow at %s: could not mark run %s %s (%s)",
                    redact(self.uri),
                    self.run_id,
                    status,
                    _one_line(e, 200),
                )
            self._ended = True

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")


# ----------------------------------------------------------------------------- resume, interrupt


def last_logged_step(uri: str, run_id: str) -> int:
    """The largest step any metric of the run was logged at (0 for none): a resumed attempt
    logs only the steps after it, so every metric key keeps one value per step."""
    client = _client(str(uri))
    run = get_run(uri, run_id)
    last = 0
    for key in run.data.metrics:
        history = _with_retries(lambda k=key: client.get_metric_history(run_id, k), 3, 0.5)
        last = max([last, *(int(m.step) for m in history)])
    return last


def running_children(uri: str, parent_run_id: str) -> list[str]:
    """Ids of the RUNNING runs whose parent is ``parent_run_id`` (a sweep's trials)."""
    client = _client(str(uri))
    parent = get_run(uri, parent_run_id)
    runs = _with_retries(lambda: client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                      f"attributes.status = 'RUNNING'", max_results=1000), 3, 0.5)
    return [r.info.run_id for r in runs]
