"""Synthetic 360° clips with spatial audio, labels and masks (the demo's and the tests' data).

A scene is a static panoramic background (smooth colour gradient plus low-contrast texture,
random per clip) and four to six sources, of distinct classes or of a few classes used several
times, at least 45° apart at the start, within ±30° of elevation: most crops the default
sampler draws see one (`avsa synth --stats`). Each source, an object of one class (shape,
colours, texture, motion) drawn on the sphere and slowly drifting in azimuth, sounds as events:
it switches on and off on its own schedule, and its look follows (bright, saturated and pulsing
with its class sound's amplitude modulation while on; dim, grey and still while off). No two
classes share a partial. Sounds are encoded into first-order ambiX at their (moving) directions,
over decorrelated diffuse noise on all four channels and, optionally (`rt60_s` > 0), the
reverberant tail of a simulated room (avsa.room).

On disk, per clip KEY: `KEY.mp4` (H.264 equirect + 4-channel AAC), `KEY.masks.npz` (`masks`:
(L, H, W) uint8 at LABEL_FPS, 0 = background, CLASSES[i] -> i + 1) and `KEY.json` (written
last): seed, seconds, fps, sample_rate, width, height, label_fps, rt60_s, `classes` (names
present) and `sources` (class, mask id, az/el in degrees at each label frame, drift, f0, AM
rate, `on` intervals in seconds).
"""

from __future__ import annotations

import inspect
import io
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avsa import geometry, room, shapes, storage
from avsa.data.labels import CLASSES as CLASS_NAMES
from avsa.encode import encode_clip
from avsa.errors import ConfigError
from avsa.progress import progress_bar

LABEL_FPS = 4  # mask frames (and JSON trajectory samples) per second
EL_RANGE_DEG = (-30.0, 30.0)
MIN_SEPARATION_DEG = 45.0
SOURCES_RANGE = (4, 6)  # random sources per clip, inclusive
PEAK = 0.5  # FOA peak after normalisation
NOISE = 0.02  # diffuse noise std on W, before normalisation (a source peaks near 1)
ON_S, OFF_S = (0.6, 1.6), (0.25, 0.8)  # event and pause lengths, uniform
RAMP_S = 0.04  # raised-cosine onset and release of an event


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


# Fundamentals chosen so that no partial of one class lies within 4 % of a partial of another.
SOURCE_CLASSES = (
    SourceClass("disc", (0.90, 0.15, 0.10), (1.00, 0.75, 0.55), 20, 0, 108,
                (1, 0.5, 0.33, 0.25, 0.2, 0.17), 1.0),
    SourceClass("square", (1.00, 0.55, 0.00), (0.35, 0.15, 0.00), 18, 20, 138,
                (1, 0, 0.33, 0, 0.2, 0, 0.14), 1.5),
    SourceClass("triangle", (0.95, 0.90, 0.10), (0.45, 0.40, 0.00), 22, -30, 185,
                (1, 0.1), 2.0),
    SourceClass("ring", (0.10, 0.80, 0.20), (0.80, 1.00, 0.80), 21, 0, 256,
                (0.3, 0.6, 1, 0.6, 0.3), 2.5),
    SourceClass("cross", (0.10, 0.85, 0.90), (0.00, 0.30, 0.35), 20, 45, 306,
                (1, 0.8, 0, 0.6, 0, 0.4), 3.0),
    SourceClass("stripes", (0.15, 0.30, 0.95), (0.90, 0.95, 1.00), 20, 0, 395,
                (1, 0, 0, 0.5, 0, 0, 0.25), 3.5),
    SourceClass("checker", (0.60, 0.20, 0.90), (1.00, 1.00, 1.00), 19, -15, 566,
                (0.5, 1, 0.5), 4.0),
    SourceClass("star", (0.95, 0.20, 0.70), (1.00, 0.85, 0.30), 22, 25, 733,
                (1, 0.7, 0.5, 0.35, 0.25), 5.0),
)
CLASSES = list(CLASS_NAMES)
assert tuple(c.name for c in SOURCE_CLASSES) == CLASS_NAMES


def partials(c: SourceClass, detune: float = 1.0) -> list[float]:
    """Frequencies (Hz) of the sounding harmonics of class c."""
    return [(h + 1) * c.f0_hz * detune for h, a in enumerate(c.harmonics) if a]


@dataclass(frozen=True)
class SourceSpec:
    """An explicit source: class name and direction in degrees; still, sounding throughout."""

    cls: str
    az_deg: float
    el_deg: float


@dataclass
class Scene:
    video: np.ndarray  # (T, H, W, 3) uint8 equirect at fps
    foa: np.ndarray  # (4, N) float32 ambiX at sample_rate, peak PEAK
    masks: np.ndarray  # (L, H, W) uint8 class ids at LABEL_FPS
    meta: dict


def event_schedule(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """(K, 2) on-intervals [start, end) in seconds covering [0, seconds]: events of ON_S
    seconds alternate with pauses of OFF_S, starting at a random phase of either."""
    on = rng.random() < sum(ON_S) / (sum(ON_S) + sum(OFF_S))
    t = -rng.uniform(0, ON_S[1] if on else OFF_S[1])
    spans = []
    while t < seconds:
        length = rng.uniform(*(ON_S if on else OFF_S))
        if on:
            spans.append((t, t + length))
        t, on = t + length, not on
    return np.array(spans, dtype=np.float64).reshape(-1, 2)


def gate(events: np.ndarray | None, t) -> np.ndarray:
    """Event gate in [0, 1] at times t (seconds): 1 inside an on-interval, raised-cosine ramps
    of RAMP_S at its edges, 0 between; all ones when `events` is None (always on)."""
    t = np.asarray(t, dtype=np.float64)
    if events is None:
        return np.ones_like(t)
    g = np.zeros_like(t)
    for start, end in events:
        inside = np.clip(np.minimum(t - start, end - t) / RAMP_S, 0.0, 1.0)
        g = np.maximum(g, 0.5 - 0.5 * np.cos(np.pi * inside))
    return g


@dataclass
class _Source:
    cls: int  # index into SOURCE_CLASSES
    az0: float  # radians
    el: float
    drift: float  # radians per second
    phase: float  # AM phase, radians
    detune: float  # f0 factor
    events: np.ndarray | None  # (K, 2) on-intervals in seconds, None = always on

    def az(self, t):  # radians at times t (seconds)
        return self.az0 + self.drift * t

    def envelope(self, t):
        """AM envelope in [0, 1] at times t (seconds)."""
        c = SOURCE_CLASSES[self.cls]
        return 0.5 - 0.5 * np.cos(2 * np.pi * c.am_hz * np.asarray(t) + self.phase)


def _draw(src: _Source, dirs: np.ndarray, t: float):
    """Pixels covered by a source at time t: (flat pixel indices, RGB (n, 3) uint8). While on
    it pulses in size and brightness with its AM envelope; while off it is small, dim and grey."""
    c = SOURCE_CLASSES[src.cls]
    on = float(gate(src.events, t))
    pulse = float(src.envelope(t)) * on
    radius = math.radians(c.radius_deg) * (0.85 + 0.3 * pulse)
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
    inside, mix = shapes.shape(c.name, p, q, t)
    mix = mix[inside, None]
    rgb = (1 - mix) * np.array(c.color) + mix * np.array(c.color2)
    grey = rgb.mean(axis=1, keepdims=True)
    rgb = (grey + (rgb - grey) * (0.3 + 0.7 * on)) * (0.45 + 0.4 * on + 0.15 * pulse)
    return idx[inside], (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _place(rng, gen, n: int, sources: Sequence[SourceSpec] | None, seconds: float,
           classes_per_clip: int | None) -> list[_Source]:
    kinds = n if classes_per_clip is None else classes_per_clip
    for key, value in (("num_sources", n), ("classes_per_clip", kinds)):
        if not 1 <= value <= len(CLASSES):
            raise ConfigError(key, f"must be in [1, {len(CLASSES)}], got {value}")
    if sources is not None:
        if unknown := [s.cls for s in sources if s.cls not in CLASSES]:
            raise ConfigError("sources", f"unknown class {unknown[0]!r}; known: {CLASSES}")
        specs = [(CLASSES.index(s.cls), math.radians(s.az_deg), math.radians(s.el_deg), 0.0)
                 for s in sources]
    else:
        vp = geometry.sample_viewpoints(gen, n, el_range_deg=EL_RANGE_DEG,
                                        min_separation_deg=MIN_SEPARATION_DEG)
        if classes_per_clip == 1:  # drawn as before C existed: the same seeds, the same clips
            classes = np.full(n, rng.integers(len(CLASSES)))
        else:  # the clip's classes, each used at least once
            classes = rng.choice(len(CLASSES), min(n, kinds), replace=False)
            if (m := n - len(classes)) > 0:
                classes = rng.permutation(np.concatenate((classes, rng.choice(classes, m))))
        drift = rng.uniform(1, 4, n) * rng.choice([-1, 1], n)
        specs = [(int(k), float(a), float(e), math.radians(d))
                 for k, a, e, d in zip(classes, vp.az, vp.el, drift)]
    return [_Source(k, a, e, d, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.99, 1.01)),
                    None if sources is not None else event_schedule(rng, seconds))
            for k, a, e, d in specs]


def _sound(src: _Source, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c = SOURCE_CLASSES[src.cls]
    tone = sum(a * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
               for f, a in zip(partials(c, src.detune), filter(None, c.harmonics)))
    return gate(src.events, t) * (0.3 + 0.7 * src.envelope(t)) * tone / sum(c.harmonics)


def make_scene(seed: int, seconds: float, *, width: int = 384, height: int = 192, fps: float = 16,
               sample_rate: int = 24000, num_sources: int | None = None,
               sources: Sequence[SourceSpec] | None = None, classes_per_clip: int | None = None,
               rt60_s: float = 0.0) -> Scene:
    """A deterministic scene for `seed` (see the module docstring): SOURCES_RANGE sources of
    distinct classes, or num_sources, or explicit `sources`; `classes_per_clip` k draws them
    from k classes, each used at least once; `rt60_s` > 0 adds a simulated room's reverb."""
    if not (math.isfinite(rt60_s) and 0.0 <= rt60_s <= 3.0):
        raise ConfigError("rt60_s", f"must be in [0, 3] seconds, got {rt60_s}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    n = (len(sources) if sources is not None
         else num_sources or int(rng.integers(SOURCES_RANGE[0], SOURCES_RANGE[1] + 1)))
    placed = _place(rng, gen, n, sources, seconds, classes_per_clip)
    dirs = shapes.pixel_directions(height, width)
    background = shapes.background(rng, dirs)

    n_frames, n_labels = round(seconds * fps), max(1, round(seconds * LABEL_FPS))
    label_t = np.arange(n_labels) / LABEL_FPS
    video = np.repeat(background[None], n_frames, axis=0)  # (T, H * W, 3)
    masks = np.zeros((n_labels, height * width), np.uint8)
    for src in placed:  # later sources occlude earlier ones, in video and masks alike
        for k in range(n_frames):
            idx, rgb = _draw(src, dirs, k / fps)
            video[k, idx] = rgb
        for k, t in enumerate(label_t):
            masks[k, _draw(src, dirs, t)[0]] = src.cls + 1

    t = np.arange(round(seconds * sample_rate)) / sample_rate
    waves = [torch.from_numpy(_sound(src, t, rng)).float() for src in placed]
    foa = sum(geometry.encode_foa(wave, torch.from_numpy(src.az(t)).float(), src.el)
              for src, wave in zip(placed, waves)).numpy()
    if rt60_s > 0:
        tails = room.bformat_tails([(s.az0, s.el) for s in placed], rt60_s, sample_rate, rng)
        foa += room.convolve(np.stack([w.numpy() for w in waves]), tails)
    foa += room.diffuse_noise(rng, t.size, NOISE)
    foa = (foa * (PEAK / np.abs(foa).max())).astype(np.float32)

    meta = {
        "format": "avsa-synth", "version": 2, "seed": int(seed), "seconds": seconds,
        "fps": fps, "sample_rate": sample_rate, "width": width, "height": height,
        "label_fps": LABEL_FPS, "rt60_s": rt60_s, "num_sources": num_sources,
        "classes_per_clip": classes_per_clip,
        "classes": list(dict.fromkeys(CLASSES[s.cls] for s in placed)),
        "sources": [{
            "class": CLASSES[s.cls], "mask_id": s.cls + 1,
            "az_deg": [round(math.degrees(math.remainder(a, 2 * math.pi)), 3)
                       for a in s.az(label_t)],
            "el_deg": [round(math.degrees(s.el), 3)] * n_labels,
            "drift_deg_s": round(math.degrees(s.drift), 3),
            "f0_hz": round(SOURCE_CLASSES[s.cls].f0_hz * s.detune, 3),
            "am_hz": SOURCE_CLASSES[s.cls].am_hz,
            "on": (None if s.events is None
                   else [[round(float(a), 3), round(float(b), 3)] for a, b in s.events]),
        } for s in placed],
    }
    return Scene(video.reshape(n_frames, height, width, 3), foa,
                 masks.reshape(n_labels, height, width), meta)


def clip_seed(seed: int, index: int) -> int:
    """Seed of clip `index` of a data set made with `seed` (independent streams per clip)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def is_complete(out_dir: Path, key: str) -> bool:
    """Whether clip `key` has its three files in out_dir (its JSON is written last)."""
    return all((out_dir / f"{key}{ext}").is_file() for ext in (".mp4", ".masks.npz", ".json"))


def _kept(out_dir: Path, index: int, seconds: float, seed: int, scene_kwargs: dict) -> bool:
    """True when clip `index` is complete; a ConfigError when its JSON says it was made with
    other settings, which a re-run would otherwise mix into the data set unnoticed."""
    key = f"clip-{index:06d}"
    if not is_complete(out_dir, key):
        return False
    try:
        meta = json.loads((out_dir / f"{key}.json").read_text())
    except ValueError:
        meta = None
    if not isinstance(meta, dict):  # not the JSON this module writes: made again
        return False
    want = inspect.signature(make_scene).bind(clip_seed(seed, index), seconds, **scene_kwargs)
    want.apply_defaults()
    if diff := [f"{k}={meta.get(k)} (not {v})" for k, v in want.arguments.items()
                if k != "sources" and meta.get(k) != v]:
        raise ConfigError(out_dir / f"{key}.json", f"made with {', '.join(diff)}; write to "
                                                    "another folder, or delete it to remake it")
    return True


def _write_clip(job: tuple) -> None:
    out_dir, index, seconds, seed, kwargs = job
    key = f"clip-{index:06d}"
    scene = make_scene(clip_seed(seed, index), seconds, **kwargs)
    encode_clip(out_dir / f"{key}.mp4", scene.video, scene.meta["fps"], scene.foa,
                scene.meta["sample_rate"])
    npz = io.BytesIO()
    np.savez_compressed(npz, masks=scene.masks)
    storage.write_bytes(out_dir / f"{key}.masks.npz", npz.getvalue())
    # the JSON, written last, commits the clip
    meta = {**scene.meta, "key": key, "index": index, "dataset_seed": int(seed)}
    storage.write_bytes(out_dir / f"{key}.json", json.dumps(meta, indent=1).encode())


def _pool_process() -> None:
    """A writing process: one torch thread; Ctrl-C left to the parent, whose pool ends it with
    SIGTERM, taken here as an exit so that a clip being written removes its temporary files."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def write_dataset(out_dir: str | os.PathLike, clips: int, seconds: float, seed: int,
                  workers: int = 1, *, progress: bool = True, **scene_kwargs) -> list[Path]:
    """Write `clips` clips `clip-000000.mp4` ... (+ .json, .masks.npz) into out_dir; clips
    already complete are kept, so a re-run only fills gaps (a ConfigError when they were
    made with other settings). scene_kwargs go to make_scene. Returns the MP4 paths in index
    order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seconds, seed, scene_kwargs) for i in range(clips)
            if not _kept(out, i, seconds, seed, scene_kwargs)]
    with progress_bar(len(jobs), "synth", "clip", enabled=progress) as bar:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            with ctx.Pool(workers, initializer=_pool_process) as pool:
                for _ in pool.imap_unordered(_write_clip, jobs):
                    bar.update()
                # Processes left to end on their own: the pool's exit would SIGTERM them,
                # maybe in their interpreter's shutdown, where the exit prints a traceback.
                pool.close()
                pool.join()
        else:
            for job in jobs:
                _write_clip(job)
                bar.update()
    return [out / f"clip-{i:06d}.mp4" for i in range(clips)]


def read_format(data) -> dict[str, float]:
    """write_dataset's fps and size for clips that `data` (a DataConfig) reads at their own (a
    larger or faster clip would cost only decoding); the default size where it keeps clips'."""
    fmt: dict[str, float] = {"fps": data.fps}
    if data.equirect_height:
        fmt.update(height=data.equirect_height, width=2 * data.equirect_height)
    return fmt


def write_split(out: Path, split: str, clips: int, seconds: float, seed: int, workers: int = 1,
                **kwargs) -> str:
    """Synthesise `clips` clips into out/clips/SPLIT (see write_dataset) and shard them into
    out/shards/SPLIT, 16 clips a shard; returns that shard folder."""
    from avsa.data.shards import write_shards

    write_dataset(out / "clips" / split, clips, seconds, seed, workers, **kwargs)
    uri = str(out / "shards" / split)
    write_shards(out / "clips" / split, uri, samples_per_shard=16, split=split)
    return uri
