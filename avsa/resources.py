"""What one run (or sweep trial) needs from Ray, against what the cluster can ever offer: a
run that can never fit would wait in Ray's queue in silence, so it is refused; one waiting for
the autoscaler says so every minute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from avsa.config import Config
from avsa.errors import AvsaError

log = logging.getLogger("avsa.resources")
WAIT_REPORT_S = 60.0


@dataclass(frozen=True)
class Needs:
    """Logical resources one run holds at once: its trial driver (sweeps), its Ray Train workers
    and at least one decoding task (Ray Data)."""

    driver_cpu: float
    workers: int
    cpu_per_worker: float
    gpu_per_worker: float
    decode_cpu: float

    @property
    def cpu(self) -> float:
        return self.driver_cpu + self.workers * self.cpu_per_worker + self.decode_cpu

    @property
    def gpu(self) -> float:
        return self.workers * self.gpu_per_worker

    def describe(self) -> str:
        parts = [f"{self.workers} train worker(s) x {self.cpu_per_worker:g} CPU",
                 f"decoding {self.decode_cpu:g} CPU"]
        if self.driver_cpu:
            parts.insert(0, f"trial driver {self.driver_cpu:g} CPU")
        text = f"{self.cpu:g} CPU ({', '.join(parts)})"
        return text + (f" and {self.gpu:g} GPU" if self.gpu else "")


def needs(cfg: Config, driver_cpu: float = 0.0) -> Needs:
    t = cfg.train
    return Needs(driver_cpu, t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                 cfg.data.decode_cpus)


def _fmt(res: Mapping[str, float]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def cluster_capacity() -> tuple[dict[str, float], dict[str, float]]:
    """(resources now, the most the cluster can ever have): the autoscaler's maximum from the
    cluster config where one runs (KubeRay with autoscaling), else what is there now."""
    import ray
    from ray._private.state import state

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = dict(now)
    try:
        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # an older GCS without the autoscaler's config: what is there now
        log.debug("no autoscaler limits (%s)", e)
        limits = {}
    for key, value in limits.items():
        most[key] = max(most.get(key, 0.0), float(value))
    return now, most


def shortfall(need: Needs, res: Mapping[str, float]) -> list[str]:
    """Resource names of which `res` holds less than `need`."""
    short = []
    if res.get("CPU", 0.0) + 1e-9 < need.cpu:
        short.append("CPU")
    if need.gpu and res.get("GPU", 0.0) + 1e-9 < need.gpu:
        short.append("GPU")
    return short


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the joined Ray cluster."""
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items()}
            for n in ray.nodes() if n.get("Alive")]


def check_fits(need: Needs, what: str, now: Mapping[str, float], most: Mapping[str, float],
               nodes: Sequence[Mapping[str, float]] = ()) -> None:
    """Raise AvsaError when `need` exceeds what the cluster can ever offer: in all, or, on a
    cluster that cannot grow (most == now), on any one of its `nodes` for one train worker,
    which Ray places whole on one node."""
    if shortfall(need, most):
        grows = "" if most == now else f" (up to {_fmt(most)} with its autoscaler)"
        raise AvsaError(
            f"{what} needs {need.describe()}, but the cluster has {_fmt(now)}{grows}: it would "
            f"wait forever; lower train.num_workers, train.cpus_per_worker or data.decode_cpus, "
            f"or give the cluster more")
    worker = Needs(0.0, 1, need.cpu_per_worker, need.gpu_per_worker, 0.0)
    if nodes and most == now and need.workers and all(shortfall(worker, n) for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
        raise AvsaError(
            f"{what}: one train worker needs {_fmt({'CPU': worker.cpu, 'GPU': worker.gpu})} "
            f"on one node (train.cpus_per_worker), but the largest "
            f"node has {_fmt(largest)}: it would wait forever; lower train.cpus_per_worker, "
            f"or add a larger node")


@contextlib.contextmanager
def wait_reports(need: Needs, what: str, probe: Callable = cluster_capacity,
                 interval_s: float = WAIT_REPORT_S) -> Iterator[None]:
    """While the block runs and the run is short of resources the autoscaler may still add,
    log so every `interval_s`. `probe` returns (now, most), as `cluster_capacity`."""
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(interval_s):
            try:
                now, most = probe()
            except Exception as e:  # the report is advisory: never let it end the run
                log.debug("resource probe failed: %s", e)
                continue
            if shortfall(need, now):
                log.warning("%s is waiting for the autoscaler: it needs %s; the cluster has %s "
                            "now, up to %s", what, need.describe(), _fmt(now), _fmt(most))

    thread = threading.Thread(target=report, name="avsa-wait-reporter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def check_and_watch(cfg: Config, what: str,
                    driver_cpu: float = 0.0) -> contextlib.AbstractContextManager[None]:
    """Refuse a run that can never fit the joined cluster; else `wait_reports` to wrap fit() in."""
    need = needs(cfg, driver_cpu)
    now, most = cluster_capacity()
    check_fits(need, what, now, most, node_resources())
    if shortfall(need, now):
        log.warning("%s needs %s; the cluster has %s now: waiting for the autoscaler (up to %s)",
                    what, need.describe(), _fmt(now), _fmt(most))
    return wait_reports(need, what)
