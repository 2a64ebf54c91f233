"""One MLflow run from its start to its end: :class:`RunLogger`.

An unreachable server never kills training: metrics, params and tags go through an
:class:`~avsa.tracking.buffer.OutageBuffer`; artifact uploads are best effort (a warning).
As a ``with`` block it ends the run FINISHED, FAILED on an exception, or KILLED on a
KeyboardInterrupt (the signals of :mod:`avsa.train.interrupt` included), and re-raises.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from avsa.errors import TrackingError
from avsa.tracking.buffer import BufferPolicy, OutageBuffer
from avsa.tracking.client import connect, is_remote, is_transient, one_line, reading, redact
from avsa.tracking.code_version import code_version_tags
from avsa.tracking.params import MAX_KEY, MAX_TAG_VALUE, flatten_config
from avsa.tracking.store import PARENT, experiment_id

logger = logging.getLogger("avsa.tracking")

END_STATUSES = ("FINISHED", "FAILED", "KILLED")


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


class RunLogger:
    """One MLflow run, written through an outage buffer. Create with :meth:`start`, or
    ``RunLogger(uri, run_id, experiment_id)`` for an existing run. Nothing raises because the
    server is down (bad keys or values raise TrackingError). A pickled copy (e.g. in a Ray
    worker) logs to the same run with an empty buffer."""

    def __init__(self, uri: str, run_id: str, experiment_id: str,
                 policy: BufferPolicy | None = None,
                 sent_params: Mapping[str, str] | None = None):
        self.uri, self.run_id, self.experiment_id = str(uri), run_id, experiment_id
        self.policy = policy or BufferPolicy()
        self._lock = threading.RLock()
        self._buffer = OutageBuffer(self.uri, self.run_id, self.policy, sent_params)
        self._ended = False

    def __reduce__(self):
        return type(self), (self.uri, self.run_id, self.experiment_id, self.policy,
                            dict(self._buffer.sent_params))

    @functools.cached_property
    def _client(self):
        return connect(self.uri)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str | None, *,
              tags: Mapping[str, Any] | None = None, params: Any = None,
              parent_run_id: str | None = None, resume_run_id: str | None = None,
              policy: BufferPolicy | None = None) -> RunLogger:
        """Create (or, with ``resume_run_id``, reopen as RUNNING) a run in ``experiment``
        (created if missing) with ``tags`` and ``params``; TrackingError if unreachable now."""
        uri = str(uri)
        mlflow_client = connect(uri)
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if not resume_run_id:
            all_tags = {**code_version_tags(), **all_tags}
        if parent_run_id:
            all_tags[PARENT] = parent_run_id

        def open_run() -> tuple[str, str, dict[str, str]]:
            if resume_run_id:
                run = mlflow_client.get_run(resume_run_id)
                mlflow_client.update_run(resume_run_id, status="RUNNING")
                return run.info.run_id, run.info.experiment_id, run.data.params
            exp_id = experiment_id(mlflow_client, uri, experiment, create=True)
            tags_now = {k: v[:MAX_TAG_VALUE] for k, v in all_tags.items()}
            run = mlflow_client.create_run(exp_id, tags=tags_now, run_name=run_name)
            return run.info.run_id, exp_id, {}

        what = f"resuming run {resume_run_id}" if resume_run_id else f"starting run {run_name!r}"
        run_id, exp_id, sent_params = reading(uri, what, open_run)
        self = cls(uri, run_id, exp_id, policy, sent_params)
        self._client = mlflow_client
        if resume_run_id and all_tags:
            self.set_tags(all_tags)
        if params is not None:
            self.log_params(params)
        return self

    # -- metrics, params, tags

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``{key: number}`` at integer ``step``, timestamped now (ms since the epoch)."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        ts = get_current_time_millis()
        points = [Metric(_check_key(self.uri, k), _metric_value(self.uri, k, v), ts, int(step))
                  for k, v in metrics.items()]
        with self._lock:
            self._buffer.add_metrics(points)
            self._buffer.deliver(self._client)

    def log_params(self, params: Any) -> None:
        """Log a dict or config as params (:func:`flatten_config`); a key already logged with
        another value is skipped with a warning (MLflow params are immutable)."""
        flat = {_check_key(self.uri, k): v for k, v in flatten_config(params).items()}
        with self._lock:
            self._buffer.add_params(flat)
            self._buffer.deliver(self._client)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values stringified and truncated to 8000 chars."""
        with self._lock:
            self._buffer.tags.update({str(k): str(v)[:MAX_TAG_VALUE] for k, v in tags.items()})
            self._buffer.deliver(self._client)

    def flush(self) -> bool:
        """Try to deliver everything buffered now; True when nothing is left."""
        with self._lock:
            self._buffer.deliver(self._client, force=True)
            return self._buffer.pending == 0

    # -- artifacts and other calls

    def attempt(self, what: str, fn: Callable[[Any], None]) -> bool:
        """``fn(client)``: one MLflow call that is not a metric, param or tag (e.g. an upload);
        skipped while the server is down; False after a warning on failure."""
        return self._call(lambda: fn(self._client),
                          f"log artifact {what} for run {self.run_id}")

    def _call(self, fn: Callable[[], None], failure: str) -> bool:
        with self._lock:
            reachable = self._buffer.reachable(force=True)
        reason = "the server is down"
        if reachable:
            try:
                fn()
                return True
            except Exception as e:
                if is_transient(e) and is_remote(self.uri):
                    with self._lock:
                        self._buffer.failed(e)
                reason = one_line(e, 200)
        logger.warning("MLflow at %s: could not %s (%s)", redact(self.uri), failure, reason)
        return False

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a file or a folder (its contents) under ``artifact_path``; False on failure."""
        path = Path(local_path)
        if not path.exists():
            raise TrackingError(str(path), "no such file or folder to log as an artifact")
        upload = "log_artifacts" if path.is_dir() else "log_artifact"
        return self.attempt(str(path),
                            lambda c: getattr(c, upload)(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> bool:
        """Write ``text`` to the run artifact ``artifact_file``; False on failure."""
        return self.attempt(artifact_file, lambda c: c.log_text(self.run_id, text, artifact_file))

    # -- the end

    def drain(self) -> None:
        """Keep delivering the buffer, backing off, for at most ``policy.end_timeout_s`` before
        this process exits; warns of what is left. Never raises."""
        with self._lock:
            deadline, pause = time.monotonic() + self.policy.end_timeout_s, 0.5
            while True:
                try:
                    self._buffer.deliver(self._client, force=True)
                except Exception as e:  # never let tracking kill the caller
                    logger.warning("MLflow at %s: %s", redact(self.uri), one_line(e, 200))
                    break
                if not self._buffer.pending or time.monotonic() + pause > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            metrics, other = self._buffer.lost()
            if metrics or other:
                logger.warning("MLflow at %s: %d metrics (and %d params/tags) could not be "
                               "delivered to run %s", redact(self.uri), metrics, other,
                               self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        """:meth:`drain`, then mark the run ``status`` (FINISHED, FAILED or KILLED). Warns,
        never raises, if the server stays down."""
        if status not in END_STATUSES:
            raise TrackingError(redact(self.uri), f"run status {status!r} not in {END_STATUSES}")
        with self._lock:
            if self._ended:
                return
            self.drain()
            self._call(lambda: self._client.set_terminated(self.run_id, status),
                       f"mark run {self.run_id} {status}")
            self._ended = True

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end()
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
