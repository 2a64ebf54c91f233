"""CPU cost of one training sample (decode + crops + FOA rotation + log-mel) per CPU core.

Prints ONE JSON line on stdout (logs on stderr). For each equirect width it writes a few
synthetic clips (cached under --out), then times `avsa.data.transform.make_sample` on them with
one torch thread, in CPU seconds of the whole process (decoder threads included): on a shared
machine CPU time barely moves with the neighbours' load, wall time does. Per-core throughput is
1 / (CPU seconds per sample); docs/scaling.md turns it into CPU cores per GPU.

    python bench/decode_cost.py --widths 384,1024 --clips 3 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import torch

from avsa import media, synth
from avsa.config import DataConfig
from avsa.data import transform
from avsa.data.shards import RawSample
from avsa.data.transform import make_sample

log = logging.getLogger("bench.decode_cost")


def clips(folder: Path, n: int, seconds: float, width: int) -> list[RawSample]:
    """`n` synthetic clips of `width` x `width // 2`, as shard samples (mp4 + json)."""
    paths = synth.write_dataset(folder, n, seconds, seed=0, progress=False, width=width,
                                height=width // 2)
    return [RawSample(p.stem, {"mp4": p.read_bytes(), "json": p.with_suffix(".json").read_bytes()})
            for p in paths]


def cost(samples: list[RawSample], cfg: DataConfig, repeats: int) -> dict[str, float]:
    """CPU and wall seconds per sample (medians over samples x repeats; a new epoch per
    repeat, so windows and viewpoints differ)."""
    make_sample(samples[0], cfg, seed=0, epoch=-1)  # warm-up: codecs, mel filterbank
    cpu, wall = [], []
    for epoch in range(repeats):
        for raw in samples:
            c0, t0 = time.process_time(), time.perf_counter()
            make_sample(raw, cfg, seed=0, epoch=epoch)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    c, w = statistics.median(cpu), statistics.median(wall)
    return {"cpu_s_per_sample": round(c, 4), "wall_s_per_sample": round(w, 4),
            "samples_per_core_s": round(1 / c, 2)}


def stages(samples: list[RawSample], cfg: DataConfig) -> dict[str, float]:
    """CPU milliseconds per sample of each stage of `make_sample` (epoch 0 windows): the
    decode of both windows from one open, the crops, the log-mel."""
    ms = dict.fromkeys(("decode", "crops", "audio_features"), 0.0)
    for raw in samples:
        plan = transform.plan_sample(raw.key, cfg, seed=0, epoch=0,
                                     duration=transform.clip_duration(raw))
        c = [time.process_time()]
        frames, foa = media.decode_clip(
            raw.members["mp4"], fps=cfg.fps, start=plan.windows.video,
            duration=cfg.frames / cfg.fps, audio_start=plan.windows.audio,
            audio_duration=cfg.audio_seconds, sample_rate=cfg.sample_rate)
        c.append(time.process_time())
        transform.view_crops(frames, plan, cfg.crop_size)
        c.append(time.process_time())
        transform.audio_features(torch.from_numpy(foa), plan, cfg)
        c.append(time.process_time())
        for name, t0, t1 in zip(ms, c, c[1:]):
            ms[name] += 1000 * (t1 - t0)
    return {k: round(v / len(samples), 1) for k, v in ms.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="384,1024", help="equirect widths, comma separated")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--out", default="outputs/bench/decode_cost")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(1)  # as in a 1-CPU Ray Data task
    cv2.setNumThreads(1)
    cfg = DataConfig(num_viewpoints=a.views, crop_size=112, frames=8)
    load0 = os.getloadavg()[0]
    per_width = {}
    for width in (int(w) for w in a.widths.split(",")):
        samples = clips(Path(a.out) / f"{width}x{a.seconds:g}s", a.clips, a.seconds, width)
        per_width[str(width)] = cost(samples, cfg, a.repeats)
        per_width[str(width)]["stage_cpu_ms"] = stages(samples, cfg)
        log.info("width %d: %s", width, per_width[str(width)])
    print(json.dumps({
        "bench": "decode_cost",
        "per_width": per_width,
        "views": a.views, "crop": 112, "frames": 8, "audio_seconds": cfg.audio_seconds,
        "clips": a.clips, "clip_seconds": a.seconds, "repeats": a.repeats,
        "torch_threads": 1, "opencv_threads": 1, "decode_threads": cfg.decode_threads,
        "cpus": os.cpu_count(),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
