"""Synthetic 360° clips with spatial audio, labels and masks (the demo's and the tests' data).

A scene is a static panoramic background (smooth colour gradient plus low-contrast texture,
random per clip) and one to three sources at least 40° apart (at the start) with elevation
within ±30°. Each source is an object of one class (shape, colours, texture and motion) drawn
as a patch on the sphere, slowly drifting in azimuth, pulsing in size and brightness with the
amplitude modulation of its class sound (a harmonic tone: class fundamental, timbre and AM
rate). Sounds are encoded into first-order ambiX at their (moving) directions.

On disk, per clip KEY: `KEY.mp4` (H.264 equirect + 4-channel AAC), `KEY.masks.npz` (`masks`:
(L, H, W) uint8 at LABEL_FPS, 0 = background, CLASSES[i] -> i + 1) and `KEY.json` (written
last): seed, seconds, fps, sample_rate, width, height, label_fps, `classes` (names present)
and `sources` (class, mask id, az/el in degrees at each label frame, drift, f0, AM rate).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avsa import geometry, media
from avsa.errors import AvsaError, ConfigError

LABEL_FPS = 4  # mask frames (and JSON trajectory samples) per second
EL_RANGE_DEG = (-30.0, 30.0)
MIN_SEPARATION_DEG = 40.0
PEAK = 0.5  # FOA peak after normalisation


@dataclass(frozen=True)
class SourceClass:
    name: str  # also the drawn shape
    color: tuple[float, float, float]  # RGB in [0, 1]
    color2: tuple[float, float, float]  # texture colour
    radius_deg: float
    spin_deg_s: float  # rotation of the shape (its motion)
    f0_hz: float
    harmonics: tuple[float, ...]  # amplitude of harmonic 1, 2, ...
    am_hz: float  # amplitude modulation = visual pulse rate


SOURCE_CLASSES = (
    SourceClass("disc", (0.90, 0.15, 0.10), (1.00, 0.75, 0.55), 11, 0, 110,
                (1, 0.5, 0.33, 0.25, 0.2, 0.17), 1.0),
    SourceClass("square", (1.00, 0.55, 0.00), (0.35, 0.15, 0.00), 10, 20, 147,
                (1, 0, 0.33, 0, 0.2, 0, 0.14), 1.5),
    SourceClass("triangle", (0.95, 0.90, 0.10), (0.45, 0.40, 0.00), 12, -30, 196,
                (1, 0.1), 2.0),
    SourceClass("ring", (0.10, 0.80, 0.20), (0.80, 1.00, 0.80), 12, 0, 247,
                (0.3, 0.6, 1, 0.6, 0.3), 2.5),
    SourceClass("cross", (0.10, 0.85, 0.90), (0.00, 0.30, 0.35), 11, 45, 294,
                (1, 0.8, 0, 0.6, 0, 0.4), 3.0),
    SourceClass("stripes", (0.15, 0.30, 0.95), (0.90, 0.95, 1.00), 10, 0, 392,
                (1, 0, 0, 0.5, 0, 0, 0.25), 3.5),
    SourceClass("checker", (0.60, 0.20, 0.90), (1.00, 1.00, 1.00), 10, -15, 523,
                (0.5, 1, 0.5), 4.0),
    SourceClass("star", (0.95, 0.20, 0.70), (1.00, 0.85, 0.30), 13, 25, 659,
                (1, 0.7, 0.5, 0.35, 0.25), 5.0),
)
CLASSES = [c.name for c in SOURCE_CLASSES]


@dataclass(frozen=True)
class SourceSpec:
    """An explicit source (instead of a random one): class name, start direction in degrees,
    azimuth drift in degrees per second."""

    cls: str
    az_deg: float
    el_deg: float
    drift_deg_s: float = 0.0


@dataclass
class Scene:
    video: np.ndarray  # (T, H, W, 3) uint8 equirect at fps
    foa: np.ndarray  # (4, N) float32 ambiX at sample_rate, peak PEAK
    masks: np.ndarray  # (L, H, W) uint8 class ids at LABEL_FPS
    meta: dict


def _shape(name: str, p: np.ndarray, q: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Inside test and texture mix (0 = color, 1 = color2) at local coordinates (p right,
    q up) in units of the source radius, already rotated by the spin; t in seconds."""
    rho, theta = np.hypot(p, q), np.arctan2(q, p)
    box = np.maximum(np.abs(p), np.abs(q))
    zero = np.zeros_like(p)
    if name == "disc":
        return rho < 1, 0.6 * rho**2
    if name == "square":
        return box < 0.85, (box > 0.6).astype(p.dtype)
    if name == "triangle":  # circumradius 1: every edge at distance 0.5 from the centre
        edges = [p * math.cos(a) + q * math.sin(a) for a in np.deg2rad([-90, 30, 150])]
        return np.maximum.reduce(edges) < 0.5, zero
    if name == "ring":
        return (rho > 0.55) & (rho < 1), 0.5 + 0.5 * np.sin(6 * theta - 4 * t)
    if name == "cross":
        a, b = np.abs(p), np.abs(q)
        return ((a < 0.3) & (b < 1)) | ((b < 0.3) & (a < 1)), zero
    if name == "stripes":  # a banner with scrolling stripes
        banner = (np.abs(p) < 1) & (np.abs(q) < 0.55)
        return banner, (np.sin(2 * np.pi * (2.5 * p - 1.5 * t)) > 0).astype(p.dtype)
    if name == "checker":  # a diamond
        return np.abs(p) + np.abs(q) < 1, ((np.floor(p * 3) + np.floor(q * 3)) % 2).astype(p.dtype)
    if name == "star":
        return rho < 0.4 + 0.6 * ((1 + np.cos(5 * theta)) / 2) ** 2, (rho < 0.3).astype(p.dtype)
    raise ValueError(f"unknown shape {name!r}")


@dataclass
class _Source:
    cls: int  # index into SOURCE_CLASSES
    az0: float  # radians
    el: float
    drift: float  # radians per second
    phase: float  # AM phase, radians
    detune: float  # f0 factor

    def az(self, t):
        return self.az0 + self.drift * t

    def envelope(self, t):
        """AM envelope in [0, 1] at times t (seconds)."""
        c = SOURCE_CLASSES[self.cls]
        return 0.5 - 0.5 * np.cos(2 * np.pi * c.am_hz * np.asarray(t) + self.phase)


def _pixel_directions(height: int, width: int) -> np.ndarray:
    """Unit vectors (3, H * W) of the equirect pixel centres, row-major."""
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    az, el = geometry.pixel_to_direction(u[None, :], v[:, None])
    return geometry.direction_vector(az, el).reshape(-1, 3).T.float().numpy()


def _draw(src: _Source, dirs: np.ndarray, t: float):
    """Pixels covered by a source at time t: (flat pixel indices, RGB (n, 3) uint8)."""
    c = SOURCE_CLASSES[src.cls]
    env = float(src.envelope(t))
    radius = math.radians(c.radius_deg) * (0.85 + 0.3 * env)
    rot = geometry.rotation_to_front(src.az(t), src.el).numpy().astype(np.float32)
    # cheap pre-selection: the shape fits in a cap of 1.25 radii
    idx = np.flatnonzero(rot[0] @ dirs > math.cos(1.25 * radius))
    x, left, up = rot @ dirs[:, idx]
    rho = np.arccos(np.clip(x, -1.0, 1.0))
    scale = rho / np.maximum(np.sin(rho), 1e-6) / radius  # azimuthal equidistant, in radii
    spin = math.radians(c.spin_deg_s) * t
    p0, q0 = -left * scale, up * scale
    p = p0 * math.cos(spin) + q0 * math.sin(spin)
    q = -p0 * math.sin(spin) + q0 * math.cos(spin)
    inside, mix = _shape(c.name, p, q, t)
    mix = mix[inside, None]
    rgb = ((1 - mix) * np.array(c.color) + mix * np.array(c.color2)) * (0.7 + 0.3 * env)
    return idx[inside], (rgb * 255 + 0.5).astype(np.uint8)


def _background(rng: np.random.Generator, dirs: np.ndarray) -> np.ndarray:
    """(H * W, 3) uint8: smooth colour gradient over the sphere plus faint ripples."""
    base = rng.uniform(0.3, 0.55, (3, 1)) + rng.uniform(-0.12, 0.12, (3, 3)) @ dirs  # (3, HW)
    ripples = sum(0.035 * np.sin(rng.uniform(6, 20) * (rng.normal(size=3) @ dirs / 1.7)
                                 + rng.uniform(0, 2 * np.pi)) for _ in range(4))
    return (np.clip(base + ripples, 0, 1).T * 255 + 0.5).astype(np.uint8)


def _place(rng, gen, n: int, sources: Sequence[SourceSpec] | None) -> list[_Source]:
    if not 1 <= n <= len(CLASSES):
        raise ConfigError("num_sources", f"must be in [1, {len(CLASSES)}], got {n}")
    if sources is not None:
        if unknown := [s.cls for s in sources if s.cls not in CLASSES]:
            raise ConfigError("sources", f"unknown class {unknown[0]!r}; known: {CLASSES}")
        specs = [(CLASSES.index(s.cls), math.radians(s.az_deg), math.radians(s.el_deg),
                  math.radians(s.drift_deg_s)) for s in sources]
    else:
        vp = geometry.sample_viewpoints(gen, n, el_range_deg=EL_RANGE_DEG,
                                        min_separation_deg=MIN_SEPARATION_DEG)
        classes = rng.choice(len(CLASSES), n, replace=False)
        drift = rng.uniform(1, 4, n) * rng.choice([-1, 1], n)
        specs = [(int(k), float(a), float(e), math.radians(d))
                 for k, a, e, d in zip(classes, vp.az, vp.el, drift)]
    return [_Source(k, a, e, d, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.97, 1.03)))
            for k, a, e, d in specs]


def _sound(src: _Source, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c = SOURCE_CLASSES[src.cls]
    f0 = c.f0_hz * src.detune
    tone = sum(a * np.sin(2 * np.pi * (h + 1) * f0 * t + rng.uniform(0, 2 * np.pi))
               for h, a in enumerate(c.harmonics) if a)
    return (0.15 + 0.85 * src.envelope(t)) * tone / sum(c.harmonics)


def make_scene(seed: int, seconds: float, *, width: int = 384, height: int = 192, fps: float = 16,
               sample_rate: int = 24000, num_sources: int | None = None,
               sources: Sequence[SourceSpec] | None = None) -> Scene:
    """A deterministic scene for `seed`: random 1-3 sources unless num_sources or explicit
    `sources` are given. See the module docstring for what it holds."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(sources) if sources is not None else num_sources or int(rng.integers(1, 4))
    placed = _place(rng, gen, n, sources)
    dirs = _pixel_directions(height, width)
    background = _background(rng, dirs)

    n_frames, n_labels = round(seconds * fps), max(1, round(seconds * LABEL_FPS))
    label_t = np.arange(n_labels) / LABEL_FPS
    video = np.empty((n_frames, height * width, 3), np.uint8)
    video[:] = background
    masks = np.zeros((n_labels, height * width), np.uint8)
    for src in placed:  # later sources occlude earlier ones, in video and masks alike
        for k in range(n_frames):
            idx, rgb = _draw(src, dirs, k / fps)
            video[k, idx] = rgb
        for k, t in enumerate(label_t):
            masks[k, _draw(src, dirs, t)[0]] = src.cls + 1

    t = np.arange(round(seconds * sample_rate)) / sample_rate
    foa = torch.zeros(4, t.size)
    for src in placed:
        wave = torch.from_numpy(_sound(src, t, rng)).float()
        foa += geometry.encode_foa(wave, torch.from_numpy(src.az(t)).float(), src.el)
    foa[0] += torch.from_numpy(0.01 * rng.standard_normal(t.size)).float()  # diffuse noise
    foa = (foa * (PEAK / foa.abs().max())).numpy()

    meta = {
        "format": "avsa-synth", "version": 1, "seed": int(seed), "seconds": seconds,
        "fps": fps, "sample_rate": sample_rate, "width": width, "height": height,
        "label_fps": LABEL_FPS, "classes": [CLASSES[s.cls] for s in placed],
        "sources": [{
            "class": CLASSES[s.cls], "mask_id": s.cls + 1,
            "az_deg": [round(math.degrees(math.remainder(a, 2 * math.pi)), 3)
                       for a in s.az(label_t)],
            "el_deg": [round(math.degrees(s.el), 3)] * n_labels,
            "drift_deg_s": round(math.degrees(s.drift), 3),
            "f0_hz": round(SOURCE_CLASSES[s.cls].f0_hz * s.detune, 3),
            "am_hz": SOURCE_CLASSES[s.cls].am_hz,
        } for s in placed],
    }
    return Scene(video.reshape(n_frames, height, width, 3), foa,
                 masks.reshape(n_labels, height, width), meta)


def clip_seed(seed: int, index: int) -> int:
    """Seed of clip `index` of a data set made with `seed` (independent streams per clip)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _complete(out_dir: Path, key: str) -> bool:
    return all((out_dir / f"{key}{ext}").is_file() for ext in (".mp4", ".masks.npz", ".json"))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_clip(job: tuple) -> bool:
    """Write clip `index` unless it is complete already; True when it was written."""
    out_dir, index, seconds, seed, kwargs = job
    key = f"clip-{index:06d}"
    if _complete(out_dir, key):
        return False
    scene = make_scene(clip_seed(seed, index), seconds, **kwargs)
    media.encode_clip(out_dir / f"{key}.mp4", scene.video, scene.meta["fps"], scene.foa,
                      scene.meta["sample_rate"])
    npz = io.BytesIO()
    np.savez_compressed(npz, masks=scene.masks)
    _write_atomic(out_dir / f"{key}.masks.npz", npz.getvalue())
    meta = {**scene.meta, "key": key, "index": index, "dataset_seed": int(seed)}
    _write_atomic(out_dir / f"{key}.json", json.dumps(meta, indent=1).encode())  # commit point
    return True


def _init_worker() -> None:
    torch.set_num_threads(1)


def write_dataset(out_dir: str | os.PathLike, clips: int, seconds: float, seed: int,
                  workers: int = 1, *, progress: bool = True, **scene_kwargs) -> list[Path]:
    """Write `clips` clips `clip-000000.mp4` ... (+ .json, .masks.npz) into out_dir; clips
    already complete are kept, so a re-run only fills gaps. scene_kwargs go to make_scene.
    Returns the MP4 paths in index order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seconds, seed, scene_kwargs) for i in range(clips)]
    bar = tqdm(total=clips, desc="synth", unit="clip", file=sys.stderr, disable=not progress)
    with bar:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_write_clip, jobs):
                    bar.update()
        else:
            for job in jobs:
                _write_clip(job)
                bar.update()
    return [out / f"clip-{i:06d}.mp4" for i in range(clips)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsa synth", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--sample-rate", type=int, default=24000)
    parser.add_argument("--sources", type=int, choices=(1, 2, 3), default=None,
                        help="sources per clip (default: random 1-3)")
    args = parser.parse_args(argv)
    if args.clips < 0 or args.seconds <= 0 or args.workers < 1:
        parser.error("--clips must be >= 0, --seconds > 0 and --workers >= 1")
    before = sum(_complete(Path(args.out_dir), f"clip-{i:06d}") for i in range(args.clips))
    start = time.perf_counter()
    try:
        write_dataset(args.out_dir, args.clips, args.seconds, args.seed, args.workers,
                      width=args.width, height=args.height, fps=args.fps,
                      sample_rate=args.sample_rate, num_sources=args.sources)
    except AvsaError as e:
        print(f"avsa synth: error: {e}", file=sys.stderr)
        return 2
    print(f"avsa synth: {args.clips} clips in {args.out_dir} ({args.clips - before} written, "
          f"{before} already there) in {time.perf_counter() - start:.1f} s")
    return 0
