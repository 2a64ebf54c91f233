"""Synthetic 360 scenes: determinism, classes, masks where the sources are, sound from there."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avsa import geometry, media, room, synth, synth_cli
from avsa.encode import encode_clip
from avsa.errors import ConfigError
from avsa.synth import SourceSpec

SMALL = {"width": 192, "height": 96}
REPO = Path(__file__).resolve().parents[1]


def mask_centroid(mask: np.ndarray, mask_id: int) -> tuple[float, float]:
    """Area-weighted mean direction (degrees) of the pixels holding mask_id."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask == mask_id)
    az, el = geometry.pixel_to_direction((cols + 0.5) / w, (rows + 0.5) / h)
    vec = geometry.direction_vector(az, el) * torch.cos(el)[:, None]
    c_az, c_el = geometry.vector_to_direction(vec.sum(0))
    return math.degrees(c_az), math.degrees(c_el)


def angle_deg(az1, el1, az2, el2) -> float:
    return math.degrees(float(geometry.angular_distance(*map(math.radians, (az1, el1, az2, el2)))))


def foa_peak(foa: np.ndarray) -> tuple[float, float]:
    energy, az, el = geometry.energy_map(torch.from_numpy(foa), n_az=180, n_el=90)
    i, j = divmod(int(energy.argmax()), energy.shape[1])
    return math.degrees(az[j]), math.degrees(el[i])


def test_classes_are_many_and_distinct():
    assert len(synth.CLASSES) >= 8 and len(set(synth.CLASSES)) == len(synth.CLASSES)
    specs = synth.SOURCE_CLASSES
    assert len({c.color for c in specs}) == len({c.f0_hz for c in specs}) == len(specs)
    scenes = [synth.make_scene(0, 0.25, sources=[SourceSpec(c, 0, 0)]) for c in synth.CLASSES]
    masks = [s.masks[0] > 0 for s in scenes]
    for a in range(len(masks)):
        for b in range(a):  # every pair of shapes differs in at least a tenth of its area
            inter, union = (masks[a] & masks[b]).sum(), (masks[a] | masks[b]).sum()
            assert inter / union < 0.9, (synth.CLASSES[a], synth.CLASSES[b])
    assert scenes[0].video.shape == (4, 192, 384, 3)  # the defaults: 384x192 at 16 fps


def test_bad_scene_arguments():
    with pytest.raises(ConfigError, match="unknown class 'kazoo'"):
        synth.make_scene(0, 0.25, sources=[SourceSpec("kazoo", 0, 0)])
    with pytest.raises(ConfigError, match=r"num_sources: must be in \[1, 8\], got 9"):
        synth.make_scene(0, 0.25, num_sources=9)
    for k in (0, 9):
        with pytest.raises(ConfigError, match=rf"classes_per_clip: must be in \[1, 8\], got {k}"):
            synth.make_scene(0, 0.25, classes_per_clip=k)


def test_same_seed_same_bytes_other_seed_differs():
    a, b = synth.make_scene(11, 1.0, **SMALL), synth.make_scene(11, 1.0, **SMALL)
    for x, y in ((a.video, b.video), (a.foa, b.foa), (a.masks, b.masks)):
        assert x.tobytes() == y.tobytes()
    assert a.meta == b.meta
    c = synth.make_scene(12, 1.0, **SMALL)
    assert c.video.tobytes() != a.video.tobytes() and c.foa.tobytes() != a.foa.tobytes()


def test_shapes_units_and_placement():
    scene = synth.make_scene(3, 2.0, num_sources=3, **SMALL)
    assert scene.video.shape == (32, 96, 192, 3) and scene.video.dtype == np.uint8
    assert scene.foa.shape == (4, 48000) and scene.foa.dtype == np.float32
    assert np.abs(scene.foa).max() == pytest.approx(synth.PEAK, rel=1e-5)
    assert scene.masks.shape == (2 * synth.LABEL_FPS, 96, 192) and scene.masks.dtype == np.uint8
    srcs = scene.meta["sources"]
    assert len(srcs) == 3 and len(set(scene.meta["classes"])) == 3
    for s in srcs:
        assert abs(s["el_deg"][0]) <= 30 and 1 <= abs(s["drift_deg_s"]) <= 4
    for i in range(3):
        for j in range(i):
            a, b = srcs[i], srcs[j]
            assert angle_deg(a["az_deg"][0], a["el_deg"][0], b["az_deg"][0], b["el_deg"][0]) >= 45
    counts = [len(synth.make_scene(seed, 0.25, **SMALL).meta["sources"]) for seed in range(20)]
    assert min(counts) >= synth.SOURCES_RANGE[0] and max(counts) <= synth.SOURCES_RANGE[1]
    for k in (1, 2, 3):  # k = 1: a single-label clip
        for seed in range(5):
            meta = synth.make_scene(seed, 0.25, classes_per_clip=k, **SMALL).meta
            assert len(meta["sources"]) >= 4 and len(meta["classes"]) == k
            assert {s["class"] for s in meta["sources"]} == set(meta["classes"])


def test_dense_scenes_fill_most_sampled_crops():
    """The default viewpoint sampler sees a source in at least 70% of its crops (>= 2% of the
    crop's pixels): an AVSA learner is not capped by empty views."""
    from avsa import coverage

    masks = [synth.make_scene(synth.clip_seed(0, i), 0.5, **SMALL).masks for i in range(12)]
    stats = coverage.coverage_stats(masks, draws=8)
    assert stats["crops"] == 12 * 8 * 4
    assert stats["share_with_source"] >= 0.7, stats
    empty = np.zeros((1, 96, 192), np.uint8)
    assert coverage.coverage_stats([empty], draws=2)["share_with_source"] == 0.0


def test_no_two_classes_share_a_partial():
    """Even with the per-clip detune (+-1%) pulling two classes together, every partial of one
    class stays more than 2% from every partial of another."""
    classes = synth.SOURCE_CLASSES
    for a in range(len(classes)):
        for b in range(a):
            for da, db in ((1.01, 0.99), (0.99, 1.01)):
                for p in synth.partials(classes[a], da):
                    for q in synth.partials(classes[b], db):
                        assert abs(p - q) / min(p, q) > 0.02, (classes[a].name, classes[b].name)


def test_sources_sound_as_events_and_look_it():
    """A random source is silent between its on-intervals and drawn dim and grey there."""
    scene = synth.make_scene(8, 4.0, num_sources=1, **SMALL)
    src = scene.meta["sources"][0]
    spans = np.array(src["on"])
    assert len(spans) >= 2 and np.all(np.diff(spans, axis=1) > 0.5)
    t = np.arange(scene.foa.shape[1]) / 24000
    on = synth.gate(spans, t) > 0.99
    off = synth.gate(spans, t) < 0.01
    assert on.mean() > 0.3 and off.mean() > 0.1
    w = scene.foa[0]
    assert np.sqrt((w[off] ** 2).mean()) < 0.2 * np.sqrt((w[on] ** 2).mean())
    frames = np.arange(len(scene.video)) / 16
    bright = [scene.video[k][scene.masks[min(int(tk * 4), len(scene.masks) - 1)] > 0].mean()
              for k, tk in enumerate(frames)]
    lit = synth.gate(spans, frames)
    assert np.corrcoef(bright, lit)[0, 1] > 0.7


def test_diffuse_noise_is_decorrelated_on_all_four_channels():
    noise = room.diffuse_noise(np.random.default_rng(0), 200_000, std=1.0)
    cov = np.cov(noise)
    assert np.allclose(np.diag(cov), [1, 1 / 3, 1 / 3, 1 / 3], rtol=0.02)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 0.01


def test_room_adds_a_reverberant_tail_with_the_asked_decay():
    from avsa import room

    tails = room.bformat_tails([(0.0, 0.0)], 0.4, 24000, np.random.default_rng(0))
    w = tails[0, 0]
    assert tails.shape == (1, 4, int(1.2 * 0.4 * 24000) + 1)
    edc = np.cumsum(w[::-1] ** 2)[::-1]
    db = 10 * np.log10(edc / edc[0] + 1e-12)
    t20 = (np.argmax(db < -25) - np.argmax(db < -5)) / 24000 * 3  # Schroeder, T20 -> RT60
    assert 0.3 < t20 < 0.65
    assert (tails[0] ** 2).sum(axis=1)[1:].sum() > 0.3 * (w**2).sum()  # reflections have direction
    dry = synth.make_scene(4, 1.0, num_sources=2, **SMALL)
    wet = synth.make_scene(4, 1.0, num_sources=2, rt60_s=0.4, **SMALL)
    assert wet.meta["rt60_s"] == 0.4 and wet.video.tobytes() == dry.video.tobytes()
    assert not np.allclose(wet.foa, dry.foa)
    with pytest.raises(ConfigError, match="rt60_s"):
        synth.make_scene(4, 1.0, rt60_s=-1.0, **SMALL)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_masks_sit_on_the_sources(seed):
    scene = synth.make_scene(seed, 2.0, **SMALL)
    present = set(np.unique(scene.masks)) - {0}
    assert present == {s["mask_id"] for s in scene.meta["sources"]}
    for s in scene.meta["sources"]:
        assert s["mask_id"] == synth.CLASSES.index(s["class"]) + 1
        for k in (0, len(s["az_deg"]) - 1):
            az, el = mask_centroid(scene.masks[k], s["mask_id"])
            assert angle_deg(az, el, s["az_deg"][k], s["el_deg"][k]) < 2.5


def test_polar_and_seam_sources_stay_compact():
    """A patch on the ±180° seam wraps to both image edges; near the pole it spans all
    columns; in both the centroid is the source direction."""
    for az, el in ((180.0, 10.0), (-179.0, -20.0), (45.0, 80.0)):
        scene = synth.make_scene(0, 0.25, sources=[SourceSpec("disc", az, el)], **SMALL)
        got = mask_centroid(scene.masks[0], 1)
        assert angle_deg(*got, az, el) < 1.5
        area = (scene.masks[0] == 1).sum()
        assert area > 0
    seam = synth.make_scene(0, 0.25, sources=[SourceSpec("disc", 180.0, 0.0)], **SMALL).masks[0]
    assert seam[:, 0].any() and seam[:, -1].any() and not seam[:, 96].any()


def test_sound_is_the_class_tone():
    scene = synth.make_scene(5, 2.0, sources=[SourceSpec("ring", 30, 10)], **SMALL)
    f0 = scene.meta["sources"][0]["f0_hz"]
    w = scene.foa[0]
    power = np.abs(np.fft.rfft(w)) ** 2
    hz = np.fft.rfftfreq(w.size, 1 / 24000)
    harmonics = [h + 1 for h, a in enumerate(synth.SOURCE_CLASSES[3].harmonics) if a]
    near = np.zeros_like(hz, dtype=bool)
    for h in harmonics:
        near |= np.abs(hz - h * f0) < 8  # AM sidebands at +-2.5 Hz
    assert power[near].sum() / power.sum() > 0.95


def test_visual_pulse_in_step_with_sound():
    scene = synth.make_scene(6, 4.0, sources=[SourceSpec("disc", -60, 0)], **SMALL)
    area = (scene.masks == 1).sum(axis=(1, 2)).astype(float)
    w = scene.foa[0]
    centres = (np.arange(len(area)) / synth.LABEL_FPS * 24000).astype(int)
    rms = [np.sqrt((w[max(c - 240, 0):c + 240] ** 2).mean()) for c in centres]
    assert np.corrcoef(area, rms)[0, 1] > 0.8


def test_foa_peak_survives_aac_round_trip(tmp_path):
    scene = synth.make_scene(21, 2.0, num_sources=1, **SMALL)
    path = tmp_path / "one.mp4"
    encode_clip(path, scene.video, 16, scene.foa, 24000)
    foa = media.decode_audio(path, sample_rate=24000)
    src = scene.meta["sources"][0]
    mid = len(src["az_deg"]) // 2
    assert angle_deg(*foa_peak(foa), src["az_deg"][mid], src["el_deg"][mid]) < 5


def test_write_dataset_writes_and_skips(tmp_path):
    paths = synth.write_dataset(tmp_path, 2, 1.0, seed=4, progress=False, **SMALL)
    assert [p.name for p in paths] == ["clip-000000.mp4", "clip-000001.mp4"]
    meta = json.loads((tmp_path / "clip-000001.json").read_text())
    assert meta["seed"] == synth.clip_seed(4, 1) and meta["label_fps"] == synth.LABEL_FPS
    with np.load(tmp_path / "clip-000001.masks.npz") as npz:
        assert npz["masks"].shape == (4, 96, 192)
    info = media.probe(paths[1])
    assert (info.video.width, info.video.frames, info.audio.channels) == (192, 16, 4)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "clip-000000.json").unlink()  # an interrupted clip: redone, the other kept
    synth.write_dataset(tmp_path, 2, 1.0, seed=4, progress=False, **SMALL)
    assert (tmp_path / "clip-000001.mp4").stat().st_mtime_ns == stamps[paths[1]]
    assert (tmp_path / "clip-000000.json").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_a_rerun_with_other_settings_is_refused_not_mixed_in(tmp_path, capsys):
    synth.write_dataset(tmp_path, 1, 1.0, seed=4, progress=False, **SMALL)
    stamp = (tmp_path / "clip-000000.mp4").stat().st_mtime_ns
    for change, said in (({"seconds": 0.5}, "seconds=1.0 (not 0.5)"),
                         ({"seed": 5}, f"seed={synth.clip_seed(4, 0)} (not"),
                         ({"rt60_s": 0.3}, "rt60_s=0.0 (not 0.3)"),
                         ({"num_sources": 2}, "num_sources=None (not 2)")):
        args = {"seconds": 1.0, "seed": 4, **SMALL, **change}
        with pytest.raises(ConfigError, match=re.escape(said)) as e:
            synth.write_dataset(tmp_path, 2, args.pop("seconds"), args.pop("seed"),
                                progress=False, **args)
        assert "clip-000000.json" in str(e.value) and "another folder" in str(e.value)
    assert not (tmp_path / "clip-000001.json").exists()  # refused before any clip is written
    # A clip written before the JSON named num_sources and classes_per_clip is still kept.
    meta = json.loads((tmp_path / "clip-000000.json").read_text())
    del meta["num_sources"], meta["classes_per_clip"]
    (tmp_path / "clip-000000.json").write_text(json.dumps(meta))
    synth.write_dataset(tmp_path, 2, 1.0, seed=4, progress=False, **SMALL)
    assert (tmp_path / "clip-000000.mp4").stat().st_mtime_ns == stamp
    assert (tmp_path / "clip-000001.json").is_file()
    argv = [str(tmp_path), "--clips", "2", "--seconds", "2", "--seed", "4", "--width",
            str(SMALL["width"]), "--height", str(SMALL["height"])]
    assert synth_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seconds=1.0 (not 2.0)" in err[0], err
    for text in ("[1, 2]", "{cut"):  # a JSON this module did not write: the clip is made again
        (tmp_path / "clip-000000.json").write_text(text)
        synth.write_dataset(tmp_path, 1, 1.0, seed=4, progress=False, **SMALL)
        assert json.loads((tmp_path / "clip-000000.json").read_text())["key"] == "clip-000000"


def test_cli_with_workers_matches_in_process(tmp_path, capsys):
    rc = synth_cli.main([str(tmp_path / "a"), "--clips", "2", "--seconds", "0.5", "--seed", "9",
                     "--workers", "2", "--width", "128", "--height", "64"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "2 written" in out[0]
    synth.write_dataset(tmp_path / "b", 2, 0.5, seed=9, progress=False, width=128, height=64)
    a, b = (tmp_path / d for d in "ab")
    name = "clip-000001"
    assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text())
    with np.load(a / f"{name}.masks.npz") as x, np.load(b / f"{name}.masks.npz") as y:
        np.testing.assert_array_equal(x["masks"], y["masks"])
    assert synth_cli.main([str(tmp_path / "a"), "--clips", "2", "--seconds", "0.5", "--seed", "9",
                       "--width", "128", "--height", "64"]) == 0
    assert "0 written, 2 already there" in capsys.readouterr().out
    assert synth_cli.main([str(tmp_path / "a"), "--clips", "2", "--seconds", "0.5", "--seed", "9",
                       "--width", "128", "--height", "64", "--stats"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["name"] == "synth_coverage" and stats["crops"] == 2 * 8 * 4


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as under a terminal, whatever ran the tests


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stopped_synth_with_workers_leaves_whole_clips_only(tmp_path, sig, to_group):
    """`kill` (SIGTERM to the command), or Ctrl-C (SIGINT to its process group), while the
    pool's processes write clips: the command ends them and says so in one line, each removes
    the temporary files of the clip it was writing (they stayed as hidden `.clip-*` files, and
    Ctrl-C printed a traceback per process), and a re-run completes the clips cut short."""
    out = tmp_path / "clips"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "avsa.cli", "synth", str(out), "--clips", "40", "--seconds",
           "2", "--workers", "2", "--width", "256"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in out.glob(".clip-*")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    (os.killpg if to_group else os.kill)(proc.pid, sig)  # a clip's MP4 is being encoded
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert err.strip().splitlines()[-1] == f"avsa synth: stopped by {sig.name}", err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    started = {int(p.name[5:11]) for p in out.glob("clip-*")}
    assert len(started) < 40
    upto = str(max(started, default=-1) + 2)  # the clips begun, and the next one
    rerun = subprocess.run([*cmd[:6], upto, *cmd[7:]], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # a finished pool's processes end on their own (its exit SIGTERMed them: a traceback each)
    assert "Traceback" not in rerun.stderr, rerun.stderr[-2000:]
    assert all(synth.is_complete(out, f"clip-{i:06d}") for i in range(int(upto)))


@pytest.mark.parametrize("size, says", [
    (["--width", "256", "--height", "100"], "--width 256 --height 100: an equirectangular frame is 2:1"),
    (["--width", "130"], "--width 130 --height 65: the height must be even and >= 8"),
    (["--height", "0"], "--width 0 --height 0: the height must be even"),
])
def test_cli_frame_sizes_are_2_to_1_and_even(tmp_path, capsys, size, says):
    """One side given, the other follows (2:1); both given, they must agree; odd or empty
    frames are refused before any clip (they wrote 100x192 'equirect' clips, or a traceback)."""
    with pytest.raises(SystemExit) as e:
        synth_cli.main([str(tmp_path / "bad"), "--clips", "1", *size])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert synth_cli.main([str(tmp_path / "ok"), "--clips", "1", "--seconds", "0.5",
                           "--width", "64"]) == 0
    meta = json.loads((tmp_path / "ok" / "clip-000000.json").read_text())
    assert (meta["width"], meta["height"]) == (64, 32)


def test_read_format_follows_the_config_and_keeps_own_size_without_one():
    from avsa.config import compose

    assert synth.read_format(compose(["data=synthetic_small"]).data) == {
        "fps": 8.0, "height": 128, "width": 256}
    own = synth.read_format(compose(["data=synthetic_small", "data.equirect_height=0",
                                     "data.fps=12"]).data)
    assert own == {"fps": 12.0}  # write_dataset's own width and height
