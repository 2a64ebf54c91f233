"""System metrics (CPU, memory, disk, network, GPU) on a run, through MLflow's own collectors.

MLflow's ``SystemMetricsMonitor`` loop stops for good at the first failed request, so an
outage would end the figures; here its collectors publish through the run's RunLogger, whose
buffer carries an outage. A sample (every 10 s by default) costs well under 1 ms of CPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avsa.config import TrackingConfig
    from avsa.tracking.run import RunLogger

from avsa.errors import TrackingError
from avsa.tracking.store import SYSTEM, last_logged_step

log = logging.getLogger("avsa.tracking")


class _Monitor:
    """Samples every ``interval_s`` on its own thread from construction until :meth:`stop`."""

    def __init__(self, logger: RunLogger, interval_s: float, first_step: int):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its collectors are used: __init__ makes no request (resume_logging=False).
        self._mlflow = SystemMetricsMonitor(logger.run_id, sampling_interval=interval_s,
                                            tracking_uri=logger.uri)
        self.logger = logger
        self.interval_s = float(self._mlflow.sampling_interval)
        self.step = first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="avsa-system-metrics")
        self._thread.start()

    def _sample(self) -> None:
        self._mlflow.collect_metrics()
        metrics = self._mlflow.aggregate_metrics()
        for monitor in self._mlflow.monitors:
            monitor.clear_metrics()
        if metrics:
            self.logger.log_metrics({SYSTEM + k: v for k, v in metrics.items()}, self.step)
            self.step += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as e:  # a collector failing must not end training
                log.warning("system metrics: %s; no more samples for run %s", e,
                            self.logger.run_id)
                return

    def stop(self) -> None:
        """Stop sampling (the last sample goes to the run's buffer first)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        try:
            self._sample()
        except Exception as e:
            log.debug("system metrics: last sample failed: %s", e)


def start(logger: RunLogger | None, tracking: TrackingConfig) -> _Monitor | None:
    """Sample system metrics onto ``logger``'s run as ``system/<name>`` until
    ``stop()``; None when ``tracking.system_metrics`` is off or MLflow cannot sample here."""
    if logger is None or not tracking.system_metrics:
        return None
    try:
        return _Monitor(logger, tracking.system_metrics_interval_s, _first_step(logger))
    except Exception as e:  # e.g. psutil missing
        log.warning("system metrics off for run %s: %s", logger.run_id, e)
        return None


def _first_step(logger: RunLogger) -> int:
    """1 for a new run; one past the samples a resumed run already holds, so each system
    metric keeps one value per step across attempts (1 too when the server cannot say)."""
    try:
        return last_logged_step(logger.uri, logger.run_id, system=True) + 1
    except TrackingError as e:
        log.debug("system metrics: no earlier samples read (%s)", e)
        return 1


@contextlib.contextmanager
def sampling(logger: RunLogger | None, tracking: TrackingConfig) -> Iterator[_Monitor | None]:
    """:func:`start` for the block, stopped at its end however the block ends."""
    monitor = start(logger, tracking)
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.stop()
