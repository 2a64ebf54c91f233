"""A real S3 HTTP endpoint on loopback (moto server mode) for tests.

Clients reach it only over HTTP, so it serves Ray workers and subprocesses as well as the test
process. Buckets and objects live in moto's in-process backend and survive a stop/start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from moto.server import ThreadedMotoServer


class MotoS3Server:
    """moto S3 server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self, port: int = 0):
        self.port = port
        self._server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3Server:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        # ThreadedMotoServer.stop() leaves the listening socket open; close it so the port
        # refuses connections (as a stopped endpoint does) and can be bound again.
        self._server._server.server_close()
        self._server = None


@contextlib.contextmanager
def s3_endpoint(port: int = 0) -> Iterator[str]:
    """Start a moto S3 server, yield its endpoint URL (``http://127.0.0.1:PORT``), stop it."""
    server = MotoS3Server(port).start()
    try:
        yield server.url
    finally:
        server.stop()
