"""Input pipeline throughput: plain PyAV decode vs the full sample transform, and shards
streamed from a loopback S3 endpoint vs local files.

Prints one JSON line on stdout; logs (per-repeat rates, per-stage milliseconds) go to stderr.
Clips and shards are cached under --out. Both sides run in this process on the same clips,
alternating clip by clip, with one torch and one OpenCV thread (as in a 1-CPU Ray task).

The baseline ("raw decode") is the plain PyAV decode of the windows the transform decodes, done
the straightforward way: one open per stream, FFmpeg's default threads, every frame after the
seek decoded, each picked frame converted with `frame.to_ndarray(format="rgb24")`. It is fixed
here, independent of avsa.media, so the ratio transform / raw decode (CPU time and wall) shows
what the transform costs next to simply decoding. `transform_over_media_decode_cpu` compares
with avsa.media's own decode of the same windows instead (what crops, log-mel and planning add).
Rates are the best over --repeats, CPU times the lowest (the machine may be shared).

    python bench/pipeline.py --clips 12 --repeats 3              # 384x192
    python bench/pipeline.py --clips 8 --repeats 3 --width 1024  # the default clip size
    python bench/pipeline.py --clips 12 --repeats 3 --audio-features intensity
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import av
import cv2
import torch

from avsa import media, storage, synth
from avsa.config import DataConfig
from avsa.data import pipeline, shards, transform
from avsa.data.manifest import read_manifest, shard_uris

log = logging.getLogger("bench.pipeline")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch and OpenCV threads, as in a 1-CPU Ray task")
    p.add_argument("--audio-features", default="logmel",
                   choices=("logmel", "cardioid", "intensity"),
                   help="data.audio_features of the transform (the synthetic presets use intensity)")
    p.add_argument("--out", default="outputs/bench/pipeline")
    return p.parse_args(argv)


def prepare(args) -> str:
    """Synthetic clips and their local shards (cached); returns the shard folder."""
    root = Path(args.out) / f"{args.clips}x{args.seconds:g}s-{args.width}"
    clips = root / "clips"
    synth.write_dataset(clips, args.clips, args.seconds, seed=0, progress=False,
                        width=args.width, height=args.width // 2)
    out = str(root / "shards")
    shards.write_shards(str(clips), out, samples_per_shard=4, progress=False)
    return out


def load_samples(uri: str) -> list[shards.RawSample]:
    man = read_manifest(uri)
    return [s for u, info in zip(shard_uris(uri, man), man.shards)
            for s in shards.open_shard(u, info)]


def _plain_window(data: bytes, kind: str, start: float, stop: float, fps: float | None):
    """Plain PyAV: open, seek, decode one stream over [start, stop); video frames picked at
    `fps` are converted to RGB arrays, audio frames to arrays."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0] if kind == "video" else c.streams.audio[0]
        if start > 0:
            c.seek(int(start / stream.time_base), stream=stream, backward=True)
        out, prev, k = [], None, 0
        for frame in c.decode(stream):
            t = frame.time
            if kind == "audio":
                out.append(frame.to_ndarray())
                if t >= stop:
                    break
                continue
            while prev is not None and start + k / fps < t - 1e-4 and start + k / fps < stop:
                out.append(prev.to_ndarray(format="rgb24"))
                k += 1
            if start + k / fps >= stop:
                break
            prev = frame
        return out


def raw_decode(raw, cfg, plan) -> None:
    """The baseline: what the transform decodes (video window, audio window), plain PyAV."""
    data, win = raw.members["mp4"], plan.windows
    _plain_window(data, "video", win.video, win.video + cfg.frames / cfg.fps, cfg.fps)
    _plain_window(data, "audio", win.audio, win.audio + cfg.audio_seconds, None)


def media_decode(raw, cfg, plan) -> None:
    """avsa.media's decode of the same windows (one open)."""
    win = plan.windows
    media.decode_clip(raw.members["mp4"], fps=cfg.fps, start=win.video,
                      duration=cfg.frames / cfg.fps, audio_start=win.audio,
                      audio_duration=cfg.audio_seconds, sample_rate=cfg.sample_rate)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def decode_vs_transform(samples, cfg, plans, repeats: int) -> dict[str, float]:
    """Best clips/s over repeats of (plain decode, avsa.media decode, full transform),
    alternating clip by clip so all see the same load, and the lowest CPU ms per clip."""
    fns = {"raw": raw_decode, "media": media_decode,
           "full": lambda raw, cfg, plan: transform.make_sample(raw, cfg, seed=0, epoch=0)}
    best = dict.fromkeys(fns, 0.0)
    cpu = dict.fromkeys(fns, float("inf"))
    n = len(samples)
    for r in range(repeats):
        wall, used = dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0.0)
        for raw, plan in zip(samples, plans):
            for name, fn in fns.items():
                w, c = cpu_timed(lambda fn=fn, raw=raw, plan=plan: fn(raw, cfg, plan))
                wall[name] += w
                used[name] += c
        log.info("repeat %d: %s", r, {k: f"{n / wall[k]:.1f} clips/s, {1000 * used[k] / n:.1f} "
                                         "cpu ms/clip" for k in fns})
        best = {k: max(best[k], n / wall[k]) for k in fns}
        cpu = {k: min(cpu[k], 1000 * used[k] / n) for k in fns}
    return {"raw": best["raw"], "full": best["full"], "raw_cpu_ms": cpu["raw"],
            "full_cpu_ms": cpu["full"], "media_cpu_ms": cpu["media"]}


def stages(samples, cfg, plans) -> dict[str, float]:
    """CPU milliseconds per clip of each transform stage (logged, for profiling)."""
    ms = dict.fromkeys(("duration", "decode", "crops", "audio_features"), 0.0)
    for raw, plan in zip(samples, plans):
        ms["duration"] += cpu_timed(lambda raw=raw: transform.sample_duration(raw))[1]
        frames, foa = media.decode_clip(
            raw.members["mp4"], fps=cfg.fps, start=plan.windows.video,
            duration=cfg.frames / cfg.fps, audio_start=plan.windows.audio,
            audio_duration=cfg.audio_seconds)
        ms["decode"] += cpu_timed(lambda raw=raw, plan=plan: media_decode(raw, cfg, plan))[1]
        ms["crops"] += cpu_timed(lambda frames=frames, plan=plan: transform.view_crops(
            frames, plan, cfg.crop_size))[1]
        ms["audio_features"] += cpu_timed(lambda foa=foa, plan=plan: transform.audio_features(
            torch.from_numpy(foa), plan, cfg))[1]
    return {k: round(1000 * v / len(samples), 2) for k, v in ms.items()}


def stream(uri: str, cfg) -> int:
    return sum(len(b["key"]) for b in pipeline.iter_local(uri, cfg, seed=0, batch_size=4))


def s3_copy(local_uri: str):
    """Start a moto S3 server on loopback, upload the shards; returns (server, s3 uri)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3").create_bucket(Bucket="bench")
    storage.copy_tree(local_uri, "s3://bench/shards")
    return server, "s3://bench/shards"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto request lines
    torch.set_num_threads(args.torch_threads)
    cv2.setNumThreads(args.torch_threads)
    load0 = os.getloadavg()[0]
    cfg = DataConfig(num_viewpoints=4, crop_size=112, frames=8,
                     audio_features=args.audio_features)
    uri = prepare(args)
    samples = load_samples(uri)
    n = len(samples)
    plans = [transform.plan_sample(s.key, cfg, seed=0, epoch=0,
                                   duration=transform.sample_duration(s)) for s in samples]
    for raw, plan in zip(samples[:2], plans[:2]):  # warm-up
        transform.make_sample(raw, cfg, seed=0, epoch=0)
        raw_decode(raw, cfg, plan)
    rates = decode_vs_transform(samples, cfg, plans, args.repeats)
    raw_rate, full_rate = rates["raw"], rates["full"]
    stage_ms = stages(samples, cfg, plans)
    log.info("stage CPU ms per clip: %s", stage_ms)
    server, s3_uri = s3_copy(uri)
    try:
        stream(s3_uri, cfg)  # warm-up: client, connection pool
        local_rate = s3_rate = 0.0
        for r in range(args.repeats):  # alternating passes; best of each
            local = n / timed(lambda: stream(uri, cfg))
            remote = n / timed(lambda: stream(s3_uri, cfg))
            log.info("repeat %d: local %.1f clips/s, s3 %.1f clips/s", r, local, remote)
            local_rate, s3_rate = max(local_rate, local), max(s3_rate, remote)
    finally:
        server.stop()
    result = {
        "bench": "pipeline",
        "raw_decode_clips_per_s": round(raw_rate, 2),
        "transform_clips_per_s": round(full_rate, 2),
        "transform_over_decode": round(full_rate / raw_rate, 3),
        "raw_decode_cpu_ms": round(rates["raw_cpu_ms"], 2),
        "transform_cpu_ms": round(rates["full_cpu_ms"], 2),
        "transform_over_decode_cpu": round(rates["raw_cpu_ms"] / rates["full_cpu_ms"], 3),
        "media_decode_cpu_ms": round(rates["media_cpu_ms"], 2),
        "transform_over_media_decode_cpu": round(rates["media_cpu_ms"] / rates["full_cpu_ms"], 3),
        "stage_cpu_ms": stage_ms,
        "local_clips_per_s": round(local_rate, 2),
        "s3_clips_per_s": round(s3_rate, 2),
        "s3_over_local": round(s3_rate / local_rate, 3),
        "n_clips": n,
        "width": args.width,
        "audio_features": args.audio_features,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
