"""avsa.data.crops: cv2.remap NFOV crops and colour jitter against the float reference
(geometry.nfov_crop, then jitter in float: tests/reference.py), within the tolerance the
module states."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from reference import color_jitter, to_uint8

from avsa import geometry, media, synth
from avsa.config import DataConfig
from avsa.data import crops, transform
from avsa.encode import encode_clip


def _reference(frames, plan, size: int) -> torch.Tensor:
    jitter = None if plan.jitter is None else torch.from_numpy(plan.jitter)
    ref = to_uint8(geometry.nfov_crop(frames, plan.vp, size), jitter)
    return geometry.flip_video(ref) if plan.flip else ref


def _plans(cfg, n: int) -> list[transform.SamplePlan]:
    return [transform.plan_sample("crops", cfg, seed=0, epoch=e, duration=2.0) for e in range(n)]


def test_color_jitter_identity_and_known_factors():
    x = torch.rand(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ident = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    torch.testing.assert_close(color_jitter(x, ident), x, atol=1e-5, rtol=0)
    half = color_jitter(x, torch.tensor([[0.5, 1.0, 1.0, 0.0]] * 2))
    torch.testing.assert_close(half, x * 0.5, atol=1e-5, rtol=0)
    gray = torch.full((1, 3, 1, 2, 2), 0.4)
    hue = color_jitter(gray, torch.tensor([[1.0, 1.0, 1.0, 0.25]]))
    torch.testing.assert_close(hue, gray, atol=1e-5, rtol=0)  # hue leaves grey alone
    desat = color_jitter(x[:1], torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert desat.std(dim=1).max() < 1e-5  # saturation 0 -> grey


def test_crops_of_a_decoded_clip_within_tolerance(tmp_path):
    """Real content (a decoded synthetic scene): at most 6 grey levels from the reference and
    under 1 % of values off by more than 1, with and without jitter, flipped or not."""
    scene = synth.make_scene(3, 1.0, width=256, height=128, fps=16)
    encode_clip(tmp_path / "c.mp4", scene.video, 16, scene.foa, 24000)
    frames = media.decode_video(tmp_path / "c.mp4", fps=16, duration=0.5)
    cfg = DataConfig(num_viewpoints=4, crop_size=48, augment=True)
    plans = _plans(cfg, 6)
    plans[0] = replace(plans[0], jitter=None)
    assert {p.flip for p in plans} == {True, False}
    for plan in plans:
        out = transform.view_crops(frames, plan, 48)
        assert out.shape == (4, 3, 8, 48, 48) and out.dtype == torch.uint8
        diff = (out.int() - _reference(frames, plan, 48).int()).abs()
        assert int(diff.max()) <= 6
        assert float((diff > 1).float().mean()) < 1e-2


def test_crops_of_noise_within_the_worst_case_bound():
    """Full-range pixel-to-pixel noise, the worst case for fixed-point positions: at most 16
    levels, 1 on average, across the seam and near the poles."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 48, 96, 3), generator=gen, dtype=torch.uint8).numpy()
    cfg = DataConfig(num_viewpoints=3, crop_size=24, augment=True, el_min_deg=-80,
                     el_max_deg=80, fov_max_deg=120)
    for plan in _plans(cfg, 4):
        diff = (transform.view_crops(frames, plan, 24).int()
                - _reference(frames, plan, 24).int()).abs()
        assert int(diff.max()) <= 16 and float(diff.float().mean()) < 1.0


def test_seam_wraps_and_flip_mirrors():
    """A crop centred on the seam reads both edge columns; flipping mirrors the crop."""
    frames = np.zeros((1, 90, 180, 3), np.uint8)
    frames[0, 44, [0, 179]] = 255  # row 44 is centred on el = +1 deg
    vp = geometry.Viewpoints(*(torch.tensor([v]) for v in (np.pi, np.radians(1.0),
                                                           np.radians(20.0), 1.0)))
    out = crops.view_crops(frames, vp, 15)
    assert int(out[0, 0, 0, 7, 7]) == 255
    ramp = np.tile(np.arange(0, 240, 2, dtype=np.uint8)[None, :, None], (60, 1, 3))[None]
    vp = geometry.Viewpoints(*(torch.tensor([v]) for v in (0.3, 0.1, 1.0, 1.0)))
    torch.testing.assert_close(crops.view_crops(ramp, vp, 16, flip=True),
                               torch.flip(crops.view_crops(ramp, vp, 16), dims=(-1,)))


def test_flipped_maps_equal_mirrored_crops_exactly():
    """Flipping reverses the maps' columns: the same bytes as mirroring the finished crops,
    colour jitter included (a crop's mean grey does not change when it is mirrored)."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    cfg = replace(DataConfig(), num_viewpoints=3, crop_size=20, fov_min_deg=40, fov_max_deg=90)
    for plan in _plans(cfg, 4):
        jitter = plan.jitter if plan.jitter is not None else np.ones((3, 4), np.float32)
        flipped = crops.view_crops(frames, plan.vp, 20, jitter=jitter, flip=True)
        plain = crops.view_crops(frames, plan.vp, 20, jitter=jitter)
        assert torch.equal(flipped, torch.flip(plain, dims=(-1,)))
