"""Does the quick preset learn on 360° clips it was not designed around?

Writes clips shaped like real uploads, from a generator that shares nothing with `avsa synth`
but the ambiX convention: 30 fps, 48 kHz, no sidecar JSON and no masks; three to five sounding
objects of kinds avsa synth never draws (soft textured blobs that wander, heard as band-passed
noise bursts and glides), over a noisy panorama. Then shards them and pretrains AVSA with the
demo preset, and prints one JSON line: validation AVSA accuracy against chance 1/V.

    python bench/foreign_clips.py --clips 160 --steps 300 --out outputs/foreign
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) values in [0, 1]: bilinearly upsampled random cells, wrapping in azimuth."""
    grid = torch.from_numpy(rng.random((1, 1, cells, 2 * cells + 1))).float()
    grid[..., -1] = grid[..., 0]
    up = torch.nn.functional.interpolate(grid, size=(h, w + w // (2 * cells)), mode="bilinear",
                                         align_corners=True)
    return up[0, 0, :, :w].numpy()


def make_clip(seed: int, seconds: float, width: int, height: int, fps: int, sr: int):
    """(video (T, H, W, 3) uint8, foa (4, N) float32) of one foreign scene."""
    from avsa import geometry

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 6))
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    az, el = geometry.pixel_to_direction(torch.tensor(u)[None, :], torch.tensor(v)[:, None])
    dirs = geometry.direction_vector(az, el).numpy().reshape(-1, 3)  # (H W, 3)
    sky = np.stack([_smooth_noise(rng, height, width, 6) for _ in range(3)], -1)
    base = (0.25 + 0.5 * sky * rng.uniform(0.5, 1.0, 3)).astype(np.float32).reshape(-1, 3)
    frames = np.repeat(base[None], round(seconds * fps), axis=0)  # (T, H W, 3)
    t = np.arange(round(seconds * sr)) / sr
    foa = np.zeros((4, t.size), np.float32)
    hz = np.fft.rfftfreq(t.size, 1 / sr)
    for _ in range(n):
        a0, e0 = rng.uniform(-np.pi, np.pi), rng.uniform(-0.45, 0.45)
        speed, radius = rng.uniform(-0.3, 0.3), rng.uniform(0.25, 0.4)
        colour = rng.uniform(0.1, 1.0, 3)
        freq = rng.uniform(2, 7)
        # sound: band-passed noise around a random centre plus a gliding tone, in bursts
        centre, glide = rng.uniform(250, 3500), rng.uniform(-0.3, 0.3)
        spec = np.fft.rfft(rng.standard_normal(t.size))
        spec *= np.exp(-0.5 * (np.log(np.maximum(hz, 1) / centre) / 0.15) ** 2)
        noise = np.fft.irfft(spec, t.size)
        tone = np.sin(2 * np.pi * centre * (t + glide * t**2 / 2)) * 0.3
        burst = np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 6)) > -0.2
        env = np.convolve(burst.astype(float), np.ones(480) / 480, mode="same")
        wave = (noise / (np.abs(noise).max() + 1e-9) + tone) * env
        foa += geometry.encode_foa(torch.from_numpy(wave).float(),
                                   torch.from_numpy(a0 + speed * t).float(), e0).numpy()
        for k in range(len(frames)):
            tk = k / fps
            on = float(env[min(int(tk * sr), t.size - 1)])
            c = geometry.direction_vector(torch.tensor(a0 + speed * tk), torch.tensor(e0)).numpy()
            idx = np.flatnonzero(dirs @ c > math.cos(radius))
            ang = np.arccos(np.clip(dirs[idx] @ c, -1, 1))
            blob = np.clip(1 - ang / radius, 0, 1) ** 0.5
            texture = 0.75 + 0.25 * np.sin(freq * 10 * ang - 6 * tk)
            alpha = (blob * (0.5 + 0.5 * on))[:, None]
            frames[k, idx] = frames[k, idx] * (1 - alpha) + alpha * colour * texture[:, None]
    frames = frames.reshape(len(frames), height, width, 3)
    foa += rng.standard_normal(foa.shape).astype(np.float32) * 0.01
    foa *= 0.5 / np.abs(foa).max()
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8), foa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=160)
    p.add_argument("--val-clips", type=int, default=40)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("outputs/foreign"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for pretraining")
    args = p.parse_args(argv)
    from avsa.config import compose
    from avsa.data.shards import write_shards
    from avsa.encode import encode_clip
    from avsa.train.driver import pretrain

    shards = {}
    for split, n, offset in (("train", args.clips, 0), ("val", args.val_clips, 10**6)):
        folder = args.out / "clips" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = folder / f"upload_{offset + i:07d}.mp4"
            if not path.exists():
                video, foa = make_clip(offset + i, args.seconds, args.width, args.width // 2, 30,
                                       48000)
                encode_clip(path, video, 30, foa, 48000)
            print(f"\r{split} {i + 1}/{n}", end="", file=sys.stderr)
        print(file=sys.stderr)
        shards[split] = str((args.out / "shards" / split).resolve())
        write_shards(folder, shards[split], samples_per_shard=16, split=split)
    cfg = compose(["experiment=demo_local", f"data.shards={shards['train']}",
                   f"data.val_shards={shards['val']}", f"train.max_steps={args.steps}",
                   f"storage.path={(args.out / 'runs').resolve()}",
                   f"tracking.uri=sqlite:///{(args.out / 'mlflow.db').resolve()}",
                   *args.overrides])
    res = pretrain(cfg)
    v = cfg.data.num_viewpoints
    print(json.dumps({"name": "foreign_clips", "val_avsa_acc": res.metrics.get("val/avsa_acc"),
                      "chance": 1 / v, "steps": args.steps, "clips": args.clips,
                      "audio_features": cfg.data.audio_features, "unit": "fraction"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
