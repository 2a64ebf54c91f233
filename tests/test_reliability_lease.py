"""One writer per directory, tested with real concurrent processes: several processes racing
for one lease, a holder SIGKILLed (its stale lease taken over), a waiter that gets the lease
when the holder ends, the same on a real S3 endpoint (moto server, conditional put), and two
real `avsa shard` processes writing to one output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avsa import lease, storage, synth
from avsa.errors import LeaseError

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent

# A process that takes the lease at a given instant, holds it, and reports what happened.
CONTENDER = """
import json, sys, time
from avsa import lease
from avsa.errors import LeaseError
where, start, hold_s, wait_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
time.sleep(max(start - time.time(), 0))
try:
    with lease.hold(where, "test run", wait_s) as me:
        print(json.dumps({"won": True, "pid": me.pid}), flush=True)
        time.sleep(hold_s)
except LeaseError as e:
    print(json.dumps({"won": False, "error": str(e)}), flush=True)
"""


def _contender(where: str, start: float, hold_s: float, wait_s: float = 0.0,
               env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONTENDER, where, str(start), str(hold_s),
                             str(wait_s)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _race(where: str, n: int, env: dict | None = None) -> list[dict]:
    start = time.time() + 6  # every interpreter is up and waiting by then
    procs = [_contender(where, start, 3.0, env=env) for _ in range(n)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs


def test_processes_racing_for_one_lease_only_one_wins(tmp_path):
    outs = _race(str(tmp_path / "run"), 4)
    winners = [o for o in outs if o["won"]]
    assert len(winners) == 1, outs
    host = socket.gethostname()
    for o in outs:
        if not o["won"]:
            assert f"in use by another test run (host {host}, pid {winners[0]['pid']}, " \
                   f"started " in o["error"], o
    assert not (tmp_path / "run" / lease.LEASE).exists()  # released by the winner


def test_stale_lease_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    where = str(tmp_path / "run")
    holder = _contender(where, time.time(), 600.0)
    assert json.loads(holder.stdout.readline())["won"]
    with pytest.raises(LeaseError, match=f"pid {holder.pid}"):
        lease.acquire(where, "test run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / "run" / lease.LEASE).exists()  # a killed holder cannot clean up
    me = lease.acquire(where, "test run")
    assert "taking over a stale lease" in caplog.text
    assert me.pid == os.getpid()
    lease.release(where, me)


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    return gone.pid


@pytest.mark.parametrize("breaker_alive", [False, True])
def test_stale_lease_with_a_breaker_file_is_taken_or_refused_promptly(tmp_path, breaker_alive):
    """A stale lease whose `.break` file remains: left by a killed breaker, the lease is taken
    over at once; held by a live breaker, the caller waits like any holder's (refused at once
    with wait_s=0), never spinning on storage until the breaker's TTL ends it."""
    run = tmp_path / "run"
    run.mkdir()
    host, now = socket.gethostname(), time.time()
    stale = {"host": host, "pid": _dead_pid(), "started": "x", "token": "t", "what": "test run",
             "renewed": now}
    (run / lease.LEASE).write_text(json.dumps(stale))
    breaker = {**stale, "token": "b", "what": "break",
               "pid": os.getpid() if breaker_alive else _dead_pid()}
    (run / f"{lease.LEASE}.break").write_text(json.dumps(breaker))
    t0 = time.monotonic()
    if breaker_alive:
        with pytest.raises(LeaseError, match="in use by another test run"):
            lease.acquire(str(run), "test run", wait_s=0)
    else:
        lease.release(str(run), lease.acquire(str(run), "test run", wait_s=0))
        assert not (run / f"{lease.LEASE}.break").exists()
    assert time.monotonic() - t0 < 10


def test_waiter_gets_the_lease_when_the_holder_ends(tmp_path):
    where = str(tmp_path / "run")
    holder = _contender(where, time.time(), 3.0)
    assert json.loads(holder.stdout.readline())["won"]
    t0 = time.monotonic()
    me = lease.acquire(where, "test run", wait_s=60)
    assert time.monotonic() - t0 < 30
    holder.wait(timeout=30)
    lease.release(where, me)


@pytest.mark.slow
def test_s3_lease_is_a_conditional_put(s3_bucket, s3_endpoint):
    """moto's server honours `If-None-Match: *` on PutObject (412 when the key exists)."""
    where = storage.join(s3_bucket, "runs", "r1")
    assert storage.create_exclusive(storage.join(where, "x"), b"1")
    assert not storage.create_exclusive(storage.join(where, "x"), b"2")
    assert storage.read_bytes(storage.join(where, "x")) == b"1"
    outs = _race(where, 3)
    assert sum(o["won"] for o in outs) == 1, outs
    assert not storage.exists(storage.join(where, lease.LEASE))


def test_concurrent_avsa_shard_to_one_output_is_refused(tmp_path):
    synth.write_dataset(tmp_path / "clips", 6, 2.0, seed=0, width=128, height=64,
                        progress=False)
    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "avsa.cli", "shard", str(tmp_path / "clips"), str(out),
           "--samples-per-shard", "2", "--no-progress"]
    # On an idle machine the first holds the lease for some 30 ms: polled every millisecond,
    # and started again (its output removed) in the rare case that it ends between two polls.
    for _attempt in range(5):
        shutil.rmtree(out, ignore_errors=True)
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.monotonic() + 60
        while not (out / lease.LEASE).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "no lease within 60 s"
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)  # held mid-write, lease in place, while the second runs
        if (out / lease.LEASE).exists() and first.poll() is None:
            break
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=60) == 0, first.communicate()
    else:
        pytest.fail("the first avsa shard ended before its lease was seen, 5 times")
    try:
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"avsa shard: error: {out}: in use by another avsa shard (host "), line
    assert f"pid {first.pid}, started " in line
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == 6
    assert not (out / lease.LEASE).exists()
