"""What a run logged while its tracking server was away: kept, then delivered in order.

MLflow's own retries ride out a blip of seconds. For a longer outage an :class:`OutageBuffer`
keeps the metric points (with their steps and timestamps), params and tags not sent, tries
again at most once per ``retry_interval_s`` (after a cheap ``/health`` probe), and delivers the
backlog, oldest first, once the server answers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Mapping
from itertools import islice

from avsa.tracking.client import health, is_remote, is_transient, one_line, redact

logger = logging.getLogger("avsa.tracking")


@dataclasses.dataclass(frozen=True)
class BufferPolicy:
    """How a RunLogger carries an outage: while the server is down, at least retry_interval_s
    between delivery attempts, each after a /health probe of probe_timeout_s; ``end()`` tries
    for end_timeout_s; at most max_buffer metric points are kept (oldest dropped)."""

    retry_interval_s: float = 30.0
    end_timeout_s: float = 60.0
    max_buffer: int = 100_000
    probe_timeout_s: float = 2.0


class OutageBuffer:
    """The undelivered metrics, params and tags of one run, and whether its server is down.
    Not thread-safe: its RunLogger holds a lock around every call."""

    def __init__(self, uri: str, run_id: str, policy: BufferPolicy,
                 sent_params: Mapping[str, str] | None = None):
        self.uri, self.run_id, self.policy = uri, run_id, policy
        self.metrics: deque = deque(maxlen=policy.max_buffer)  # mlflow Metric, oldest first
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.sent_params = dict(sent_params or {})  # MLflow params are immutable
        self.dropped = 0
        self.down = False
        self._next_try = 0.0

    @property
    def pending(self) -> int:
        """Metric points, params and tags not yet delivered."""
        return len(self.metrics) + len(self.params) + len(self.tags)

    def add_metrics(self, points: list) -> None:
        """Queue metric points; beyond ``max_buffer`` the oldest go (one warning)."""
        overflow = len(self.metrics) + len(points) - self.policy.max_buffer
        self.metrics.extend(points)  # the deque's maxlen drops the oldest
        if overflow <= 0:
            return
        if self.dropped == 0:
            logger.warning("MLflow buffer for run %s is full (%d metrics); dropping the oldest",
                           self.run_id, self.policy.max_buffer)
        self.dropped += overflow

    def add_params(self, flat: Mapping[str, str]) -> None:
        """Queue params; a key already logged with another value is skipped with a warning."""
        for key, value in flat.items():
            old = self.sent_params.get(key, self.params.get(key))
            if old is None:
                self.params[key] = value
            elif old != value:
                logger.warning("MLflow run %s: param %r already %r; not changing it to %r",
                               self.run_id, key, old, value)

    def reachable(self, force: bool = False) -> bool:
        """Whether to talk to the server now: always while it is up; while it is down, once
        per ``retry_interval_s`` (any time with ``force``) and only if ``/health`` answers."""
        if not self.down:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        if is_remote(self.uri):
            try:
                health(self.uri, self.policy.probe_timeout_s)
            except Exception as e:
                self._next_try = time.monotonic() + self.policy.retry_interval_s
                logger.debug("MLflow at %s still unreachable: %s", redact(self.uri), e)
                return False
        return True

    def failed(self, e: BaseException) -> None:
        """A transient failure: the server is down until an attempt gets through."""
        if not self.down:
            logger.warning("MLflow unreachable at %s; buffering %d metrics, will retry (%s)",
                           redact(self.uri), len(self.metrics), one_line(e, 160))
        self.down = True
        self._next_try = time.monotonic() + self.policy.retry_interval_s

    def deliver(self, client, force: bool = False) -> None:
        """Send everything buffered through ``client`` (an MlflowClient) if the server is
        believed reachable; on a transient failure keep what was not sent."""
        if not self.pending or not self.reachable(force):
            return
        backlog = len(self.metrics)
        try:
            self._send(client)
        except Exception as e:  # transient: _batch drops the batches the server rejected
            self.failed(e)
            return
        if self.down:
            logger.info("MLflow reachable again at %s; delivered %d buffered metrics",
                        redact(self.uri), backlog)
        self.down = False

    def _send(self, client) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        # Params and tags in separate calls: log_batch's requests of 100 stay under the
        # server's 1 MB limit only unpaired (6 kB params, 8 kB tags). Resending is a no-op.
        if self.params:
            if self._batch(client, params=[Param(k, v) for k, v in self.params.items()]):
                self.sent_params.update(self.params)
            self.params.clear()
        if self.tags:
            self._batch(client, tags=[RunTag(k, v) for k, v in self.tags.items()])
            self.tags.clear()
        # Metrics one request at a time, each taken off the buffer once delivered, so that
        # a failure part-way through sends no point twice.
        while self.metrics:
            points = list(islice(self.metrics, MAX_METRICS_PER_BATCH))
            self._batch(client, metrics=points)
            for _ in points:
                self.metrics.popleft()

    def _batch(self, client, **entities: list) -> bool:
        """One ``log_batch``; False (after a warning) when the server rejected it."""
        try:
            client.log_batch(self.run_id, synchronous=True, **entities)
        except Exception as e:
            if is_transient(e):
                raise
            counts = ", ".join(f"{len(v)} {k}" for k, v in entities.items())
            logger.warning("MLflow at %s rejected a batch for run %s (%s): %s",
                           redact(self.uri), self.run_id, counts, one_line(e, 200))
            return False
        return True

    def lost(self) -> tuple[int, int]:
        """(metric points, params and tags) not delivered so far, dropped points included."""
        return len(self.metrics) + self.dropped, len(self.params) + len(self.tags)
