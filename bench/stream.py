"""Time to first batch and the first-100-steps rate of the Ray Data stream, bounded (the
pipeline's ingest_options) against unbounded read-ahead, in one run.

A consumer stands in for a trainer on the same cores: after each batch it burns --step-ms of
CPU (small torch matmuls, one thread, holding the GIL most of the time). It reads through
`streaming_split(1)` as a Ray Train worker does, so the stream's executor runs in its own
actor; read in-process (--consumer in-process), the executor is a thread that waits for the
consumer's GIL, and a bounded stream, which needs it on every freed block, falls behind. Prints one JSON line on stdout (logs on stderr): per mode the
seconds from iteration start to the first batch, the steps/s over the first 100 steps and over
the steps after them (steady), their ratio, and what the object store holds at steps 25, 50
and 100 (decoded rows waiting for the consumer, in MiB and in rows); the two modes run one
after the other, each on a fresh local Ray after a cold start timed apart (Ray's start-up,
then the first row of a throw-away stream, which starts a worker process and imports avsa). Wall-clock rates move
with the machine's load; the object store figures do not.

    python bench/stream.py --clips 16 --steps 200 --batch 4 --step-ms 100
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from avsa import synth
from avsa.config import DataConfig
from avsa.data import pipeline, shards

log = logging.getLogger("bench.stream")


def burn(ms: float) -> None:
    """Use about `ms` of CPU time in this thread (a stand-in for a training step)."""
    a = torch.randn(128, 128)
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        a = torch.tanh(a @ a)


def store_mib() -> float:
    """MiB in Ray's object store now (plasma usage from the memory summary), or -1."""
    import ray
    from ray._private.internal_api import memory_summary

    address = ray.get_runtime_context().gcs_address  # this instance, not a neighbour's
    found = re.search(r"Plasma memory usage (\d+) MiB",
                      memory_summary(address=address, stats_only=True))
    return float(found.group(1)) if found else -1.0


def run(uri: str, cfg: DataConfig, *, bounded: bool, batch: int, steps: int,
        step_ms: float, epochs: int, consumer: str) -> dict[str, float]:
    ds = pipeline.build_dataset(uri, cfg, epochs=epochs, seed=0,
                                batch_size=batch if bounded else None)
    if consumer == "split":  # as Ray Train's workers read: the executor runs in its own actor
        ds = ds.streaming_split(1)[0]
    row = pipeline.row_bytes(cfg)
    t0 = time.perf_counter()
    times, held = [], []
    batches = iter(ds.iter_torch_batches(
        batch_size=batch, prefetch_batches=pipeline.CONSUMER_PREFETCH_BATCHES, drop_last=True))
    try:
        for _ in batches:
            times.append(time.perf_counter())
            if len(times) >= steps:
                break
            if len(times) in (25, 50, 100):
                held.append(store_mib())
            burn(step_ms)
    finally:
        batches.close()  # stops the stream's prefetch thread before Ray shuts down
        del batches, ds  # and lets the split's coordinator go before the next mode's Ray
        gc.collect()
    first = times[0] - t0
    early = 100 / (times[100] - times[0])  # steps 1..100 after the first batch
    steady = (len(times) - 1 - 100) / (times[-1] - times[100])
    out = {"first_batch_s": round(first, 2), "first_100_steps_per_s": round(early, 2),
           "steady_steps_per_s": round(steady, 2), "first_100_over_steady": round(early / steady, 3),
           "steps": len(times), "object_store_mib_at_25_50_100": held,
           "rows_ahead_at_100": round(held[-1] * 2**20 / row, 1)}
    log.info("%s: %s", "bounded" if bounded else "unbounded", out)
    return out


def cold_start(uri: str, cfg: DataConfig, batch: int) -> dict[str, float]:
    """Start a local Ray and read one row of a fresh stream (a worker process starts and
    imports avsa); then wait until no task holds a CPU, so the timed stream starts alone."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    pipeline.build_dataset(uri, cfg, epochs=1, seed=0, batch_size=batch).take_batch(1)
    t2 = time.perf_counter()
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.perf_counter() - t2 > 60:
            break
        time.sleep(0.2)
    return {"ray_start_s": round(t1 - t0, 2), "first_row_s": round(t2 - t1, 2)}


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    if not modes or set(modes) - {"bounded", "unbounded"}:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                         "bounded, unbounded")
    return modes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=100.0)
    p.add_argument("--read-ahead", type=int, default=None,
                   help="data.read_ahead_batches (default: the config's)")
    p.add_argument("--modes", type=_modes, default=["bounded", "unbounded"],
                   help="comma-separated, of bounded,unbounded")
    p.add_argument("--consumer", choices=("split", "in-process"), default="split",
                   help="split: through streaming_split(1), as Ray Train's workers read, the "
                        "stream's executor in its own actor; in-process: iter_torch_batches on "
                        "the dataset, the executor a thread of the consumer's process")
    p.add_argument("--out", default="outputs/bench/stream")
    a = p.parse_args(argv)
    if a.steps < 150:
        p.error("--steps must be at least 150 (100 early steps, then the steady ones)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(1)
    root = Path(a.out) / f"{a.clips}x{a.seconds:g}s-{a.width}"
    synth.write_dataset(root / "clips", a.clips, a.seconds, seed=0, progress=False,
                        width=a.width, height=a.width // 2)
    uri = str(root / "shards")
    shards.write_shards(str(root / "clips"), uri, samples_per_shard=4, progress=False)
    cfg = DataConfig(shards=uri, num_viewpoints=4, crop_size=112, frames=8)
    if a.read_ahead is not None:
        cfg.read_ahead_batches = a.read_ahead
    epochs = -(-a.steps * a.batch // a.clips) + 1
    load0 = os.getloadavg()[0]

    import ray

    modes, starts = {}, {}
    for name in a.modes:
        starts[name] = cold_start(uri, cfg, a.batch)
        try:
            modes[name] = run(uri, cfg, bounded=name == "bounded", batch=a.batch,
                              steps=a.steps, step_ms=a.step_ms, epochs=epochs,
                              consumer=a.consumer)
        finally:
            if name != a.modes[-1]:
                ray.shutdown()
    # Printed before the last shutdown: Ray may end the process while stopping the stream.
    print(json.dumps({
        "bench": "stream", **modes, "cold_start": starts,
        "consumer": a.consumer, "read_ahead_batches": cfg.read_ahead_batches, "batch": a.batch,
        "step_ms": a.step_ms,
        "clips": a.clips, "width": a.width, "epochs": epochs, "cpus": os.cpu_count(),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
