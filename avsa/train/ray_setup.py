"""Ray for a run: join the cluster in `RAY_ADDRESS` (as under `ray job submit`), or start a
local Ray that serves the state API Ray Train and Tune rely on; credentials kept out of the
runtime environments Ray logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from typing import Any

from avsa.config import Config
from avsa.errors import ConfigError

log = logging.getLogger("avsa.train")


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying AWS credentials into trial actors' runtime_env (and so into
    Ray's logs); workers inherit them from this process or their pod's Secret."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(
        {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


@contextlib.contextmanager
def ray_for_block() -> Iterator[None]:
    """A Ray that `ensure_ray` starts within the block is shut down at its end, so the work
    after it (transfer heads, on a small machine) gets every core: an idle local Ray's raylet,
    GCS and workers keep part of them busy. A Ray already up before the block is left up."""
    import ray

    was_up = ray.is_initialized()
    try:
        yield
    finally:
        if not was_up and ray.is_initialized():
            ray.shutdown()


def ensure_ray(cfg: Config, need_state_api: bool = False) -> None:
    """Join the cluster in `RAY_ADDRESS` (as under `ray job submit`), or start a local Ray
    with enough logical CPUs for the train workers plus decoding tasks, serving the state API
    (dashboard on loopback): Ray Train's placement-group cleaner polls it every second, and
    through it frees the workers of a trial ASHA stopped (without it, later trials starve).
    Its dashboard agent needs a fixed port that `ray.init` cannot move, so a second local Ray
    on the machine starts without the dashboard; with `need_state_api` (sweeps) it is refused.
    """
    import ray

    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return
    if address := os.environ.get("RAY_ADDRESS"):
        join_cluster(address)
        return
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + 2 * cfg.data.decode_cpus
    num_cpus = max(os.cpu_count() or 1, math.ceil(need))
    if port_in_use(RAY_AGENT_PORT):
        held = (f"another Ray on this machine holds the dashboard agent's port {RAY_AGENT_PORT}, "
                f"which a local ray.init cannot move")
        if need_state_api:
            raise ConfigError("ray", f"{held}; a sweep needs this Ray's state API to free the "
                                     f"workers of stopped trials. Join the other Ray "
                                     f"(RAY_ADDRESS=auto) or stop it first")
        log.warning("%s: starting this one without its dashboard (Ray Train will warn that "
                    "it cannot query the controller's state; harmless)", held)
        options: dict[str, Any] = {"include_dashboard": False}
    else:
        options = _state_api_options()
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, **options)
            return
        except Exception as e:  # Ray raises a bare Exception when its raylet starts too slowly
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            log.warning("local Ray did not start in time (busy machine?); trying once more")
            ray.shutdown()


def join_cluster(address: str, timeout_s: float = 5.0) -> None:
    """`ray.init` on the cluster at `address` (RAY_ADDRESS); ConfigError when no Ray answers
    there, within `timeout_s` instead of after minutes of Ray's own retries."""
    import ray

    where, local = "RAY_ADDRESS", "; unset RAY_ADDRESS to start a local Ray"
    if "://" in address and not address.startswith("ray://"):
        raise ConfigError(where, f"{address!r} is no Ray address: use the head's GCS address "
                                 f"HOST:6379 (`ray job submit` takes the dashboard's http:// "
                                 f"one){local}")
    if address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not (host and port.isdigit()):
            raise ConfigError(where, f"{address!r} is not HOST:PORT{local}")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        except OSError as e:
            raise ConfigError(where, f"no Ray answers at {address!r} ({e}); check that the "
                                     f"cluster is up and its port reachable{local}") from None
    try:
        ray.init(log_to_driver=True)
    except ConnectionError as e:
        raise ConfigError(where, f"{address!r}: {' '.join(str(e).split())}") from None


RAY_AGENT_PORT = 52365  # Ray's default dashboard agent port; ray.init offers no option for it


def port_in_use(port: int) -> bool:
    """Whether a TCP listener on any interface already holds `port` on this machine."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _state_api_options() -> dict[str, Any]:
    """`ray.init` options for a dashboard on a free loopback port, named to every worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}
