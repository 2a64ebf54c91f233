"""Per-sample transform: one shard sample (bytes) -> model-ready arrays.

Everything random comes from a generator seeded by sha256(seed, epoch, key), so a sample is a
pure function of (bytes, config, seed, epoch): the same on any worker, different per epoch.

Time windows: a `cfg.audio_seconds` audio window is drawn uniformly inside the clip, and the
`cfg.frames / cfg.fps` video window uniformly inside the audio window. Only those windows are
decoded. The clip length comes from the sample's json when it declares one ("duration", or
"seconds" as synthetic clips write it), saving a container open; when decoding with it fails,
the length is probed from the container headers and the windows drawn again.

Augmentation (cfg.augment): one flip decision mirrors the whole scene (every crop mirrored,
FOA Y negated, viewpoint azimuths negated), a volume gain scales the FOA, and each crop gets
its own colour jitter (avsa.data.crops: torchvision ColorJitter ranges fused into one affine
RGB map per crop).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avsa import audio, geometry, media
from avsa.data import crops, labels
from avsa.errors import MediaError

VIDEO_MEMBER = "mp4"
AUDIO_MEMBERS = ("m4a", "wav", "flac", "aac")  # separate FOA audio, preferred over the mp4's
MASK_MEMBER = "masks.npz"


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Generator seeded by sha256 of (seed, epoch, key): stable across processes and runs."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{int(epoch)}\x1f{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class Windows:
    """Start times in seconds of the audio window, the video window and (AVTS) the other one."""

    audio: float
    video: float
    other: float | None = None


def choose_windows(
    rng: np.random.Generator, duration: float, audio_s: float, video_s: float,
    other_time: bool = False, name: str = "clip",
) -> Windows:
    """Audio start uniform in [0, duration - audio_s]; video start uniform inside the audio
    window. With other_time (AVTS), the second audio window never overlaps the first: the
    pair of starts is uniform over those at least audio_s apart, and a clip shorter than
    2 audio_s is refused (MediaError naming it). Always the same number of draws from rng."""
    last = max(0.0, duration - audio_s)
    u_audio, u_video = float(rng.random()), float(rng.random())
    other = None
    if other_time:
        u_other = float(rng.random())
        if last < audio_s - 1e-9:
            raise MediaError(name, f"AVTS needs clips of at least 2 x data.audio_seconds = "
                                   f"{2 * audio_s:g} s (a negative window that does not overlap "
                                   f"the positive); this one is {duration:g} s")
        # (x, y) uniform on the triangle 0 <= x <= y <= last - audio_s; (x, y + audio_s) is
        # then a uniform ordered pair of disjoint starts, and u_audio < 0.5 says which is a0
        half, u = divmod(2.0 * u_audio, 1.0)
        y = max(0.0, last - audio_s) * math.sqrt(u)
        early, late = y * u_other, y + audio_s
        a0, other = (late, early) if half else (early, late)
    else:
        a0 = u_audio * last
    v0 = a0 + u_video * max(0.0, min(audio_s, duration - a0) - video_s)
    return Windows(audio=a0, video=min(v0, max(0.0, duration - video_s)), other=other)


def _fit(x: np.ndarray, n: int, axis: int, pad_edge: bool) -> np.ndarray:
    """Truncate (a view, no copy) or pad x along axis to length n (edge repeat or zeros)."""
    if x.shape[axis] >= n:
        return x[(slice(None),) * (axis % x.ndim) + (slice(0, n),)]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return np.pad(x, widths, mode="edge" if pad_edge else "constant")


def _meta(raw) -> dict[str, Any]:
    if "json" not in raw.members:
        return {}
    return labels.parse_meta(raw.members["json"], f"{raw.key}.json")


def _audio_source(raw) -> tuple[bytes, str]:
    for ext in AUDIO_MEMBERS:
        if ext in raw.members:
            return raw.members[ext], f"{raw.key}.{ext}"
    return raw.members[VIDEO_MEMBER], f"{raw.key}.{VIDEO_MEMBER}"


def clip_duration(raw) -> float:
    """Seconds both the video and the audio of a sample cover (container metadata, no decode)."""
    video_name = f"{raw.key}.{VIDEO_MEMBER}"
    info = media.probe(raw.members[VIDEO_MEMBER], name=video_name)
    src, name = _audio_source(raw)
    sound = info.audio if src is raw.members[VIDEO_MEMBER] else media.probe_audio(src, name=name)
    if sound is None:
        raise MediaError(video_name, "no audio stream and no m4a/wav/flac/aac member")
    return min(info.video.duration, sound.duration)


def _split_audio(wave: np.ndarray, name: str, cfg, starts: list[float],
                 n: int) -> list[np.ndarray]:
    """The decoded span from min(starts) -> [(4, n) float32 per start]."""
    if wave.ndim != 2 or wave.shape[0] != 4 or wave.shape[1] == 0:
        raise MediaError(name, f"expected 4 ambisonic channels, got shape {wave.shape}")
    lo = min(starts)
    wave = _fit(wave, round((max(starts) - lo) * cfg.sample_rate) + n, axis=1, pad_edge=False)
    offsets = [round((s - lo) * cfg.sample_rate) for s in starts]
    return [np.ascontiguousarray(wave[:, i:i + n]) for i in offsets]


def declared_duration(meta: dict) -> float | None:
    """The clip length in seconds the sample's json declares ("duration", or "seconds" as
    synthetic clips write it), or None when it declares none."""
    for key in ("duration", "seconds"):
        value = meta.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value) and value > 0:
            return float(value)
    return None


def sample_duration(raw) -> float:
    """Seconds a sample covers: declared by its json, else from the container headers."""
    declared = declared_duration(_meta(raw))
    return clip_duration(raw) if declared is None else declared


def _decode_windows(raw, cfg, plan, duration: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The plan's video window (T, H, W, 3) uint8 and audio windows [(4, n) float32], from one
    open of the mp4 (two when the audio is a separate member)."""
    win, video_s = plan.windows, cfg.frames / cfg.fps
    size = (cfg.equirect_height, 2 * cfg.equirect_height) if cfg.equirect_height else None
    n = round(cfg.audio_seconds * cfg.sample_rate)
    starts = [win.audio] if win.other is None else [win.audio, win.other]
    lo = min(starts)  # one audio decode spans all windows, clipped to the clip
    src, a_name = _audio_source(raw)
    video = raw.members[VIDEO_MEMBER]
    frames, wave = media.decode_clip(
        video, audio_src=None if src is video else src, fps=cfg.fps, start=win.video,
        duration=min(video_s, duration - win.video), size=size, sample_rate=cfg.sample_rate,
        audio_start=lo, audio_duration=min(max(starts) - lo + n / cfg.sample_rate, duration - lo),
        threads=cfg.decode_threads, name=f"{raw.key}.{VIDEO_MEMBER}")
    frames = _fit(frames, cfg.frames, axis=0, pad_edge=True)  # decode_video returns >= 1 frame
    return frames, _split_audio(wave, a_name, cfg, starts, n)


def _mask_crops(raw, meta: dict, vp: geometry.Viewpoints, size: int, t_centre: float) -> Tensor:
    """(V, S, S) int64 class ids: nearest-neighbour NFOV crop of the label frame nearest
    t_centre (label fps from the json's mask_fps / label_fps / fps, default 1 frame)."""
    name = f"{raw.key}.{MASK_MEMBER}"
    if MASK_MEMBER not in raw.members:
        raise MediaError(name, "masks requested but the sample has no masks member")
    try:
        with np.load(io.BytesIO(raw.members[MASK_MEMBER])) as npz:
            masks = npz["masks"] if "masks" in npz.files else npz[npz.files[0]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise MediaError(name, f"unreadable masks: {exc}") from None
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise MediaError(name, f"expected masks (L, H, W), got {masks.shape}")
    try:
        fps = next((float(meta[f]) for f in ("mask_fps", "label_fps", "fps") if meta.get(f)), 0.0)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int no float holds
        fps = math.nan
    if not math.isfinite(fps):
        raise MediaError(f"{raw.key}.json", "label fps (mask_fps / label_fps / fps) is not a "
                                            "finite number")
    idx = min(max(round(t_centre * fps), 0), masks.shape[0] - 1)
    frame = torch.from_numpy(masks[idx].astype(np.float32))[None, None]
    grid = geometry.nfov_grid(vp, size)
    out = F.grid_sample(frame.expand(len(vp), -1, -1, -1), grid, mode="nearest",
                        padding_mode="border", align_corners=False)
    return out[:, 0].round().long()


@dataclass(frozen=True)
class SamplePlan:
    """Every random choice for one sample; a pure function of (key, cfg, seed, epoch, duration).

    vp: viewpoints in the clip frame; flip mirrors the scene; gain scales the FOA; jitter
    (V, 4) colour factors or None; yaw (radians) turns the sound field before the viewpoint
    rotation (0 when aligned).
    """

    windows: Windows
    vp: geometry.Viewpoints
    flip: bool
    gain: float
    jitter: np.ndarray | None
    aligned: bool
    yaw: float

    @property
    def view_az(self) -> Tensor:
        """(V,) viewpoint azimuths in the (possibly mirrored) scene."""
        return -self.vp.az if self.flip else self.vp.az

    @property
    def directions(self) -> np.ndarray:
        """(V, 2) float32 (az, el) radians of the viewpoints in the (possibly mirrored) scene."""
        return torch.stack((self.view_az, self.vp.el), dim=-1).numpy().astype(np.float32)


def plan_sample(key: str, cfg, *, seed: int, epoch: int, duration: float,
                other_time: bool = False, misalign_prob: float = 0.0) -> SamplePlan:
    """Draw windows, viewpoints and augmentations from sample_rng(seed, epoch, key). The
    viewpoints do not depend on `duration` (the same number of draws precedes them)."""
    rng = sample_rng(seed, epoch, key)
    win = choose_windows(rng, duration, cfg.audio_seconds, cfg.frames / cfg.fps, other_time,
                         name=key)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    vp = geometry.sample_viewpoints(
        gen, cfg.num_viewpoints, el_range_deg=(cfg.el_min_deg, cfg.el_max_deg),
        hfov_deg=(cfg.fov_min_deg, cfg.fov_max_deg), aspect=(cfg.aspect_min, cfg.aspect_max),
        min_separation_deg=cfg.min_separation_deg,
    )
    flip = bool(cfg.augment and rng.random() < cfg.flip_prob)
    gain = float(rng.uniform(1 - cfg.volume_jitter, 1 + cfg.volume_jitter)) if cfg.augment else 1.0
    jitter = crops.jitter_factors(rng, len(vp), cfg.color_jitter) if cfg.augment else None
    aligned = not (misalign_prob > 0 and rng.random() < misalign_prob)
    yaw = 0.0 if aligned else math.radians(float(rng.uniform(60.0, 300.0)))
    return SamplePlan(win, vp, flip, gain, jitter, aligned, yaw)


def view_crops(frames, plan: SamplePlan, size: int) -> Tensor:
    """frames (T, H, W, 3) uint8 -> (V, 3, T, S, S) uint8: the plan's NFOV crops, colour
    jitter and mirroring (avsa.data.crops.view_crops)."""
    return crops.view_crops(frames, plan.vp, size, jitter=plan.jitter, flip=plan.flip)


def view_mix(plan: SamplePlan, mode: str = "foa") -> Tensor:
    """The linear map from the clip's FOA (4, N) to each viewpoint's channels: (V, 4, 4) for
    "foa" (gain, mirror (Y negated) when flipped, then each viewpoint's centre rotated to the
    front) or (V, 1, 4) cardioid beams toward each viewpoint for "mono". The misalignment yaw is
    folded into the rotation: turning the field by yaw and then rotating toward az equals
    rotating toward az - yaw."""
    scene = torch.eye(4) * plan.gain  # the columns are the images of the 4 channels
    scene = geometry.flip_foa(scene) if plan.flip else scene
    if mode == "mono":
        return geometry.beam(scene, plan.view_az - plan.yaw, plan.vp.el)[:, None]
    return geometry.rotate_foa(scene, plan.view_az - plan.yaw, plan.vp.el)


# Six virtual cardioids toward +X, -X, +Y, -Y, +Z, -Z of the rotated field: (6, 4) ambiX
# weights. Unlike the magnitudes of W, Y, Z, X they differ between a source in front and one
# behind (and left / right, up / down), which the paper's log-mel cannot tell apart.
_HALF_PI = math.pi / 2
CARDIOIDS = geometry.beam_weights(torch.tensor([0.0, math.pi, _HALF_PI, -_HALF_PI, 0.0, 0.0]),
                                  torch.tensor([0.0, 0.0, 0.0, 0.0, _HALF_PI, -_HALF_PI]))


def audio_features(foa: Tensor, plan: SamplePlan, cfg) -> np.ndarray:
    """foa (4, N) -> (V, C, F, M) float32 audio input per viewpoint (C = config.audio_channels):
    - audio_mode "mono": log-mel of a cardioid beam toward the viewpoint (C = 1);
    - audio_features "logmel": log-mel of the rotated ambiX W, Y, Z, X (the paper's, C = 4);
    - "cardioid": log-mel of CARDIOIDS of the rotated field (C = 6);
    - "intensity": "logmel" plus the active intensity vector per mel band (C = 7).
    Log-mels are normalised per mel bin over channels and frames together. One STFT of the 4
    FOA channels serves every viewpoint and feature: they are mixed from its complex spectra."""
    kw = dict(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
    spec = audio.stft(foa, cfg.n_fft, cfg.hop)
    mix = view_mix(plan, cfg.audio_mode)  # a validated config has "logmel" with "mono"
    if cfg.audio_features == "cardioid":
        mix = CARDIOIDS @ mix
    if cfg.audio_features == "intensity":
        return audio.log_mel_intensity_mixed(spec, mix, **kw).numpy()
    return audio.log_mel_mixed(foa, mix, hop=cfg.hop, normalize=True, spec=spec, **kw).numpy()


def make_sample(
    raw, cfg, *, seed: int, epoch: int, other_time: bool = False, misalign_prob: float = 0.0,
    with_masks: bool = False,
) -> dict[str, np.ndarray]:
    """RawSample (key, members) -> {"video": (V, 3, T, S, S) uint8, "audio": (V, C, F, M)
    float32, "directions": (V, 2) float32 (az, el radians in the clip frame, mirrored when
    flipped), optional "audio_other", "aligned" () int64, "labels" (K,) float32, "masks"
    (V, S, S) int64}. Raises MediaError naming the member for anything undecodable."""
    if VIDEO_MEMBER not in raw.members:
        raise MediaError(f"{raw.key}.{VIDEO_MEMBER}", "sample has no mp4 member")
    meta = _meta(raw)
    declared = declared_duration(meta)
    duration = clip_duration(raw) if declared is None else declared
    kw = dict(seed=seed, epoch=epoch, other_time=other_time, misalign_prob=misalign_prob)
    plan = plan_sample(raw.key, cfg, duration=duration, **kw)
    try:
        frames, waves = _decode_windows(raw, cfg, plan, duration)
    except MediaError:
        if declared is None:
            raise
        duration = clip_duration(raw)  # the json's length disagrees with the streams
        plan = plan_sample(raw.key, cfg, duration=duration, **kw)
        frames, waves = _decode_windows(raw, cfg, plan, duration)

    out = {"video": view_crops(frames, plan, cfg.crop_size).numpy(), "directions": plan.directions}
    for field, wave in zip(("audio", "audio_other"), waves):
        out[field] = audio_features(torch.from_numpy(wave), plan, cfg)
    if misalign_prob > 0:
        out["aligned"] = np.array(int(plan.aligned), dtype=np.int64)
    hot = labels.label_vector(meta, f"{raw.key}.json")
    if hot is not None:
        out["labels"] = hot
    if with_masks:
        t_centre = plan.windows.video + cfg.frames / cfg.fps / 2
        masks = _mask_crops(raw, meta, plan.vp, cfg.crop_size, t_centre)
        out["masks"] = (geometry.flip_video(masks) if plan.flip else masks).numpy()
    return out


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-sample arrays along a new batch axis (every sample must have the same keys)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = samples[0].keys()
    for s in samples[1:]:
        if s.keys() != keys:
            raise ValueError(f"samples disagree on fields: {sorted(keys)} vs {sorted(s.keys())}")
    return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in keys}
