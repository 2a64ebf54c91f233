"""SIGINT and SIGTERM during `avsa pretrain` and `avsa sweep`: stop the run, record it, exit.
(Every other command gets the same first-signal rule from `avsa.cli`: its MLflow run ends
KILLED and it exits 130 or 143.)

The first signal raises `Interrupted` in the main thread (Ray Train's and Tune's own handlers
are kept out). The driver aborts the Ray Train controller, marks the MLflow run KILLED at the
step it reached, shuts Ray down, and the command exits 130 (SIGINT) or 143 (SIGTERM) with one
line saying how to resume. Further signals are logged and ignored until the records are written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("avsa.train")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_TIMEOUT_S = 30.0
STOPPED_AT = "avsa.stopped_at_step"
STOPPED_BY = "avsa.stopped_by"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; a KeyboardInterrupt, so no `except Exception` swallows it
    (Ray's blocking calls raise a fresh one: `as_interrupted` recovers the signal)."""

    step: int | None = None  # the last step in the MLflow run (None: unknown)
    resume_step: int | None = None  # the newest complete checkpoint's (0: none; None: unknown)

    def __init__(self, signum: int):
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(self.name)


_received: list[int] = []  # the signal that stopped the current run, once one has


def as_interrupted(e: KeyboardInterrupt) -> Interrupted:
    """`e` as an Interrupted carrying the signal received (SIGINT when none was recorded)."""
    if isinstance(e, Interrupted):
        return e
    return Interrupted(_received[0] if _received else signal.SIGINT)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block (main thread only), the first SIGINT/SIGTERM raises Interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()

    def handler(signum, _frame):
        if _received:
            log.warning("%s: already stopping after %s; the run is being recorded",
                        signal.Signals(signum).name, signal.Signals(_received[0]).name)
            return
        _received.append(signum)
        raise Interrupted(signum)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would stop quietly and return
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def keep_controller(trainer: Any) -> dict[str, Any]:
    """Keep the Ray Train controller's handle instead of letting `fit()` install Ray's SIGINT
    handler (which ends the process with `sys.exit`, past avsa's cleanup)."""
    box: dict[str, Any] = {}
    trainer._register_sigint_handler = lambda controller: box.__setitem__("controller", controller)
    return box


def stop_controller(box: dict[str, Any]) -> None:
    """Abort the Ray Train run (its workers stop, then the controller) and wait for it."""
    import ray

    controller = box.get("controller")
    if controller is None or not ray.is_initialized():
        return
    try:
        ray.get(controller.abort.remote(), timeout=STOP_TIMEOUT_S)
    except Exception as e:  # already gone, or slow: killed below either way
        log.info("Ray Train controller abort: %s", " ".join(str(e).split())[:200])
    with contextlib.suppress(Exception):
        ray.kill(controller)


def shutdown_ray() -> None:
    """Stop the local Ray this process started (its workers with it); on a joined cluster,
    disconnect, which ends the actors this driver owns."""
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


def record_killed(logger: Any, run_uri: str, e: Interrupted) -> Interrupted:
    """Mark the MLflow run KILLED with the step it reached; returns `e` with the step reached
    and the step a rerun resumes from."""
    from avsa import tracking
    from avsa.train.resume import checkpoints

    with contextlib.suppress(Exception):  # the server is away: the run is still ended below
        e.step = tracking.last_logged_step(logger.uri, logger.run_id)
    with contextlib.suppress(Exception):  # storage is away: the line says nothing of it
        found = checkpoints(run_uri)
        e.resume_step = found[0][0] if found else 0
    logger.set_tags({STOPPED_BY: e.name, STOPPED_AT: "?" if e.step is None else e.step})
    logger.end("KILLED")
    return e


def kill_children(uri: str, experiment: str, parent_run_id: str, signame: str) -> None:
    """Mark every RUNNING child of a sweep's parent run KILLED."""
    from avsa import tracking

    for run_id in tracking.running_children(uri, parent_run_id):
        tracking.RunLogger.start(uri, experiment, None, resume_run_id=run_id,
                                 tags={STOPPED_BY: signame}).end("KILLED")


def run_command(command: str, argv: list[str], usage: str, run: Callable[[Any], Any],
                report: Callable[[Any, Any], int | None]) -> int:
    """`avsa COMMAND [overrides]`: compose the config, `run` it and `report` the result (its
    exit status, 0 for None); after a signal, shut down Ray and print how to resume."""
    from avsa.config import compose

    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    cfg = compose(argv)
    try:
        res = run(cfg)
    except KeyboardInterrupt as k:
        e = as_interrupted(k)
        shutdown_ray()
        print(resume_line(command, argv, e), file=sys.stderr)
        return e.exit_code
    return int(report(res, cfg) or 0)


def resume_line(command: str, argv: list[str], e: Interrupted) -> str:
    """The one line a stopped command prints: what stopped it, where, and what to run."""
    at = f" at step {e.step}" if e.step else ""
    if e.resume_step:
        saved = f"; the newest checkpoint is step {e.resume_step}"
    elif e.resume_step == 0:
        saved = "; no checkpoint yet"
    else:
        saved = ""
    again = shlex.join(["avsa", command, *argv])
    return f"avsa {command}: stopped by {e.name}{at}{saved}; to resume, run again: {again}"
