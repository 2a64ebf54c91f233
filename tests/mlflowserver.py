"""A real ``mlflow server`` subprocess on a loopback port, for integration tests.

Usage::

    with mlflow_server(tmp_dir) as uri:   # uri == "http://127.0.0.1:PORT", a str
        ...                                # that also has .uri, .port, .stop(), .start()
        uri.stop()     # the port refuses connections
        uri.start()    # the same port, the same SQLite store and artifact folder

The store is ``sqlite:///<tmp_dir>/mlflow.db`` and artifacts are proxied by the server into
``<tmp_dir>/artifacts``. The server runs in its own process group, which ``stop`` terminates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer(str):
    """One ``mlflow server`` bound to 127.0.0.1:port, restartable on the same port.

    The object is its own URI string (``"http://127.0.0.1:PORT"``), so it can be passed
    wherever a tracking URI is expected.
    """

    def __new__(cls, tmp_dir: str | os.PathLike, port: int | None = None):
        port = port or free_port()
        self = super().__new__(cls, f"http://127.0.0.1:{port}")
        self.port = port
        return self

    def __reduce__(self):
        # Pickled (e.g. into a Ray task or a config) it is just the URI string.
        return (str, (str.__str__(self),))

    def __init__(self, tmp_dir: str | os.PathLike, port: int | None = None):
        super().__init__()
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.uri = str.__str__(self)
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen | None = None
        self._log = None

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination", str(self.dir / "artifacts"),
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start the server and wait until ``/health`` answers; returns the URI."""
        if self._proc is not None and self._proc.poll() is None:
            return self.uri
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            self._command(),
            cwd=self.dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self._close_log()
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{tail}")
            if _healthy(self.uri):
                return self.uri
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server at {self.uri} not healthy after {timeout_s:.0f} s")

    def stop(self) -> None:
        """Terminate the server's process group and wait until the port is closed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        # uvicorn workers live in the same group; make sure none still holds the port.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _healthy(self.uri, timeout_s=0.2) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


@contextlib.contextmanager
def mlflow_server(tmp_dir: str | os.PathLike) -> Iterator[MlflowServer]:
    """Start a server for the duration of the ``with`` block; yields its URI (an
    :class:`MlflowServer`, a ``str`` with ``.stop()`` and ``.start()``)."""
    server = MlflowServer(tmp_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
