"""One writer per directory: an exclusive lease file created atomically next to what it guards.

`hold(dir_uri, what)` creates `<dir>/avsa_lease.json` (`storage.create_exclusive`), renews it
while the block runs and removes it at the end. A second holder is refused with the first one's
host, pid and start time, or waits up to `wait_s` seconds.

A lease is stale when its pid no longer runs on this host, or it has not been renewed for
`TTL_S` seconds. Only the process that creates `avsa_lease.json.break` removes a stale lease,
and only if it is still the one it read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from avsa import storage
from avsa.errors import LeaseError, StorageError

log = logging.getLogger("avsa.lease")
LEASE = "avsa_lease.json"
TTL_S = 120.0  # a lease not renewed for this long is stale, wherever its holder ran
RENEW_S = 20.0
POLL_S = 1.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    token: str
    what: str
    renewed: float = 0.0  # time.time() of the last renewal

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _me(what: str) -> Holder:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Holder(socket.gethostname(), os.getpid(), started, uuid.uuid4().hex, what, time.time())


def _encode(h: Holder) -> bytes:
    return json.dumps(asdict(h), indent=1).encode()


def read_holder(uri: str) -> Holder | None:
    """The lease at `uri`, None if there is none; one that cannot be parsed is a foreign
    holder."""
    try:
        return Holder(**json.loads(storage.read_bytes(uri)))
    except StorageError:
        return None if not storage.exists(uri) else Holder("?", 0, "?", "?", "?", 0.0)
    except (ValueError, TypeError):
        return Holder("?", 0, "?", "unparseable", "?", 0.0)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def is_stale(h: Holder) -> bool:
    if h.host == socket.gethostname() and h.pid > 0 and not pid_alive(h.pid):
        return True
    return h.renewed > 0 and time.time() - h.renewed > TTL_S


def _break_stale(uri: str, seen: Holder) -> bool:
    """Remove the stale lease `seen` at `uri`, unless it has been replaced already; False when
    another live process is doing it (a breaker stale as a lease is, or unreadable, is
    removed)."""
    breaker = f"{uri}.break"
    if not storage.create_exclusive(breaker, _encode(_me("break"))):
        held = read_holder(breaker)
        if held is not None and (is_stale(held) or not held.renewed):
            storage.delete(breaker)  # a breaker that died in the middle
            return True
        return held is None
    try:
        now = read_holder(uri)
        if now is not None and now.token == seen.token:
            log.warning("%s: taking over a stale lease (%s, %s)", uri, seen.what, seen.describe())
            storage.delete(uri)
    finally:
        storage.delete(breaker)
    return True


def acquire(dir_uri: str, what: str, wait_s: float = 0.0) -> Holder:
    """Create the lease in `dir_uri` for this process, or raise LeaseError naming the holder
    (after up to `wait_s` seconds of waiting for it to go)."""
    uri = storage.join(dir_uri, LEASE)
    me = _me(what)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        if storage.create_exclusive(uri, _encode(me)):
            return me
        held = read_holder(uri)
        if held is None:
            continue  # released between the two calls
        if is_stale(held) and _break_stale(uri, held):
            continue
        if time.monotonic() >= deadline:
            hint = ("; wait for it to end, or set storage.lease_wait_s=SECONDS to wait"
                    if what != "avsa shard" else "; wait for it to end or choose another output")
            raise LeaseError(dir_uri, f"in use by another {held.what} ({held.describe()}){hint}")
        if not announced:
            log.warning("%s: in use by another %s (%s); waiting up to %.0f s", dir_uri,
                        held.what, held.describe(), wait_s)
            announced = True
        time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.01)))


def release(dir_uri: str, me: Holder) -> None:
    """Remove the lease if it is still ours."""
    uri = storage.join(dir_uri, LEASE)
    with contextlib.suppress(StorageError):
        held = read_holder(uri)
        if held is not None and held.token == me.token:
            storage.delete(uri)


def _renew(dir_uri: str, me: Holder, stop: threading.Event) -> None:
    uri = storage.join(dir_uri, LEASE)
    while not stop.wait(RENEW_S):
        with contextlib.suppress(StorageError):
            held = read_holder(uri)
            if held is None or held.token != me.token:
                log.warning("%s: the lease is no longer this process's (%s)", dir_uri,
                            held.describe() if held else "removed")
                return
            storage.write_bytes(uri, _encode(replace(me, renewed=time.time())))


@contextlib.contextmanager
def kept(dir_uri: str, me: Holder) -> Iterator[Holder]:
    """Renew the acquired lease `me` in a daemon thread for the block; release it at the end."""
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(dir_uri, me, stop), daemon=True,
                               name="avsa-lease")
    renewer.start()
    try:
        yield me
    finally:
        stop.set()
        # Before the release: a renewal still in flight would write the lease back after it.
        renewer.join()
        release(dir_uri, me)


def hold(dir_uri: str, what: str,
         wait_s: float = 0.0) -> contextlib.AbstractContextManager[Holder]:
    """The lease on `dir_uri` for the duration of the block (see `acquire`): taken at the
    call, so LeaseError and StorageError raise here, before any `with`."""
    return kept(dir_uri, acquire(dir_uri, what, wait_s))
