"""A local Ray beside another one on the same machine: Ray's dashboard agent takes a fixed port
that `ray.init` cannot move, so the second start goes without its dashboard (a pretraining) or
is refused with the reason (a sweep, which needs the state API). Each case runs in its own
process with its own real Ray; the held port is one the test binds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avsa.train.ray_setup import port_in_use

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def held_port():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use_sees_a_listener_and_its_release():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


def start_local_ray(port: int, need_state_api: bool) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import ray
        from avsa.config import compose
        from avsa.train import ray_setup
        ray_setup.RAY_AGENT_PORT = {port}
        try:
            ray_setup.ensure_ray(compose(["train.num_workers=1"]), need_state_api={need_state_api})
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        else:
            print("STARTED", ray.cluster_resources().get("CPU"), ray.is_initialized())
            ray.shutdown()
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=180)


def test_a_second_local_ray_starts_without_its_dashboard(held_port):
    done = start_local_ray(held_port, need_state_api=False)
    assert "STARTED" in done.stdout, done.stdout + done.stderr
    assert f"holds the dashboard agent's port {held_port}" in done.stderr
    assert "starting this one without its dashboard" in done.stderr


def test_a_sweep_beside_another_local_ray_is_refused_before_starting_one(held_port):
    done = start_local_ray(held_port, need_state_api=True)
    assert "REFUSED ConfigError" in done.stdout, done.stdout + done.stderr
    assert "sweep needs this Ray's state API" in done.stdout
    assert "RAY_ADDRESS=auto" in done.stdout
    assert "Started a local Ray instance" not in done.stderr


def test_a_ray_started_in_a_block_ends_with_it_and_one_up_before_stays(held_port):
    """`ray_for_block`: the transfer cells after `avsa reproduce`'s pretrainings run without the
    local Ray those started, while a Ray the caller brought (a test session's, a cluster's)
    is left as it was."""
    script = textwrap.dedent(f"""
        import ray
        from avsa.config import compose
        from avsa.train import ray_setup
        ray_setup.RAY_AGENT_PORT = {held_port}
        cfg = compose(["train.num_workers=1"])
        with ray_setup.ray_for_block():
            ray_setup.ensure_ray(cfg)
            print("INSIDE", ray.is_initialized())
        print("AFTER", ray.is_initialized())
        ray_setup.ensure_ray(cfg)
        with ray_setup.ray_for_block():
            pass
        print("KEPT", ray.is_initialized())
        ray.shutdown()
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.stdout.split() == ["INSIDE", "True", "AFTER", "False", "KEPT", "True"], (
        done.stdout + done.stderr)
