"""`avsa inspect`: stream facts, the sound direction of one-source clips, images, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from avsa import geometry, inspect, synth
from avsa.encode import encode_clip
from avsa.synth import SourceSpec

SIZE = {"width": 128, "height": 64}


def one_source_clip(path, az_deg, el_deg, cls="disc", seconds=1.0):
    scene = synth.make_scene(7, seconds, sources=[SourceSpec(cls, az_deg, el_deg)], **SIZE)
    encode_clip(path, scene.video, 16, scene.foa, 24000)
    return scene


def run(argv, capsys) -> tuple[int, str, str]:
    rc = inspect.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("az, el", [(0, 0), (179, 10), (-178, -25), (90, 25), (-120, -25),
                                    (45, 25)])
def test_json_reports_the_source_direction(tmp_path, capsys, az, el):
    path = tmp_path / "one.mp4"
    one_source_clip(path, az, el)
    rc, out, err = run([path, "--json"], capsys)
    assert rc == 0 and err == ""
    report = json.loads(out)
    peak = report["audio_peak"]
    got = geometry.angular_distance(*(math.radians(x) for x in
                                      (peak["az_deg"], peak["el_deg"], az, el)))
    assert math.degrees(float(got)) < 2  # measured: 0.01-0.15°
    assert -180 < peak["az_deg"] <= 180 and peak["peak_to_mean_db"] > 3
    assert report["video"] == {"width": 128, "height": 64, "fps": 16.0, "frames": 16,
                               "duration": 1.0, "codec": "h264"}
    assert (report["audio"]["channels"], report["audio"]["sample_rate"]) == (4, 24000)
    assert report["equirect"] is True


def test_peak_to_mean_is_the_refined_peak_over_the_maps_mean(tmp_path):
    """Both terms on one scale: the Nelder-Mead peak sits just above the 2-degree map's
    maximum, so the ratio exceeds the map's own max/mean by a hair, not by 6 dB (the peak
    was a sum over the moment signal's 4 columns, the map a mean)."""
    path = tmp_path / "one.mp4"
    one_source_clip(path, 30, 10)
    report, sig = inspect.inspect_clip(path)
    energy = geometry.energy_map(sig, n_az=inspect.MAP_GRID[1], n_el=inspect.MAP_GRID[0])[0]
    on_map = 10 * math.log10(float(energy.max() / energy.mean()))
    assert 0 <= report["audio_peak"]["peak_to_mean_db"] - on_map < 0.05


def test_view_energy_and_summary(tmp_path, capsys):
    path = tmp_path / "one.mp4"
    one_source_clip(path, 60, 0)
    toward = inspect.inspect_clip(path, view=(60.0, 0.0))[0]["view"]["energy_db"]
    away = inspect.inspect_clip(path, view=(-120.0, 0.0))[0]["view"]["energy_db"]
    assert -1 < toward <= 0 and away < -12
    rc, out, _ = run([path, "--view", "-120,0"], capsys)
    assert rc == 0
    assert "az +60.0°" in out and "el +0.0°" in out and "4 ch" in out and "view" in out


def test_map_and_crop_write_pngs(tmp_path, capsys):
    path = tmp_path / "one.mp4"
    scene = one_source_clip(path, -90, 10, cls="disc")
    rc, _, _ = run([path, "--map", tmp_path / "map.png", "--view", "-90,10",
                    "--crop", tmp_path / "crop.png"], capsys)
    assert rc == 0
    heat = np.asarray(Image.open(tmp_path / "map.png").convert("RGB"), dtype=float)
    assert heat.shape == (64, 128, 3)
    # the overlay changes the frame most around the sound (az -90: u = 0.75), least opposite
    diff = np.abs(heat - scene.video[8]).mean(axis=(0, 2))
    assert diff[88:104].mean() > 3 * diff[24:40].mean()
    crop = np.asarray(Image.open(tmp_path / "crop.png").convert("RGB"), dtype=float)
    assert crop.shape == (256, 256, 3)
    r, g, b = crop[120:136, 120:136].reshape(-1, 3).mean(0)  # the red disc fills the centre
    assert r > 120 and r > 2 * g and r > 2 * b
    r, g, b = crop[:16, :16].reshape(-1, 3).mean(0)  # background at the corner
    assert r < 2 * g


def test_crop_defaults_to_the_sound_peak(tmp_path, capsys):
    path = tmp_path / "one.mp4"
    one_source_clip(path, 150, -20, cls="disc")
    assert run([path, "--crop", tmp_path / "crop.png"], capsys)[0] == 0
    r, g, _ = np.asarray(Image.open(tmp_path / "crop.png"), dtype=float)[120:136, 120:136,
                                                                        :3].reshape(-1, 3).mean(0)
    assert r > 2 * g


def write_garbage(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"not a video" * 100)
    return path


def write_stereo(tmp_path):
    import av

    path = tmp_path / "stereo.mp4"
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=24000, layout="stereo")
        v = c.add_stream("libx264", rate=16)
        v.width, v.height, v.pix_fmt = 64, 32, "yuv420p"
        for i in range(8):
            f = av.VideoFrame.from_ndarray(np.zeros((32, 64, 3), np.uint8), format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        c.mux(v.encode(None))
        f = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp",
                                       layout="stereo")
        f.sample_rate, f.pts = 24000, 0
        c.mux(a.encode(f))
        c.mux(a.encode(None))
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "missing.mp4", "missing.mp4: file not found"),
    (lambda d: d, ": a folder, not a clip"),
    (write_garbage, "junk.mp4: not a media file"),
    (write_stereo, "stereo.mp4: expected 4-channel first-order ambisonics (ambiX), found 2"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, reason):
    rc, out, err = run([make(tmp_path), "--json"], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avsa inspect: error: ")
    assert reason in lines[0]


def test_unwritable_png_is_an_error(tmp_path, capsys):
    path = tmp_path / "one.mp4"
    one_source_clip(path, 0, 0)
    rc, _, err = run([path, "--map", tmp_path / "no" / "such" / "dir.png"], capsys)
    assert rc == 2 and "dir.png: cannot write PNG" in err


def test_non_equirect_is_a_one_line_warning(tmp_path, capsys):
    path = tmp_path / "tv.mp4"
    scene = synth.make_scene(1, 1.0, num_sources=1, **SIZE)
    encode_clip(path, scene.video[:, :, :96], 16, scene.foa, 24000)
    rc, out, err = run([path, "--json"], capsys)
    assert rc == 0 and json.loads(out)["equirect"] is False
    assert err.strip().splitlines() == [f"avsa inspect: warning: {path}: video is 96x64, not 2:1 "
                                        "equirectangular"]
