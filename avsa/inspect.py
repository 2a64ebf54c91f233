"""`avsa inspect`: stream facts of a 360° clip and the direction its sound comes from.

The sound direction is the maximum of the cardioid beam energy over the whole clip. Beam
energy is a quadratic form in the 4x4 second-moment matrix C of the ambiX channels, so the
clip is reduced to C (decoded in chunks) and to a (4, 4) "signal" L with L L^T = C, whose
beams carry the same energies: a 2° energy map, then a 0.1° search around its maximum.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from avsa import geometry, media
from avsa.errors import AvsaError, MediaError

CHUNK_S = 30.0  # seconds of audio decoded at a time
MAP_GRID = (90, 180)  # (n_el, n_az) of the coarse energy map: 2° cells
CROP_HFOV_DEG, CROP_SIZE = 90.0, 256
HEAT_RANGE_DB = 12.0  # the --map colours span this far below the peak


def _moment_signal(path: str, duration: float, sample_rate: int) -> torch.Tensor:
    """(4, 4) float64 L with L L^T = mean over the clip of foa foa^T (ambiX channels)."""
    cov, n = np.zeros((4, 4)), 0
    for start in np.arange(0.0, duration, CHUNK_S):
        span = min(CHUNK_S, duration - start)
        if span * sample_rate < 1:
            continue
        x = media.decode_audio(path, sample_rate=sample_rate, start=start, duration=span)
        x = x.astype(np.float64)
        cov, n = cov + x @ x.T, n + x.shape[1]
    w, v = np.linalg.eigh(cov / max(n, 1))
    return torch.from_numpy(v * np.sqrt(np.clip(w, 0.0, None)))


def _beam_energy(sig: torch.Tensor, az: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
    """Mean-square cardioid energy toward (D,) directions from the moment signal: (D,)."""
    return geometry.beam(sig, az, el).pow(2).mean(-1)  # as geometry.energy_map averages


def peak_direction(sig: torch.Tensor) -> tuple[float, float, float]:
    """(az, el) radians of greatest beam energy and its peak-to-mean ratio in dB: the 2° energy
    map's maximum, refined by Nelder-Mead."""
    from scipy.optimize import minimize

    energy, az_grid, el_grid = geometry.energy_map(sig, n_az=MAP_GRID[1], n_el=MAP_GRID[0])
    i, j = divmod(int(energy.argmax()), energy.shape[1])
    fit = minimize(lambda p: -float(_beam_energy(sig, *torch.tensor(p).to(sig)[:, None])),
                   [float(az_grid[j]), float(el_grid[i])], method="Nelder-Mead",
                   bounds=[(None, None), (-math.pi / 2, math.pi / 2)],
                   options={"xatol": 1e-6, "fatol": 0.0})
    contrast = 10 * math.log10(-fit.fun / max(float(energy.mean()), 1e-20))
    return math.remainder(float(fit.x[0]), 2 * math.pi), float(fit.x[1]), contrast


def inspect_clip(path: str | Path, view: tuple[float, float] | None = None
                 ) -> tuple[dict, torch.Tensor]:
    """Facts of one clip: "video", "audio" (stream info), "equirect", "audio_peak" (az_deg,
    el_deg, peak_to_mean_db) and, for view = (az_deg, el_deg), "view" with the beam energy
    toward it relative to the peak (energy_db <= 0); and the clip's moment signal (for the
    energy map)."""
    path = str(path)
    info = media.probe(path)
    audio = info.audio or media.probe_audio(path)  # raises when there is none
    sig = _moment_signal(path, audio.duration or info.video.duration, audio.sample_rate)
    az, el, contrast = peak_direction(sig)
    report = {
        "path": path, "video": asdict(info.video), "audio": asdict(audio),
        "equirect": info.equirect,
        "audio_peak": {"az_deg": round(math.degrees(az), 2), "el_deg": round(math.degrees(el), 2),
                       "peak_to_mean_db": round(contrast, 2)},
    }
    if view is not None:
        az_el = torch.tensor([[math.radians(view[0]), az], [math.radians(view[1]), el]])
        e_view, e_peak = _beam_energy(sig, *az_el.to(sig)).tolist()
        db = 10 * math.log10(max(e_view, 1e-20) / max(e_peak, 1e-20))
        report["view"] = {"az_deg": view[0], "el_deg": view[1], "energy_db": round(db, 2)}
    return report, sig


def _mid_frame(path: str, duration: float) -> np.ndarray:
    """The equirect frame in the middle of the clip: (1, H, W, 3) uint8."""
    step = 1 / 16
    start = max(0.0, min(duration / 2, duration - step))
    return media.decode_video(path, fps=16, start=start, duration=step)


def _save_png(image: np.ndarray, out: Path) -> None:
    from PIL import Image

    try:
        Image.fromarray(image).save(out, format="PNG")
    except OSError as e:
        raise MediaError(out, f"cannot write PNG ({e.strerror or e})") from e


def write_map(frame: np.ndarray, report: dict, sig: torch.Tensor, out: Path) -> None:
    """The frame (H, W, 3) uint8 with the beam energy map of the moment signal `sig` as heat
    colours and a ring at the report's peak."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    height, width = frame.shape[:2]
    energy, _, _ = geometry.energy_map(sig, n_az=MAP_GRID[1] * 2, n_el=MAP_GRID[0] * 2)
    db = 10 * torch.log10(energy.clamp(min=1e-20) / energy.max()).numpy()
    level = np.clip(1 + db / HEAT_RANGE_DB, 0, 1).astype(np.float32)
    level = np.asarray(Image.fromarray(level).resize((width, height), Image.BILINEAR))
    heat = colormaps["inferno"](level)[..., :3]
    alpha = 0.6 * level[..., None]
    blend = (frame / 255.0) * (1 - alpha) + heat * alpha
    image = Image.fromarray((blend * 255 + 0.5).astype(np.uint8))
    u, v = geometry.direction_to_pixel(math.radians(report["audio_peak"]["az_deg"]),
                                       math.radians(report["audio_peak"]["el_deg"]))
    x, y, r = float(u) * width, float(v) * height, max(6.0, width / 40)
    draw = ImageDraw.Draw(image)
    for dx in (-width, 0, width):  # a ring on the seam shows on both edges
        draw.ellipse((x + dx - r, y - r, x + dx + r, y + r), outline=(0, 255, 255),
                     width=max(1, round(r / 5)))
    _save_png(np.asarray(image), out)


def write_crop(frame: np.ndarray, view: tuple[float, float], out: Path) -> None:
    """A 90° square perspective (NFOV) view of the frame (1, H, W, 3) uint8 toward view
    (degrees)."""
    vp = geometry.Viewpoints(az=torch.tensor([math.radians(view[0])]),
                             el=torch.tensor([math.radians(view[1])]),
                             hfov=torch.tensor([math.radians(CROP_HFOV_DEG)]),
                             aspect=torch.tensor([1.0]))
    crop = geometry.nfov_crop(frame, vp, CROP_SIZE)[0, :, 0]  # (3, S, S)
    _save_png((crop.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), out)


def _view(text: str) -> tuple[float, float]:
    try:
        az, el = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AZ_DEG,EL_DEG, got {text!r}") from None
    if not -90 <= el <= 90:
        raise argparse.ArgumentTypeError(f"elevation must be in [-90, 90], got {el}")
    return az, el


def summary(report: dict) -> str:
    v, a, p = report["video"], report["audio"], report["audio_peak"]
    shape = "2:1 equirect" if report["equirect"] else "NOT 2:1 equirect"
    lines = [
        report["path"],
        f"  video  {v['width']}x{v['height']} {v['codec']}, {v['fps']:g} fps, {v['frames']} "
        f"frames, {v['duration']:.2f} s, {shape}",
        f"  audio  {a['codec']} {a['sample_rate']} Hz, {a['channels']} ch ({a['layout']}), "
        f"{a['duration']:.2f} s",
        f"  sound  loudest from az {p['az_deg']:+.1f}°, el {p['el_deg']:+.1f}° "
        f"(peak/mean {p['peak_to_mean_db']:.1f} dB)",
    ]
    if "view" in report:
        w = report["view"]
        lines.append(f"  view   az {w['az_deg']:+.1f}°, el {w['el_deg']:+.1f}°: "
                     f"{w['energy_db']:.1f} dB from the peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsa inspect", description=__doc__.splitlines()[0])
    parser.add_argument("clip", metavar="CLIP", help="an MP4 (video + 4-channel ambiX audio)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--map", metavar="PNG", type=Path,
                        help="write the mid-clip frame with the sound energy map over it")
    parser.add_argument("--view", metavar="AZ_DEG,EL_DEG", type=_view,
                        help="report the sound energy toward this direction")
    parser.add_argument("--crop", metavar="PNG", type=Path,
                        help="write a 90° view toward --view (default: the sound peak)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--view" in argv[:-1]:  # "--view -90,10": keep argparse from taking -90,10 for an option
        i = argv.index("--view")
        argv[i:i + 2] = [f"--view={argv[i + 1]}"]
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report, sig = inspect_clip(args.clip, args.view)
            if args.map or args.crop:
                frame = _mid_frame(args.clip, report["video"]["duration"])
            if args.map:
                write_map(frame[0], report, sig, args.map)
            if args.crop:
                peak = report["audio_peak"]
                write_crop(frame, args.view or (peak["az_deg"], peak["el_deg"]), args.crop)
        except AvsaError as e:
            print(f"avsa inspect: error: {e}", file=sys.stderr)
            return 2
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"avsa inspect: warning: {message}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0
