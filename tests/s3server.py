"""A real S3 HTTP endpoint on loopback (moto server mode) for tests.

Clients reach it only over HTTP, so it serves Ray workers and subprocesses as well as the test
process. Buckets and objects live in moto's in-process backend and survive a stop/start.
"""

from __future__ import annotations

import contextlib
import socket
import threading
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


class CuttingProxy:
    """A TCP proxy on loopback to ``127.0.0.1:port`` that cuts the next ``cuts`` connections whose
    replies pass ``after`` bytes, right there: a body cut short, as when an endpoint restarts."""

    def __init__(self, port: int, after: int, cuts: int = 1):
        self.upstream, self.after, self.cuts, self.cut = port, after, cuts, 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if replies and sent <= self.after < sent + len(data) and self._take_cut():
                    dst.sendall(data[: self.after - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cut >= self.cuts:
                return False
            self.cut += 1
            return True

    def close(self) -> None:
        self._sock.close()
