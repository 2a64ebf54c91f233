"""Training-step benchmark: steps/s of the AVSA objective, and what Ray Train costs on top.

Prints ONE JSON line on stdout (everything else goes to stderr):

    python bench/train_step.py                       # CPU: tiny model, reduced shapes, + Ray
    python bench/train_step.py --device cuda         # GPU: full model, batch 28 x 4 views
    python bench/train_step.py --quick --no-ray      # smoke run (a few seconds)

The batches are synthetic tensors of the pipeline's shapes and dtypes (no decoding): video uint8
(B, V, 3, T, S, S), audio float32 log-mel (B, V, 4, F, M), directions (B, V, 2) radians. A few
batches are made once in host memory (pinned on CUDA) and copied to the device every step, as
the training loop does. The step is the training loop's own (`avsa.train.loop.train_step`),
run by the bare PyTorch loop (this process) and by the Ray Train worker (a 1-worker
`TorchTrainer`): same model, same batches, same torch thread count.
The two alternate round by round (the worker waits on a file while the bare loop runs, and the
other way round); `ray_over_bare` is the ratio of their medians, `ray_over_bare_best` of their
best rounds. Ray starts its workers at nice 15; here they run at the bare loop's priority unless
`--ray-niceness default`, since on a shared machine the nice value alone decides the ratio.

The Ray worker then feeds the same step from a Ray Data dataset of synthetic rows through
`iter_torch_batches` (as `avsa.train.loop` does) and times how long each `next()` blocks:
`data_wait_frac` is that time over the wall time of the timed steps. It measures the
iterator's hand-off, not decoding (bench/pipeline.py measures decoding).

`--feed-workers N` feeds the bare loop with real samples instead: N processes (one thread
each, as 1-CPU Ray Data tasks) run the pipeline's `make_sample` on synthetic clips of
`--feed-width` x width/2, and a thread collates and pins them, two batches ahead.
`feed_wait_frac` is the time the step loop waits for them over the timed wall time: whether
N decode cores keep the device fed, without Ray (docs/scaling.md derives the same from
bench/decode_cost.py's CPU seconds per sample).

FLOPs of one forward + backward are counted once, on the meta device, with
`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2). On CUDA the script also
measures the card's dense bf16 matmul rate (8192^3) and reports tflops / that rate as `mfu`,
and checks with `torch.cuda.set_sync_debug_mode` that a step makes no host-device sync.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from avsa.config import Config, compose
from avsa.models import build_model
from avsa.models.inputs import to_channels_last, use_channels_last
from avsa.train.loop import train_step
from avsa.train.objective import compute_objective

log = logging.getLogger("bench.train_step")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration. Shapes: video (batch, views, 3, frames, size, size) uint8,
    audio (batch, views, 4, audio_frames, mels) float32, directions (batch, views, 2)."""

    device: str = "cpu"
    model: str = "tiny"  # a configs/model preset: tiny | full
    batch: int = 4  # clips per step
    views: int = 4
    frames: int = 8
    size: int = 64
    audio_frames: int = 100
    mels: int = 128
    warmup: int = 2  # untimed steps before the first timed segment (per process)
    steps: int = 6  # timed steps per segment
    rounds: int = 5  # bare / Ray segment pairs, alternated
    # torch intra-op threads, the same in both loops. One on CPU: on a shared 2-vCPU machine
    # two OpenMP threads ran about 10x slower than one (each parallel region waits for both).
    threads: int = 1
    bf16: bool = True  # autocast (CUDA only, as in training)
    compile: bool = False
    channels_last: bool | None = None  # None: on CUDA (as in training)
    host_batches: int = 2  # distinct batches cycled through
    ray: bool = True
    ray_data: bool = True
    ray_niceness: int | None = 0  # Ray workers' nice value; None: Ray's default (15)
    seed: int = 0
    feed_workers: int = 0  # decode processes feeding a real-sample run; 0: none
    feed_width: int = 1024  # equirect width of the feed's clips
    feed_clips: int = 8

    def overrides(self) -> list[str]:
        """Config overrides that give the training code these shapes and switches."""
        return [
            f"model={self.model}",
            f"train.bf16={str(self.bf16).lower()}",
            f"train.compile={str(self.compile).lower()}",
            f"train.batch_size={self.batch}",
            f"data.num_viewpoints={self.views}",
            f"data.frames={self.frames}",
            f"data.crop_size={self.size}",
            f"data.n_mels={self.mels}",
        ]


# ---------------------------------------------------------------------------- the step


def make_batches(spec: Spec, pin: bool) -> list[dict[str, torch.Tensor]]:
    """`spec.host_batches` synthetic batches in host memory (pinned when `pin`)."""
    g = torch.Generator().manual_seed(spec.seed)
    b, v = spec.batch, spec.views
    out = []
    for _ in range(spec.host_batches):
        batch = {
            "video": torch.randint(0, 256, (b, v, 3, spec.frames, spec.size, spec.size),
                                   dtype=torch.uint8, generator=g),
            "audio": torch.randn(b, v, 4, spec.audio_frames, spec.mels, generator=g),
            "directions": torch.stack(
                (torch.rand(b, v, generator=g) * 2 * math.pi - math.pi,
                 (torch.rand(b, v, generator=g) - 0.5) * 1.07), dim=-1),
        }
        out.append({k: t.pin_memory() for k, t in batch.items()} if pin else batch)
    return out


def build(cfg: Config, spec: Spec, device: torch.device, prepare=None):
    """Model and optimiser as training builds them; `prepare` wraps the model (Ray Train's
    `prepare_model`), else it is moved to `device`."""
    torch.manual_seed(spec.seed)
    model = build_model(cfg.model)
    if _channels_last(spec, device):
        to_channels_last(model)
    model = prepare(model) if prepare else model.to(device)
    if spec.compile:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    return model, opt


def _channels_last(spec: Spec, device: torch.device) -> bool:
    return use_channels_last(device) if spec.channels_last is None else spec.channels_last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, opt, batches, cfg, spec: Spec, device, *, warmup: int, steps: int,
          source=None) -> dict[str, float]:
    """`warmup` then `steps` steps; steps/s over the timed ones (device synced at both ends)
    and the process CPU seconds per step (all threads: on a shared machine, wall time varies
    with the neighbours' load, CPU time much less).

    `source`, an iterator of batches, replaces the host list; the time each `next()` blocks
    is summed into `wait_s`.
    """
    cl = _channels_last(spec, device)
    i, wait = 0, 0.0

    def next_batch(timing: bool):
        nonlocal i, wait
        if source is None:
            i += 1
            return batches[i % len(batches)]
        t = time.perf_counter()
        batch = next(source)
        if timing:
            wait += time.perf_counter() - t
        return batch

    for _ in range(warmup):
        train_step(model, opt, next_batch(False), cfg, device, kind="avsa", channels_last=cl)
    _sync(device)
    if steps == 0:
        return {}
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step(model, opt, next_batch(True), cfg, device, kind="avsa", channels_last=cl)
    _sync(device)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"steps_per_s": steps / wall, "wall_s": wall, "wait_s": wait,
            "cpu_s_per_step": cpu / steps}


def host_syncs_per_step(model, opt, batches, cfg, spec: Spec, device) -> int | None:
    """CUDA only: synchronising calls PyTorch reports during one step (0 expected)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, opt, batches[0], cfg, device, kind="avsa",
                       channels_last=_channels_last(spec, device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # The first warning of the mode is a notice that it is a prototype, not a sync.
    found = [str(w.message).splitlines()[0] for w in caught
             if "synchron" in str(w.message) and "prototype" not in str(w.message)]
    for msg in found:
        log.warning("host-device sync in the step: %s", msg)
    return len(found)


# ------------------------------------------------------------------------------ counting


def count_flops(cfg: Config, spec: Spec) -> int:
    """FLOPs of one forward + backward of the objective at these shapes (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    b, v = spec.batch, spec.views
    with torch.device("meta"):
        model = build_model(cfg.model).train()
        batch = {
            "video": torch.empty(b, v, 3, spec.frames, spec.size, spec.size, dtype=torch.uint8),
            "audio": torch.empty(b, v, 4, spec.audio_frames, spec.mels),
            "directions": torch.empty(b, v, 2),
        }
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = compute_objective(model, batch, kind="avsa",
                                        temperature=cfg.loss.temperature)
            loss.backward()
    return int(counter.get_total_flops())


def bf16_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    """The card's dense bf16 matmul rate, TFLOP/s (2 n^3 per product)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


# ------------------------------------------------------------------- real-sample feed

_FEED: dict[str, Any] = {}


def _feed_init(samples: list, data_cfg) -> None:
    """Decode process: one thread, the clips' bytes held in memory."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    _FEED.update(samples=samples, cfg=data_cfg)


def _feed_sample(i: int) -> dict[str, Any]:
    from avsa.data.transform import make_sample

    samples = _FEED["samples"]
    out = make_sample(samples[i % len(samples)], _FEED["cfg"], seed=0, epoch=i // len(samples))
    return {k: out[k] for k in ("video", "audio", "directions")}


def decode_feed(cfg: Config, spec: Spec, clip_dir: Path):
    """(iterator of pinned batches of real samples, close()). Samples are asked for in order,
    `2 * batch` in flight, so the workers never run further ahead than the queue holds."""
    import collections
    import multiprocessing
    import queue

    import numpy as np
    from decode_cost import clips  # bench/, beside this script

    samples = clips(clip_dir, spec.feed_clips, 4.0, spec.feed_width)
    pool = multiprocessing.get_context("spawn").Pool(
        spec.feed_workers, initializer=_feed_init, initargs=(samples, cfg.data))
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    pin = torch.cuda.is_available()

    def put(item) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return

    def take(result):
        """The sample, or None once `close` is called (never blocks past it)."""
        while not result.ready():
            if stop.is_set():
                return None
            result.wait(0.1)
        return result.get()

    def produce() -> None:
        pending = collections.deque(pool.apply_async(_feed_sample, (i,))
                                    for i in range(2 * spec.batch))
        i = len(pending)
        try:
            while not stop.is_set():
                rows = []
                for _ in range(spec.batch):
                    row = take(pending.popleft())
                    if row is None:
                        return
                    rows.append(row)
                    pending.append(pool.apply_async(_feed_sample, (i,)))
                    i += 1
                batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
                put({k: t.pin_memory() for k, t in batch.items()} if pin else batch)
        except Exception as e:  # handed to the consumer, which raises it
            put(e)

    # Joined by close(): a daemon thread still inside torch when the interpreter exits
    # aborts the process ("terminate called without an active exception").
    producer = threading.Thread(target=produce, name="feed-producer")
    producer.start()

    def batches():
        while True:
            item = ready.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def close() -> None:
        stop.set()
        producer.join()
        pool.terminate()
        pool.join()

    return batches(), close


def fed_run(model, opt, cfg: Config, spec: Spec, device) -> dict[str, float]:
    """The bare loop fed by `decode_feed`: `warmup` steps (the workers' start), then
    `steps * rounds` timed ones."""
    clip_dir = Path(tempfile.gettempdir()) / f"avsa_bench_feed_{spec.feed_width}x{spec.feed_clips}"
    source, close = decode_feed(cfg, spec, clip_dir)
    try:
        t = timed(model, opt, None, cfg, spec, device, warmup=spec.warmup,
                  steps=spec.steps * spec.rounds, source=source)
    finally:
        close()
    log.info("fed by %d decode processes: %.3f steps/s, waiting %.0f%% of the time",
             spec.feed_workers, t["steps_per_s"], 100 * t["wait_s"] / t["wall_s"])
    return {"feed_steps_per_s": t["steps_per_s"], "feed_wait_frac": t["wait_s"] / t["wall_s"]}


# ----------------------------------------------------------------------------- Ray Train


def synthetic_rows(rows: dict[str, Any], spec_dict: dict[str, Any]) -> dict[str, Any]:
    """Ray Data `map_batches` body: one synthetic sample per input row (numpy, as the
    pipeline emits them). A short random block is repeated to fill the arrays, so making them
    costs a memory copy, not a random draw per element: the run times the hand-off to the
    trainer, not this generator."""
    import numpy as np

    spec = Spec(**spec_dict)
    n, v = len(rows["id"]), spec.views
    rng = np.random.default_rng(int(rows["id"][0]))
    return {
        "video": np.resize(rng.integers(0, 256, 4099, np.uint8),
                           (n, v, 3, spec.frames, spec.size, spec.size)),
        "audio": np.resize(rng.standard_normal(4099, np.float32),
                           (n, v, 4, spec.audio_frames, spec.mels)),
        "directions": rng.uniform(-0.5, 0.5, (n, v, 2)).astype(np.float32),
    }


def _wait_for(path: Path, alive=lambda: True, poll_s: float = 0.01) -> None:
    """Block until `path` exists; raise if `alive()` turns false first."""
    while not path.exists():
        if not alive():
            raise RuntimeError(f"{path.name}: the other side stopped before writing it")
        time.sleep(poll_s)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def ray_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker: the same build, batches and timed segments as the
    bare loop, one segment per round when the driver hands over the baton (files in
    `loop_config["baton"]`), then the Ray Data fed segment."""
    import ray.train
    import ray.train.torch

    spec = Spec(**loop_config["spec"])
    baton = Path(loop_config["baton"])
    torch.set_num_threads(spec.threads)
    cfg = compose(spec.overrides())
    device = ray.train.torch.get_device() if spec.device == "cuda" else torch.device("cpu")
    model, opt = build(cfg, spec, device, prepare=ray.train.torch.prepare_model)
    batches = make_batches(spec, pin=device.type == "cuda")
    timed(model, opt, batches, cfg, spec, device, warmup=spec.warmup, steps=0)
    _write_json(baton / "ready", {"threads": torch.get_num_threads(), "niceness": os.nice(0)})
    for r in range(spec.rounds):
        _wait_for(baton / f"go-{r}")
        res = timed(model, opt, batches, cfg, spec, device, warmup=0, steps=spec.steps)
        _write_json(baton / f"done-{r}", res)
    out: dict[str, Any] = {}
    if spec.ray_data:
        it = iter(ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=spec.batch, prefetch_batches=2, drop_last=True, device="cpu",
            pin_memory=device.type == "cuda"))
        d = timed(model, opt, batches, cfg, spec, device, warmup=spec.warmup,
                  steps=spec.steps, source=it)
        out = {"data_steps_per_s": d["steps_per_s"], "data_wait_frac": d["wait_s"] / d["wall_s"]}
    # Ray Train V2 keeps only metrics that come with a checkpoint: attach an empty one.
    with tempfile.TemporaryDirectory() as d:
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))


def make_trainer(spec: Spec, storage: str, baton: Path):
    """A 1-worker TorchTrainer running `ray_worker` (GPU when spec.device is cuda), fed a Ray
    Data dataset of synthetic rows when spec.ray_data."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    datasets = None
    if spec.ray_data:
        rows = spec.batch * (spec.warmup + spec.steps)
        ds = ray.data.range(rows, override_num_blocks=max(1, rows // spec.batch))
        datasets = {"train": ds.map_batches(synthetic_rows, batch_size=spec.batch,
                                            fn_kwargs={"spec_dict": dataclasses.asdict(spec)})}
    return TorchTrainer(
        ray_worker,
        train_loop_config={"spec": dataclasses.asdict(spec), "baton": str(baton)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=spec.device == "cuda",
            resources_per_worker={"CPU": spec.threads}),
        run_config=ray.train.RunConfig(name="train_step", storage_path=storage),
        datasets=datasets,
    )


class Background:
    """`fn()` in a thread; `alive()` while it runs, `result()` re-raises its error."""

    def __init__(self, fn):
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._out["value"] = fn()
        except BaseException as e:  # handed to the caller by result()
            self._out["error"] = e

    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self):
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


# ------------------------------------------------------------------------------- driver


def run(spec: Spec) -> dict[str, Any]:
    """Bare and Ray Train segments, alternated round by round, and everything else."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = compose(spec.overrides())
    load_start = os.getloadavg()[0]
    flops = count_flops(cfg, spec)
    log.info("flops per step: %.3g", flops)

    with _local_ray(spec) if spec.ray else contextlib.nullcontext() as tmp:
        model, opt = build(cfg, spec, device)
        batches = make_batches(spec, pin=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(model, opt, batches, cfg, spec, device, warmup=spec.warmup, steps=0)
        syncs = host_syncs_per_step(model, opt, batches, cfg, spec, device)
        fit = baton = ready = None
        if spec.ray:
            baton = Path(tmp) / "baton"
            baton.mkdir()
            t_fit = time.perf_counter()
            fit = Background(make_trainer(spec, tmp, baton).fit)
            _wait_for(baton / "ready", fit.alive)
            ready = json.loads((baton / "ready").read_text())
            log.info("Ray Train worker ready after %.1f s", time.perf_counter() - t_fit)
        bare, ray_runs = [], []
        for r in range(spec.rounds):
            bare.append(timed(model, opt, batches, cfg, spec, device, warmup=0, steps=spec.steps))
            log.info("round %d bare: %.3f steps/s", r, bare[-1]["steps_per_s"])
            if fit is not None:
                (baton / f"go-{r}").touch()
                _wait_for(baton / f"done-{r}", fit.alive)
                ray_runs.append(json.loads((baton / f"done-{r}").read_text()))
                log.info("round %d ray:  %.3f steps/s", r, ray_runs[-1]["steps_per_s"])
        data = dict(fit.result().metrics) if fit is not None else {}
        if spec.feed_workers:
            data.update(fed_run(model, opt, cfg, spec, device))
        peak, peak_kind = peak_memory_mb(device)
        matmul = bf16_matmul_tflops(device) if device.type == "cuda" else None

    sps = statistics.median(b["steps_per_s"] for b in bare)
    out: dict[str, Any] = {
        "bench": "train_step",
        "device": spec.device,
        "device_name": _device_name(device),
        "model": spec.model,
        "batch_clips": spec.batch,
        "viewpoints": spec.views,
        "video_shape": [spec.batch, spec.views, 3, spec.frames, spec.size, spec.size],
        "audio_shape": [spec.batch, spec.views, 4, spec.audio_frames, spec.mels],
        "steps_per_s": sps,
        "clips_per_s": sps * spec.batch,
        "bare_steps_per_s_runs": [b["steps_per_s"] for b in bare],
        "bare_cpu_s_per_step": statistics.median(b["cpu_s_per_step"] for b in bare),
        "peak_mem_mb": peak,
        "peak_mem_kind": peak_kind,
        "ray_steps_per_s": None,
        "ray_over_bare": None,
        "flops_per_step": flops,
        "tflops": flops * sps / 1e12,
        "bf16_matmul_tflops": matmul,
        "mfu": flops * sps / 1e12 / matmul if matmul else None,
        "data_wait_frac": data.get("data_wait_frac"),
        "feed_workers": spec.feed_workers or None,
        "feed_width": spec.feed_width if spec.feed_workers else None,
        "feed_steps_per_s": data.get("feed_steps_per_s"),
        "feed_wait_frac": data.get("feed_wait_frac"),
        "host_syncs_per_step": syncs,
        "bf16": spec.bf16 and device.type == "cuda",
        "channels_last": _channels_last(spec, device),
        "compile": spec.compile,
        "torch_threads": spec.threads,
        "warmup": spec.warmup, "steps": spec.steps, "rounds": spec.rounds,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if ray_runs:
        import ray

        rsps = statistics.median(m["steps_per_s"] for m in ray_runs)
        out.update({
            "ray_steps_per_s": rsps,
            "ray_over_bare": rsps / sps,
            "ray_over_bare_best": max(m["steps_per_s"] for m in ray_runs)
            / max(b["steps_per_s"] for b in bare),
            "ray_steps_per_s_runs": [m["steps_per_s"] for m in ray_runs],
            "ray_cpu_s_per_step": statistics.median(m["cpu_s_per_step"] for m in ray_runs),
            "ray_worker_threads": ready["threads"],
            "ray_worker_niceness": ready["niceness"],
            "bare_niceness": os.nice(0),
            "ray_data_steps_per_s": data.get("data_steps_per_s"),
            "ray": ray.__version__,
        })
    return out


@contextlib.contextmanager
def _local_ray(spec: Spec):
    """A private local Ray (never an existing cluster) with the machine's CPUs, at least the
    worker's plus one for the Ray Data tasks. Yields a scratch folder for Ray Train.

    Ray starts its workers at nice 15 (`RAY_worker_niceness`); on a machine shared with other
    work that alone slows the Ray side, so by default the workers get the bare loop's
    priority (spec.ray_niceness = 0).
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="avsa-bench-")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if spec.ray_niceness is not None:
        env["RAY_worker_niceness"] = str(spec.ray_niceness)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylet, and so every worker, inherits it
    try:
        for attempt in range(3):
            try:
                ray.init(
                    address="local",
                    num_cpus=max(spec.threads + 1, os.cpu_count() or 1),
                    num_gpus=1 if spec.device == "cuda" else 0,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": env},
                    _temp_dir=os.path.join(tmp, f"ray{attempt}"),
                )
                break
            except Exception as e:  # Ray raises a bare Exception when its start times out
                ray.shutdown()
                if attempt == 2:
                    raise
                log.warning("ray.init failed (%s); retrying", str(e).splitlines()[0])
        yield tmp
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{os.cpu_count()} ({platform.machine()})"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------- CLI


SHAPES = ("batch", "views", "frames", "size", "audio_frames", "mels", "warmup", "steps", "rounds")


def defaults(device: str, quick: bool) -> Spec:
    """Full model at the paper's shapes on CUDA; on CPU the tiny model with 64 x 64 crops and
    4 clips per step (a few minutes on 2 vCPUs, Ray included); `quick` shrinks everything."""
    if quick:
        return Spec(device=device, model="tiny", batch=2, views=2, frames=4, size=32,
                    audio_frames=20, mels=32, warmup=1, steps=2, rounds=1)
    if device == "cuda":
        return Spec(device=device, model="full", batch=28, size=112, warmup=10, steps=30)
    return Spec(device=device)


def parse_spec(argv: list[str] | None = None) -> tuple[Spec, bool]:
    """The benchmark spec, and whether only the FLOPs are wanted (--count-only)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("tiny", "full"),
                   help="configs/model preset (default: full on cuda, tiny on cpu)")
    p.add_argument("--batch", type=int, help="clips per step (default: 28 on cuda, 4 on cpu)")
    p.add_argument("--views", type=int, help="viewpoints per clip (default 4)")
    p.add_argument("--frames", type=int, help="video frames (default 8)")
    p.add_argument("--size", type=int, help="crop size (default: 112 on cuda, 64 on cpu)")
    p.add_argument("--audio-frames", type=int, help="log-mel frames (default 100)")
    p.add_argument("--mels", type=int, help="mel bins (default 128)")
    p.add_argument("--warmup", type=int, help="untimed steps per process")
    p.add_argument("--steps", type=int, help="timed steps per segment")
    p.add_argument("--rounds", type=int, help="bare/Ray segment pairs (default 5)")
    p.add_argument("--threads", type=int,
                   help="torch threads in both loops (default: 1 on cpu, the CPUs available up "
                        "to 8 on cuda)")
    p.add_argument("--no-bf16", action="store_true", help="no autocast on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last_3d video path (auto: on cuda)")
    p.add_argument("--no-ray", action="store_true", help="bare loop only")
    p.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data fed run")
    p.add_argument("--ray-niceness", default="0",
                   help="nice value of the Ray workers (0: as the bare loop; 'default': Ray's 15)")
    p.add_argument("--feed-workers", type=int, default=0,
                   help="also run the bare loop fed by N decode processes (real samples)")
    p.add_argument("--feed-width", type=int, default=1024, help="equirect width of fed clips")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (smoke test)")
    p.add_argument("--count-only", action="store_true",
                   help="print the FLOPs per step of these shapes and exit (no step is run)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if a.feed_workers < 0 or a.feed_width < 64:
        p.error(f"--feed-workers must be >= 0 and --feed-width >= 64, got {a.feed_workers} and "
                f"{a.feed_width}")
    given = {k: getattr(a, k) for k in SHAPES if getattr(a, k) is not None}
    for k, v in given.items():
        if v < (0 if k == "warmup" else 1):
            p.error(f"--{k.replace('_', '-')}: must be positive, got {v}")
    return dataclasses.replace(
        defaults(a.device, a.quick),
        **given,
        model=a.model or defaults(a.device, a.quick).model,
        threads=a.threads or (min(len(os.sched_getaffinity(0)), 8) if a.device == "cuda" else 1),
        bf16=not a.no_bf16,
        compile=a.compile,
        channels_last={"auto": None, "on": True, "off": False}[a.channels_last],
        ray=not a.no_ray,
        ray_data=not a.no_ray_data,
        ray_niceness=None if a.ray_niceness == "default" else int(a.ray_niceness),
        feed_workers=a.feed_workers,
        feed_width=a.feed_width,
    ), a.count_only


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    spec, count_only = parse_spec(argv)
    log.info("spec: %s", spec)
    # Only the JSON line goes to stdout: anything else (Ray, torch) is sent to stderr.
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    if count_only:
        result = {"bench": "train_step_flops", "model": spec.model, "batch_clips": spec.batch,
                  "viewpoints": spec.views,
                  "flops_per_step": count_flops(compose(spec.overrides()), spec),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    else:
        result = run(spec)
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
