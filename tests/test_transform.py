"""avsa.data.transform: one shard sample -> arrays, checked against known geometry."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import log_mel, normalize_log_mel

from avsa import audio, geometry, media, synth
from avsa.config import DataConfig
from avsa.data import transform
from avsa.data.shards import RawSample
from avsa.encode import encode_clip
from avsa.errors import MediaError

SECONDS = 2.0


def small_cfg(**kw) -> DataConfig:
    base = dict(num_viewpoints=2, frames=4, crop_size=32, n_mels=64, augment=False)
    return DataConfig(**{**base, **kw})


def scene_sample(tmp_path, key: str, sources, *, seconds: float = SECONDS, seed: int = 0,
                 width: int = 128, height: int = 64) -> RawSample:
    """A synthetic clip with explicit sources, packed as shard members."""
    scene = synth.make_scene(seed, seconds, width=width, height=height, fps=16,
                             sources=[synth.SourceSpec(c, az, el) for c, az, el in sources])
    path = tmp_path / f"{key}.mp4"
    encode_clip(path, scene.video, 16, scene.foa, 24000)
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=scene.masks)
    return RawSample(key, {"mp4": path.read_bytes(), "json": json.dumps(scene.meta).encode(),
                           "masks.npz": buf.getvalue()})


def plan_for(key, cfg, **kw) -> transform.SamplePlan:
    return transform.plan_sample(key, cfg, seed=kw.pop("seed", 0), duration=SECONDS, **kw)


def find_epoch(key, cfg, accept, **kw) -> tuple[int, transform.SamplePlan]:
    """First epoch whose plan satisfies accept(plan); planning decodes nothing."""
    for epoch in range(500):
        plan = plan_for(key, cfg, epoch=epoch, **kw)
        if accept(plan):
            return epoch, plan
    raise AssertionError("no epoch satisfies the condition")


def _angle(plan, i, j) -> float:
    vp = plan.vp
    return math.degrees(float(geometry.angular_distance(vp.az[i], vp.el[i], vp.az[j], vp.el[j])))


def _deg(plan, i):
    return math.degrees(float(plan.vp.az[i])), math.degrees(float(plan.vp.el[i]))


def _perpendicular_pair(plan) -> bool:
    return 80 <= _angle(plan, 0, 1) <= 100


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    return scene_sample(tmp_path_factory.mktemp("clip"), "generic",
                        [("disc", 40.0, 10.0), ("star", -120.0, -5.0)])


@pytest.mark.parametrize("views", [2, 4])
def test_shapes_and_dtypes(generic, views):
    cfg = small_cfg(num_viewpoints=views, augment=True)
    out = transform.make_sample(generic, cfg, seed=1, epoch=0, other_time=True,
                                misalign_prob=0.5, with_masks=True)
    k = len(synth.CLASSES)
    expected = {
        "video": ((views, 3, 4, 32, 32), np.uint8),
        "audio": ((views, 4, 100, 64), np.float32),
        "audio_other": ((views, 4, 100, 64), np.float32),
        "directions": ((views, 2), np.float32),
        "aligned": ((), np.int64),
        "labels": ((k,), np.float32),
        "masks": ((views, 32, 32), np.int64),
    }
    assert {f: (v.shape, v.dtype) for f, v in out.items()} == expected
    labels = np.zeros(k, np.float32)
    labels[[synth.CLASSES.index("disc"), synth.CLASSES.index("star")]] = 1
    np.testing.assert_array_equal(out["labels"], labels)
    assert np.isfinite(out["audio"]).all()
    assert not np.array_equal(out["audio"], out["audio_other"])


def test_mono_mode_gives_one_channel(generic):
    out = transform.make_sample(generic, small_cfg(audio_mode="mono"), seed=0, epoch=0)
    assert out["audio"].shape == (2, 1, 100, 64)


def test_reproducible_per_epoch_and_different_across_epochs(generic):
    cfg = small_cfg(augment=True)
    a = transform.make_sample(generic, cfg, seed=3, epoch=5)
    b = transform.make_sample(generic, cfg, seed=3, epoch=5)
    assert a.keys() == b.keys()
    for field in a:
        np.testing.assert_array_equal(a[field], b[field])
    c = transform.make_sample(generic, cfg, seed=3, epoch=6)
    d = transform.make_sample(generic, cfg, seed=4, epoch=5)
    assert not np.allclose(a["directions"], c["directions"])
    assert not np.allclose(a["directions"], d["directions"])


def test_directions_respect_ranges_and_separation(generic):
    cfg = small_cfg(num_viewpoints=4, el_min_deg=-20.0, el_max_deg=15.0, min_separation_deg=50.0)
    for epoch in range(4):
        d = transform.make_sample(generic, cfg, seed=0, epoch=epoch)["directions"]
        assert (np.abs(d[:, 0]) <= math.pi).all()
        assert (d[:, 1] >= math.radians(-20.0) - 1e-6).all()
        assert (d[:, 1] <= math.radians(15.0) + 1e-6).all()
        dist = geometry.angular_distance(torch.tensor(d[:, None, 0]), torch.tensor(d[:, None, 1]),
                                         torch.tensor(d[None, :, 0]), torch.tensor(d[None, :, 1]))
        off_diag = dist[~torch.eye(4, dtype=torch.bool)]
        assert off_diag.min() >= math.radians(50.0) - 1e-5


def _x_minus_w(audio: np.ndarray, bins: int = 12) -> np.ndarray:
    """Per view: mean normalised log-mel of X (ambiX index 3) minus that of W over the lowest
    mel bins, where the source's harmonics dominate (synth adds faint noise to W only)."""
    return (audio[:, 3, :, :bins] - audio[:, 0, :, :bins]).mean(axis=(1, 2))


def test_view_at_source_sees_it_and_hears_it_in_front(tmp_path):
    cfg = small_cfg()
    epoch, plan = find_epoch("at", cfg, _perpendicular_pair)
    az, el = _deg(plan, 0)
    raw = scene_sample(tmp_path, "at", [("disc", az, el)])
    out = transform.make_sample(raw, cfg, seed=0, epoch=epoch, with_masks=True)
    np.testing.assert_allclose(out["directions"], plan.directions, atol=1e-6)
    disc = synth.CLASSES.index("disc") + 1
    # the crop of view 0 is centred on the object, view 1 (90 deg away) does not see it
    assert out["masks"][0, 14:18, 14:18].tolist() == [[disc] * 4] * 4
    assert (out["masks"][1] == 0).all()
    assert out["video"][0].astype(int).std() > 0
    # rotated toward the source, X carries what W carries; 90 deg away, X is near silent
    xw = _x_minus_w(out["audio"])
    assert abs(xw[0]) < 0.15
    assert xw[1] < xw[0] - 1.0


def test_flip_mirrors_crops_audio_and_directions(tmp_path):
    base = small_cfg(augment=True, volume_jitter=0.0, color_jitter=[0.0, 0.0, 0.0, 0.0])
    epoch, plan = find_epoch("flip", base, lambda p: True)
    az, el = _deg(plan, 0)
    raw = scene_sample(tmp_path, "flip", [("disc", az + 12.0, el)])  # left of view 0's centre
    plain = transform.make_sample(raw, replace(base, flip_prob=0.0), seed=0, epoch=epoch,
                                  with_masks=True)
    flipped = transform.make_sample(raw, replace(base, flip_prob=1.0), seed=0, epoch=epoch,
                                    with_masks=True)
    np.testing.assert_allclose(flipped["directions"][:, 0], -plain["directions"][:, 0], atol=1e-6)
    np.testing.assert_allclose(flipped["directions"][:, 1], plain["directions"][:, 1], atol=1e-6)
    np.testing.assert_array_equal(flipped["video"], plain["video"][..., ::-1])
    np.testing.assert_array_equal(flipped["masks"], plain["masks"][..., ::-1])
    cols = np.nonzero(plain["masks"][0])[1]
    assert cols.size and cols.mean() < 16 - 2  # object left of centre before the flip
    # magnitudes are mirror-invariant; the sign of Y (left) follows the mirrored crop
    np.testing.assert_allclose(flipped["audio"], plain["audio"], atol=1e-3)
    foa = torch.from_numpy(media.decode_audio(raw.members["mp4"], start=plan.windows.audio,
                                              duration=1.0))
    for flip, sign in ((False, 1), (True, -1)):
        view = (transform.view_mix(replace(plan, flip=flip, gain=1.0)) @ foa)[0]
        corr = float((view[1] * view[0]).sum() / (view[0].norm() * view[1].norm()))
        assert sign * corr > 0.9


def test_misalignment_labels_and_rotates_the_field(tmp_path):
    cfg = small_cfg()
    plans = [plan_for("mis", cfg, epoch=e, misalign_prob=0.5) for e in range(40)]
    assert {p.aligned for p in plans} == {True, False}
    for p in plans:
        assert p.aligned == (p.yaw == 0.0)
        assert p.aligned or math.radians(60) <= p.yaw <= math.radians(300)
    # a plane wave from view 0's centre: X / W = cos(angle to the front) is 1 only when aligned
    noise = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    for p in plans[:12]:
        view = (transform.view_mix(p) @ geometry.encode_foa(noise, p.vp.az[0], p.vp.el[0]))[0]
        cos = float((view[3] * view[0]).sum() / view[0].square().sum())
        assert cos > 0.999 if p.aligned else cos < 0.7
    epoch = next(e for e, p in enumerate(plans) if not p.aligned)
    raw = scene_sample(tmp_path, "mis", [("ring", 0.0, 0.0)])
    out = transform.make_sample(raw, cfg, seed=0, epoch=epoch, misalign_prob=0.5)
    assert out["aligned"].item() == 0


@pytest.mark.parametrize("duration", [2.0, 2.3, 5.0])
def test_avts_negative_never_overlaps_the_positive(duration):
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(300):
        w = transform.choose_windows(rng, duration, 1.0, 0.5, other_time=True)
        assert 0 <= w.audio <= duration - 1.0 + 1e-9 and 0 <= w.other <= duration - 1.0 + 1e-9
        assert abs(w.other - w.audio) >= 1.0 - 1e-9  # [a, a + 1) and [o, o + 1) are disjoint
        assert w.audio <= w.video <= w.audio + 0.5 + 1e-9
        starts.append(w.audio)
    if duration >= 3.0:  # long clips: positives spread over the whole clip
        assert min(starts) < 0.5 and max(starts) > duration - 1.5


def test_avts_pair_of_starts_is_uniform_over_disjoint_pairs():
    """4 s clips, 1 s windows: starts (a, o) in [0, 3]^2 with |a - o| >= 1, two triangles of
    area 2. Uniform on them: P(a in [0,1), [1,2), [2,3]) = 3/8, 1/4, 3/8 (the length of o's
    room at a), P(|a - o| >= 2) = 1/4, and either window is first as often."""
    rng = np.random.default_rng(0)
    pairs = np.array([(w.audio, w.other) for w in (
        transform.choose_windows(rng, 4.0, 1.0, 0.5, other_time=True) for _ in range(20000))])
    a, o = pairs.T
    thirds = np.histogram(a, bins=3, range=(0, 3))[0] / len(a)
    np.testing.assert_allclose(thirds, [3 / 8, 1 / 4, 3 / 8], atol=0.015)
    assert abs(np.mean(np.abs(a - o) >= 2) - 1 / 4) < 0.015
    assert abs(np.mean(a < o) - 1 / 2) < 0.015


def test_avts_refuses_a_clip_too_short_for_a_disjoint_negative():
    with pytest.raises(MediaError, match=r"clip-7.*at least 2 x data.audio_seconds = 2 s.*1.6 s"):
        transform.choose_windows(np.random.default_rng(0), 1.6, 1.0, 0.5, other_time=True,
                                 name="clip-7")
    w = transform.choose_windows(np.random.default_rng(0), 1.6, 1.0, 0.5)  # AVC: fine
    assert w.other is None


def test_sidecar_audio_member_is_used(tmp_path, generic):
    cfg = small_cfg()
    epoch, plan = find_epoch("side", cfg, _perpendicular_pair)
    raw = scene_sample(tmp_path, "side", [("disc", *_deg(plan, 1))])  # mp4 audio: at view 1
    side = scene_sample(tmp_path, "side2", [("disc", *_deg(plan, 0))])  # sidecar: at view 0
    foa = media.decode_audio(side.members["mp4"])
    wav = tmp_path / "side.wav"
    import av

    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=24000, layout="quad")
        frame = av.AudioFrame.from_ndarray(foa.astype(np.float32), format="fltp", layout="quad")
        frame.sample_rate = 24000
        for packet in (*stream.encode(frame), *stream.encode(None)):
            out.mux(packet)
    raw.members["wav"] = wav.read_bytes()
    xw = _x_minus_w(transform.make_sample(raw, cfg, seed=0, epoch=epoch)["audio"])
    assert abs(xw[0]) < 0.15 and xw[1] < xw[0] - 1.0


def test_bad_members_raise_media_error(generic):
    cfg = small_cfg()
    cases = {
        "truncated mp4": {**generic.members, "mp4": generic.members["mp4"][:3000]},
        "garbage mp4": {**generic.members, "mp4": b"\x00not a video" * 100},
        "bad json": {**generic.members, "json": b"{not json"},
        "no mp4": {"json": generic.members["json"]},
    }
    for why, members in cases.items():
        with pytest.raises(MediaError, match="generic") as info:
            transform.make_sample(RawSample("generic", members), cfg, seed=0, epoch=0)
        assert "\n" not in str(info.value), why
    bad_masks = RawSample("generic", {**generic.members, "masks.npz": b"junk"})
    with pytest.raises(MediaError, match="masks"):
        transform.make_sample(bad_masks, cfg, seed=0, epoch=0, with_masks=True)


def test_collate_stacks_samples(generic):
    cfg = small_cfg()
    samples = [transform.make_sample(generic, cfg, seed=0, epoch=e) for e in range(3)]
    batch = transform.collate(samples)
    assert batch["video"].shape == (3, 2, 3, 4, 32, 32)
    assert batch["directions"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="disagree"):
        transform.collate([samples[0], {"video": samples[1]["video"]}])


def test_view_mix_and_audio_features_equal_the_mixed_waves():
    cfg = small_cfg(num_viewpoints=3, augment=True)
    foa = torch.randn(4, 12000, generator=torch.Generator().manual_seed(1)) * 0.1
    plans = [plan_for("mix", cfg, epoch=e, misalign_prob=0.5) for e in range(8)]
    assert {p.flip for p in plans} == {True, False} and {p.aligned for p in plans} == {True, False}
    for plan in plans:
        scene = foa * plan.gain
        scene = geometry.flip_foa(scene) if plan.flip else scene
        rotated = geometry.rotate_foa(scene, plan.view_az - plan.yaw, plan.vp.el)
        torch.testing.assert_close(transform.view_mix(plan) @ foa, rotated, atol=1e-6, rtol=1e-5)
        beams = geometry.beam(scene, plan.view_az - plan.yaw, plan.vp.el)
        torch.testing.assert_close((transform.view_mix(plan, "mono") @ foa)[:, 0], beams,
                                   atol=1e-6, rtol=1e-5)
    plan = plans[0]
    for mode, wave in (("foa", transform.view_mix(plan) @ foa),
                       ("mono", transform.view_mix(plan, "mono") @ foa)):
        mode_cfg = replace(cfg, audio_mode=mode)
        ref = normalize_log_mel(log_mel(wave, n_mels=mode_cfg.n_mels)).numpy()
        ours = transform.audio_features(foa, plan, mode_cfg)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_declared_duration_reads_the_json_length():
    assert transform.declared_duration({"duration": 3.5, "seconds": 2}) == 3.5
    assert transform.declared_duration({"seconds": 2}) == 2.0
    for bad in ({}, {"seconds": True}, {"duration": "3"}, {"duration": -1.0},
                {"seconds": float("nan")}):
        assert transform.declared_duration(bad) is None


def test_wrong_json_length_falls_back_to_the_container(generic):
    """A json declaring 10 s for a 2 s clip: windows drawn past the end fail to decode, so the
    transform probes the streams and draws again, as if the json declared nothing."""
    cfg = small_cfg()
    long_meta = {**json.loads(generic.members["json"]), "seconds": 10.0}
    no_length = {k: v for k, v in json.loads(generic.members["json"]).items() if k != "seconds"}
    epoch = next(e for e in range(50) if transform.plan_sample(
        "generic", cfg, seed=0, epoch=e, duration=10.0).windows.audio > SECONDS)
    wrong = RawSample("generic", {**generic.members, "json": json.dumps(long_meta).encode()})
    probed = RawSample("generic", {**generic.members, "json": json.dumps(no_length).encode()})
    assert transform.sample_duration(probed) == pytest.approx(SECONDS, abs=0.05)
    a = transform.make_sample(wrong, cfg, seed=0, epoch=epoch)
    b = transform.make_sample(probed, cfg, seed=0, epoch=epoch)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("features", ["cardioid", "intensity"])
def test_sign_preserving_audio_separates_antipodal_viewpoints(features):
    """A source at a viewpoint and the viewpoint opposite it: the paper's log-mel of the rotated
    W, Y, Z, X is the same for both (magnitudes drop the sign), the sign-preserving inputs are
    not, and they tell which of the two faces the source."""
    scene = synth.make_scene(0, 1.0, sources=[synth.SourceSpec("disc", 30, 10)], width=64,
                             height=32)
    foa = torch.from_numpy(scene.foa)
    vp = geometry.Viewpoints(az=torch.tensor([30.0, -150.0]) * math.pi / 180,
                             el=torch.tensor([10.0, -10.0]) * math.pi / 180,
                             hfov=torch.ones(2), aspect=torch.ones(2))
    plan = transform.SamplePlan(transform.Windows(0.0, 0.0), vp, False, 1.0, None, True, 0.0)
    cfg = DataConfig(augment=False, num_viewpoints=2)
    paper = transform.audio_features(foa, plan, replace(cfg, audio_features="logmel"))
    assert paper.shape == (2, 4, 100, 128)
    assert np.abs(paper[0] - paper[1]).max() < 1e-2  # float noise only
    x = transform.audio_features(foa, plan, replace(cfg, audio_features=features))
    assert x.shape == (2, {"cardioid": 6, "intensity": 7}[features], 100, 128)
    assert np.abs(x[0] - x[1]).max() > 1.0
    band = slice(5, 40)  # mel bins holding the disc's partials
    if features == "cardioid":  # channel 0 looks ahead, channel 1 behind
        ahead = x[:, 0, :, band].mean(axis=(1, 2)) - x[:, 1, :, band].mean(axis=(1, 2))
        assert ahead[0] > 0.5 and ahead[1] < -0.5
    else:  # intensity X (channel 6): + for the source ahead, - behind
        front = x[:, 6, :, band].mean(axis=(1, 2))
        assert front[0] > 0.4 and front[1] < -0.4


def _reference_audio_features(foa: torch.Tensor, plan, cfg) -> np.ndarray:
    """audio_features written out the plain way, in float64: each viewpoint's channels mixed in
    the time domain, torch.stft per mixed channel, |.| through the dense filterbank, 10 log10,
    normalize_log_mel; intensity from the same per-channel spectra."""
    mix = transform.view_mix(plan, "mono" if cfg.audio_mode == "mono" else "foa").double()
    if cfg.audio_mode != "mono" and cfg.audio_features == "cardioid":
        mix = transform.CARDIOIDS.double() @ mix
    waves = mix @ foa.double()  # (V, C, N)
    v, c, n = waves.shape
    spec = torch.stft(waves.reshape(v * c, n), cfg.n_fft, hop_length=cfg.hop,
                      window=torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True)[..., : n // cfg.hop]
    spec = spec.reshape(v, c, *spec.shape[1:])  # (V, C, K, F)
    fb = audio.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).double()
    mel = 10 * torch.log10(spec.abs().transpose(-1, -2) @ fb + 1e-10)  # (V, C, F, M)
    out = normalize_log_mel(mel)
    if cfg.audio_mode != "mono" and cfg.audio_features == "intensity":
        active = (spec[:, :1].conj() * spec[:, 1:]).real.transpose(-1, -2) @ fb
        energy = (spec.abs().square().sum(dim=1) / 2).transpose(-1, -2) @ fb
        out = torch.cat((out, active / (energy[:, None] + 1e-10)), dim=1)
    return out.numpy()


@pytest.mark.parametrize("mode, features, channels", [
    ("foa", "logmel", 4), ("foa", "cardioid", 6), ("foa", "intensity", 7), ("mono", "logmel", 1)])
def test_audio_features_equal_the_plain_formula(mode, features, channels):
    """The one-STFT, mixed-spectra, blocked-mel path against _reference_audio_features on random
    FOA at the default sizes: normalised log-mels 99.9 % within 1e-4 and all within 5e-3, float32
    rounding (where a cardioid or the mono beam nearly cancels in the first frame, the log of a
    tiny power differs by up to 4e-4 on one CPU and 2.4e-3 on an AVX2 one); intensities within
    1e-5 relative (values in [-1, 1]). A wrong bin, tap, frame or channel is off by far more,
    and almost everywhere."""
    cfg = DataConfig(num_viewpoints=4, augment=True, audio_mode=mode, audio_features=features)
    gen = torch.Generator().manual_seed(11)
    foa = torch.randn(4, cfg.sample_rate, generator=gen) * torch.rand(4, 1, generator=gen)
    for epoch in range(2):
        plan = plan_for("ref", cfg, epoch=epoch)
        ours = transform.audio_features(foa, plan, cfg)
        ref = _reference_audio_features(foa, plan, cfg)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (4, channels, 100, 128)
        logs = ours.shape[1] if features != "intensity" else 4
        gap = np.abs(ours[:, :logs] - ref[:, :logs])
        assert np.quantile(gap, 0.999) < 1e-4 and gap.max() < 5e-3, (
            np.quantile(gap, 0.999), gap.max(), np.unravel_index(gap.argmax(), gap.shape))
        np.testing.assert_allclose(ours[:, logs:], ref[:, logs:], atol=1e-6, rtol=1e-5)
