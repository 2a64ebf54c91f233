"""Known-answer tests for avsa.geometry: directions, FOA rotation and beams, NFOV crops, flips,
viewpoint sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avsa import geometry
from avsa.errors import ConfigError
from avsa.geometry import (
    Viewpoints,
    angular_distance,
    beam,
    direction_to_pixel,
    direction_vector,
    encode_foa,
    energy_map,
    flip_foa,
    flip_video,
    nfov_crop,
    nfov_grid,
    pixel_to_direction,
    rotate_foa,
    rotation_to_front,
    sample_viewpoints,
    vector_to_direction,
)

RAD = math.pi / 180


def _random_directions(n: int, max_el_deg: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    az = (torch.rand(n, generator=gen) * 2 - 1) * math.pi
    el = (torch.rand(n, generator=gen) * 2 - 1) * max_el_deg * RAD
    edge_az = torch.tensor([math.pi, -math.pi, math.pi / 2, -3 * math.pi / 4, 0.0, 2.0])
    edge_el = torch.tensor([60.0, -60.0, 59.0, -45.0, 0.0, 60.0]) * RAD
    return torch.cat((az, edge_az)), torch.cat((el, edge_el))


def _vp(az_deg, el_deg, hfov_deg=60.0, aspect=1.0) -> Viewpoints:
    az = torch.as_tensor(az_deg, dtype=torch.float32).reshape(-1) * RAD
    el = torch.as_tensor(el_deg, dtype=torch.float32).reshape(-1) * RAD
    full = torch.ones_like(az)
    return Viewpoints(az=az, el=el, hfov=full * hfov_deg * RAD, aspect=full * aspect)


def _blob_frame(az: float, el: float, h: int = 128, w: int = 256, sigma_deg: float = 4.0):
    """(1, 3, H, W) float frame holding a Gaussian spot centred on direction (az, el)."""
    u = (torch.arange(w) + 0.5) / w
    v = (torch.arange(h) + 0.5) / h
    paz, pel = pixel_to_direction(u[None, :], v[:, None])
    dist = angular_distance(paz, pel, az, el)
    return torch.exp(-((dist / (sigma_deg * RAD)) ** 2)).expand(1, 3, h, w).clone()


def _argmax2d(img: torch.Tensor) -> tuple[int, int]:
    idx = int(img.argmax())
    return idx // img.shape[-1], idx % img.shape[-1]


# ---------------------------------------------------------------- directions and pixels


def test_direction_conventions():
    v = direction_vector(
        torch.tensor([0.0, math.pi / 2, 0.0]), torch.tensor([0.0, 0.0, math.pi / 2])
    )
    torch.testing.assert_close(v, torch.eye(3), atol=1e-6, rtol=0)  # front, left, up
    az, el = _random_directions(50, 85)
    az2, el2 = vector_to_direction(3.0 * direction_vector(az, el))
    torch.testing.assert_close(torch.cos(az2 - az), torch.ones_like(az), atol=1e-5, rtol=0)
    torch.testing.assert_close(el2, el, atol=1e-5, rtol=0)


def test_pixel_conventions():
    u, v = direction_to_pixel(math.pi / 2, 0.0)  # +90 deg (left) -> left half
    assert float(u) == pytest.approx(0.25) and float(u) < 0.5 and float(v) == pytest.approx(0.5)
    u, _ = direction_to_pixel(-math.pi / 2, 0.0)
    assert float(u) == pytest.approx(0.75)
    u, v = direction_to_pixel(0.0, math.pi / 2)
    assert float(u) == pytest.approx(0.5) and float(v) == pytest.approx(0.0)  # up = top row
    for az in (math.pi, -math.pi):
        u, _ = direction_to_pixel(az, 0.0)
        assert min(float(u), 1 - float(u)) < 1e-6  # the seam is the frame's edge
    uu = torch.linspace(0.01, 0.99, 17)
    az, el = pixel_to_direction(uu, uu)
    u2, v2 = direction_to_pixel(az, el)
    torch.testing.assert_close(u2, uu)
    torch.testing.assert_close(v2, uu)


def test_angular_distance():
    d = angular_distance(
        torch.tensor([0.0, 0.0, 179 * RAD, 0.0]),
        torch.tensor([0.0, 0.0, 0.0, 0.0]),
        torch.tensor([math.pi / 2, 0.0, -179 * RAD, math.pi]),
        torch.tensor([0.0, math.pi / 2, 0.0, 0.0]),
    )
    torch.testing.assert_close(d, torch.tensor([math.pi / 2, math.pi / 2, 2 * RAD, math.pi]))
    assert float(angular_distance(0.3, 0.2, 0.3 + 1e-4, 0.2)) == pytest.approx(
        1e-4 * math.cos(0.2), rel=1e-2
    )


# ---------------------------------------------------------------- FOA rotation, beams, energy


def _rot_y(t: torch.Tensor) -> torch.Tensor:
    c, s, o, z = torch.cos(t), torch.sin(t), torch.ones_like(t), torch.zeros_like(t)
    return torch.stack([torch.stack(r, -1) for r in ((c, z, s), (z, o, z), (-s, z, c))], -2)


def _rot_z(t: torch.Tensor) -> torch.Tensor:
    c, s, o, z = torch.cos(t), torch.sin(t), torch.ones_like(t), torch.zeros_like(t)
    return torch.stack([torch.stack(r, -1) for r in ((c, -s, z), (s, c, z), (z, z, o))], -2)


def _front_energy_fraction(az: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
    """Encode a noise plane wave from each (az, el), rotate it toward the same direction with
    rotate_foa, return the share of directional energy X^2 / (X^2 + Y^2 + Z^2) per direction."""
    sig = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    foa = encode_foa(sig, az[:, None], el[:, None])  # (D, 4, N)
    out = rotate_foa(foa, az[:, None], el[:, None])[:, 0]  # (D, 4, N)
    torch.testing.assert_close(out[:, 0], foa[:, 0], atol=0, rtol=0)  # W untouched
    e = out.pow(2).sum(-1)
    return e[:, 3] / e[:, 1:].sum(-1)


def test_rotation_matrix_is_yaw_then_pitch():
    az, el = _random_directions(64, 60)
    rot = rotation_to_front(az, el)
    torch.testing.assert_close(rot, _rot_y(el) @ _rot_z(-az), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        rot @ rot.transpose(-1, -2), torch.eye(3).expand(len(az), 3, 3), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(len(az)), atol=1e-5, rtol=0)
    front = (rot @ direction_vector(az, el)[..., None])[..., 0]
    torch.testing.assert_close(front, torch.tensor([1.0, 0, 0]).expand_as(front), atol=1e-6, rtol=0)


def test_rotate_foa_brings_source_to_front():
    az, el = _random_directions(300, 60)
    assert bool((_front_energy_fraction(az, el) >= 0.99).all())


def test_wrong_rotation_order_fails_front_test(monkeypatch):
    """The reference code's R_z(-az) R_y(el) must fail the check above: the check has teeth."""
    monkeypatch.setattr(geometry, "rotation_to_front", lambda a, e: _rot_z(-a) @ _rot_y(e))
    az, el = _random_directions(300, 60)
    frac = _front_energy_fraction(az, el)
    assert not bool((frac >= 0.99).all())
    assert float(frac.min()) < 0.5
    # yaw-only viewpoints are unaffected by the order
    assert bool((_front_energy_fraction(az, torch.zeros_like(el)) >= 0.99).all())


def test_rotate_foa_preserves_energy_and_shapes():
    gen = torch.Generator().manual_seed(2)
    foa = torch.randn(4, 1000, generator=gen)
    az, el = _random_directions(5, 60)
    out = rotate_foa(foa, az, el)
    assert out.shape == (len(az), 4, 1000)
    torch.testing.assert_close(out[:, 0], foa[0].expand(len(az), -1), atol=0, rtol=0)
    e_in = foa[1:].pow(2).sum()
    torch.testing.assert_close(
        out[:, 1:].pow(2).sum((-1, -2)), e_in.expand(len(az)), rtol=1e-5, atol=0
    )
    batched = rotate_foa(torch.stack((foa, -foa)), az[None].expand(2, -1), el[None].expand(2, -1))
    assert batched.shape == (2, len(az), 4, 1000)
    torch.testing.assert_close(batched[1], -out)


def test_beam_known_answers():
    sig = torch.randn(500, generator=torch.Generator().manual_seed(3))
    az0, el0 = 0.7, -0.4
    foa = encode_foa(sig, az0, el0)
    out = beam(foa, torch.tensor([az0, az0 + math.pi]), torch.tensor([el0, -el0]))
    torch.testing.assert_close(out[0], sig, atol=1e-5, rtol=0)  # toward the source: the source
    torch.testing.assert_close(out[1], torch.zeros_like(sig), atol=1e-5, rtol=0)  # opposite: null


def test_encode_foa_trajectory():
    n = 8
    az = torch.linspace(0, math.pi, n)
    foa = encode_foa(torch.ones(n), az, torch.zeros(n))
    torch.testing.assert_close(foa[1], torch.sin(az))
    torch.testing.assert_close(foa[3], torch.cos(az))
    torch.testing.assert_close(foa[2], torch.zeros(n))


def test_energy_map_layout_and_definition():
    energy, az_grid, el_grid = energy_map(torch.randn(4, 300), n_az=72, n_el=36)
    assert energy.shape == (36, 72)
    assert float(az_grid[0]) == pytest.approx(math.pi - math.pi / 72)
    assert float(el_grid[0]) == pytest.approx(math.pi / 2 - math.pi / 72)
    assert bool((az_grid.diff() < 0).all()) and bool((el_grid.diff() < 0).all())
    foa = torch.randn(4, 300, generator=torch.Generator().manual_seed(4))
    energy, az_grid, el_grid = energy_map(foa, n_az=8, n_el=4)
    el_all, az_all = torch.meshgrid(el_grid, az_grid, indexing="ij")
    direct = beam(foa, az_all.reshape(-1), el_all.reshape(-1)).pow(2).mean(-1).reshape(4, 8)
    torch.testing.assert_close(energy, direct, rtol=1e-4, atol=1e-6)


def test_energy_map_peaks_at_source():
    sig = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    az, el = _random_directions(40, 60, seed=6)
    energy, az_grid, el_grid = energy_map(encode_foa(sig, az[:, None], el[:, None]), 72, 36)
    for k in range(len(az)):
        row, col = _argmax2d(energy[k])
        d_az = abs(math.remainder(float(az_grid[col] - az[k]), 2 * math.pi))
        assert d_az <= 2 * math.pi / 72 + 1e-6
        assert abs(float(el_grid[row] - el[k])) <= math.pi / 36 + 1e-6


# ---------------------------------------------------------------- NFOV crops


@pytest.mark.parametrize(
    ("az_deg", "el_deg"),
    [
        (0, 0),
        (90, 10),
        (-90, -20),
        (179, 0),
        (-179, 5),
        (180, 0),
        (-180, -10),
        (179.9, 25),
        (37.3, -28),
    ],
)
def test_crop_centre_looks_at_its_direction(az_deg, el_deg):
    frame = _blob_frame(az_deg * RAD, el_deg * RAD)
    crop = nfov_crop(frame, _vp(az_deg, el_deg, hfov_deg=40.0), 31)  # (1, 3, 1, 31, 31)
    assert crop.shape == (1, 3, 1, 31, 31) and crop.dtype == torch.float32
    assert _argmax2d(crop[0, 0, 0]) == (15, 15)
    assert float(crop[0, 0, 0, 15, 15]) > 0.9  # a Gaussian read between pixel centres


def test_seam_pixels_exact():
    """W = 180 (2 deg per column): column 0 is centred on az = +179, column 179 on -179 and
    az = 180 lies between them; row 44 is centred on el = +1. Without the wrap, az = 180 reads 0.5."""
    h, w, row = 90, 180, 44
    for az_deg, cols in (
        (179.0, [0]),
        (-179.0, [w - 1]),
        (180.0, [0, w - 1]),
        (-180.0, [0, w - 1]),
    ):
        frame = torch.zeros(1, h, w, 3, dtype=torch.uint8)
        frame[0, row, cols] = 255
        crop = nfov_crop(frame, _vp(az_deg, 1.0, hfov_deg=20.0), 15)
        assert float(crop[0, 0, 0, 7, 7]) == pytest.approx(1.0, abs=2e-3), az_deg


def test_crop_orientation():
    h, w = 64, 128
    left = torch.zeros(1, 3, h, w)
    left[..., : w // 2] = 1.0  # positive azimuths
    crop = nfov_crop(left, _vp([0.0, 90.0, -90.0], [0.0, 0.0, 0.0], hfov_deg=60.0), 16)
    assert float(crop[0, ..., :7].min()) > 0.999 and float(crop[0, ..., 9:].max()) < 1e-3
    assert float(crop[1].min()) > 0.999 and float(crop[2].max()) < 1e-3
    top = torch.zeros(1, 3, h, w)
    top[:, :, : h // 2] = 1.0  # positive elevations
    crop = nfov_crop(top, _vp(33.0, 0.0, hfov_deg=60.0, aspect=0.8), 16)
    assert float(crop[0, :, :, :7].min()) > 0.999 and float(crop[0, :, :, 9:].max()) < 1e-3


def _reference_pixel(frame: np.ndarray, az, el, hfov, aspect, size, i, j) -> np.ndarray:
    """One output pixel of an NFOV crop, by explicit float64 math: frame (3, H, W)."""
    _, h, w = frame.shape
    a = (j + 0.5) / size * 2 - 1
    b = (i + 0.5) / size * 2 - 1
    half_w = math.tan(hfov / 2)
    front = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    left = np.array([-math.sin(az), math.cos(az), 0.0])
    up = np.cross(front, left)
    ray = front - a * half_w * left - b * half_w / aspect * up
    raz = math.atan2(ray[1], ray[0])
    rel = math.atan2(ray[2], math.hypot(ray[0], ray[1]))
    px = ((math.pi - raz) / (2 * math.pi)) % 1.0 * w - 0.5
    py = min(max((math.pi / 2 - rel) / math.pi * h - 0.5, 0.0), h - 1.0)
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    y1 = min(y0 + 1, h - 1)
    c0, c1 = x0 % w, (x0 + 1) % w
    top = frame[:, y0, c0] * (1 - fx) + frame[:, y0, c1] * fx
    bottom = frame[:, y1, c0] * (1 - fx) + frame[:, y1, c1] * fx
    return top * (1 - fy) + bottom * fy


def test_nfov_crop_matches_per_pixel_reference():
    gen = torch.Generator().manual_seed(7)
    frames = torch.rand(2, 3, 40, 80, generator=gen)
    vp = sample_viewpoints(gen, 3, el_range_deg=(-60, 60), hfov_deg=(25, 100))
    vp = Viewpoints(
        az=torch.cat((vp.az, torch.tensor([179.5 * RAD, math.pi]))),
        el=torch.cat((vp.el, torch.tensor([50 * RAD, -20 * RAD]))),
        hfov=torch.cat((vp.hfov, torch.tensor([1.5, 0.7]))),
        aspect=torch.cat((vp.aspect, torch.tensor([0.75, 1.333]))),
    )
    size = 12
    crop = nfov_crop(frames, vp, size)
    assert crop.shape == (5, 3, 2, size, size)
    assert nfov_grid(vp, size).abs().max() <= 1.0
    rng = np.random.default_rng(0)
    fr = frames.double().numpy()
    for _ in range(60):
        k, t, i, j = rng.integers(5), rng.integers(2), rng.integers(size), rng.integers(size)
        ref = _reference_pixel(
            fr[t],
            float(vp.az[k]),
            float(vp.el[k]),
            float(vp.hfov[k]),
            float(vp.aspect[k]),
            size,
            i,
            j,
        )
        np.testing.assert_allclose(crop[k, :, t, i, j].numpy(), ref, atol=1e-4)


@pytest.mark.parametrize(
    ("az_deg", "el_deg", "hfov_deg", "aspect"),
    [
        (0.0, 72.0, 80.0, 0.75),  # holds the north pole: every column of the frame is sampled
        (-40.0, -80.0, 50.0, 1.0),  # the south pole, rows clamped at the bottom edge
        (180.0, 0.0, 100.0, 1.333),  # centred on the seam
        (-178.0, 20.0, 10.0, 1.0),  # narrow, just right of the seam
    ],
)
def test_nfov_crop_matches_reference_at_poles_and_seam(az_deg, el_deg, hfov_deg, aspect):
    gen = torch.Generator().manual_seed(11)
    frames = torch.randint(0, 256, (2, 30, 60, 3), generator=gen, dtype=torch.uint8)
    vp = _vp(az_deg, el_deg, hfov_deg=hfov_deg, aspect=aspect)
    size = 16
    crop = nfov_crop(frames, vp, size)
    fr = frames.permute(0, 3, 1, 2).double().div(255).numpy()
    for t in range(2):
        for i in range(size):
            for j in range(size):
                ref = _reference_pixel(fr[t], az_deg * RAD, el_deg * RAD, hfov_deg * RAD,
                                       aspect, size, i, j)
                np.testing.assert_allclose(crop[0, :, t, i, j].numpy(), ref, atol=1e-4)


def test_nfov_crop_accepts_uint8_thwc_and_numpy():
    gen = torch.Generator().manual_seed(8)
    thwc = torch.randint(0, 256, (3, 24, 48, 3), generator=gen, dtype=torch.uint8)
    vp = _vp([10.0, -150.0], [5.0, -20.0])
    ref = nfov_crop(thwc.permute(0, 3, 1, 2).float() / 255, vp, 8)
    torch.testing.assert_close(nfov_crop(thwc, vp, 8), ref)
    torch.testing.assert_close(nfov_crop(thwc.numpy(), vp, 8), ref)
    with pytest.raises(ValueError):
        nfov_crop(torch.zeros(3, 24, 48), vp, 8)


def test_nfov_maps_are_the_crop_points_cached_and_read_only():
    vp = sample_viewpoints(torch.Generator().manual_seed(5), 3)
    map_x, map_y = geometry.nfov_maps(vp, 10, 40, 80)
    px, py = geometry.nfov_pixels(vp, 10, 40, 80)
    assert map_x.shape == map_y.shape == (30, 10) and map_x.dtype == np.float32
    np.testing.assert_array_equal(map_x, px.reshape(30, 10).numpy())
    np.testing.assert_array_equal(map_y, py.reshape(30, 10).numpy())
    assert geometry.nfov_maps(vp, 10, 40, 80)[0] is map_x  # the same plan builds them once
    assert not map_x.flags.writeable
    assert float(map_x.min()) >= 0 and float(map_x.max()) < 80 and float(map_y.max()) <= 39


# ---------------------------------------------------------------- flips


def test_flip_twice_is_identity():
    foa = torch.randn(2, 4, 100)
    crops = torch.randn(4, 3, 8, 16, 16)
    torch.testing.assert_close(flip_foa(flip_foa(foa)), foa, atol=0, rtol=0)
    torch.testing.assert_close(flip_video(flip_video(crops)), crops, atol=0, rtol=0)
    flipped = flip_foa(foa)
    torch.testing.assert_close(flipped[:, 1], -foa[:, 1])
    torch.testing.assert_close(flipped[:, [0, 2, 3]], foa[:, [0, 2, 3]])
    torch.testing.assert_close(flip_video(crops)[..., 0], crops[..., -1])


@pytest.mark.parametrize(
    ("view_az_deg", "view_el_deg"), [(0.0, 0.0), (120.0, 20.0), (-170.0, -25.0)]
)
def test_flip_keeps_video_and_audio_consistent(view_az_deg, view_el_deg):
    """A source 25 deg left of the view centre sits in the crop's left half and in the rotated
    audio at +25 deg; after flipping both, it is in the right half and at -25 deg in the audio."""
    rel = 25.0 * RAD
    rot = rotation_to_front(view_az_deg * RAD, view_el_deg * RAD)
    src_az, src_el = vector_to_direction(rot.T @ direction_vector(rel, 0.0))
    frame = _blob_frame(float(src_az), float(src_el), sigma_deg=3.0)
    size, hfov = 65, 90.0
    vp = _vp(view_az_deg, view_el_deg, hfov_deg=hfov)
    crop = nfov_crop(frame, vp, size)[0, 0, 0]
    foa = rotate_foa(encode_foa(torch.randn(2000), src_az, src_el), vp.az, vp.el)[0]

    def crop_azimuth(col: int) -> float:  # azimuth of a column centre in the camera frame
        return math.atan(-((col + 0.5) / size * 2 - 1) * math.tan(hfov * RAD / 2))

    def audio_azimuth(sound: torch.Tensor) -> float:
        energy, az_grid, el_grid = energy_map(sound, 72, 36)
        row, col = _argmax2d(energy)
        assert abs(float(el_grid[row])) <= 5 * RAD
        return float(az_grid[col])

    row, col = _argmax2d(crop)
    assert row == size // 2 and col < size // 2
    assert crop_azimuth(col) == pytest.approx(rel, abs=2 * RAD)
    assert audio_azimuth(foa) == pytest.approx(rel, abs=5 * RAD)

    row, col = _argmax2d(flip_video(crop))
    assert row == size // 2 and col > size // 2
    assert crop_azimuth(col) == pytest.approx(-rel, abs=2 * RAD)
    assert audio_azimuth(flip_foa(foa)) == pytest.approx(-rel, abs=5 * RAD)

    # flipping is the same as mirroring the world (az -> -az) and viewing from the mirrored centre
    mirrored = _vp(-view_az_deg, view_el_deg, hfov_deg=hfov)
    torch.testing.assert_close(
        flip_video(crop),
        nfov_crop(torch.flip(frame, (-1,)), mirrored, size)[0, 0, 0],
        atol=1e-5,
        rtol=0,
    )
    raw = encode_foa(torch.randn(300), src_az, src_el)
    torch.testing.assert_close(
        flip_foa(rotate_foa(raw, vp.az, vp.el)),
        rotate_foa(flip_foa(raw), mirrored.az, mirrored.el),
        atol=1e-5,
        rtol=0,
    )


# ---------------------------------------------------------------- viewpoint sampling


def test_sample_viewpoints_ranges_and_distributions():
    vp = sample_viewpoints(torch.Generator().manual_seed(0), 4000)
    assert len(vp) == 4000
    assert float(vp.az.abs().max()) <= math.pi
    assert float(vp.el.min()) >= -30.6 * RAD - 1e-6 and float(vp.el.max()) <= 30.6 * RAD + 1e-6
    assert float(vp.el.min()) < -29 * RAD and float(vp.el.max()) > 29 * RAD
    hfov_deg = vp.hfov / RAD
    assert float(hfov_deg.min()) >= 25 - 1e-4 and float(hfov_deg.max()) <= 76 + 1e-4
    half = torch.tan(vp.hfov / 2)  # the reference draws the tangent half-width uniformly
    lo, hi = math.tan(12.5 * RAD), math.tan(38 * RAD)
    assert float(half.mean()) == pytest.approx((lo + hi) / 2, abs=0.01)
    assert float(((half - lo) / (hi - lo) < 0.5).float().mean()) == pytest.approx(0.5, abs=0.03)
    assert float(hfov_deg.median()) > 52  # wider than the middle of 25-76 deg
    assert float(vp.aspect.min()) >= 0.75 - 1e-6 and float(vp.aspect.max()) <= 1.333 + 1e-6
    assert float(vp.aspect.log().mean()) == pytest.approx(0.5 * math.log(0.75 * 1.333), abs=0.01)
    quadrant = torch.floor((vp.az + math.pi) / (math.pi / 2)).clamp(max=3).long()
    counts = torch.bincount(quadrant, minlength=4).float() / 4000
    assert bool(((counts - 0.25).abs() < 0.03).all())


def test_sample_viewpoints_min_separation_and_determinism():
    kwargs = {"el_range_deg": (-60.0, 60.0), "min_separation_deg": 36.0}
    for seed in range(20):
        vp = sample_viewpoints(torch.Generator().manual_seed(seed), 8, **kwargs)
        dist = angular_distance(vp.az[:, None], vp.el[:, None], vp.az[None], vp.el[None])
        off_diag = dist[~torch.eye(8, dtype=torch.bool)]
        assert float(off_diag.min()) >= 36 * RAD - 1e-5
        assert float(vp.el.abs().max()) <= 60 * RAD + 1e-6
    a = sample_viewpoints(torch.Generator().manual_seed(3), 4, **kwargs)
    b = sample_viewpoints(torch.Generator().manual_seed(3), 4, **kwargs)
    c = sample_viewpoints(torch.Generator().manual_seed(4), 4, **kwargs)
    for name in ("az", "el", "hfov", "aspect"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)
    assert not torch.equal(a.az, c.az)


def test_sample_viewpoints_rejects_impossible_and_bad_ranges():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="min_separation_deg"):
        sample_viewpoints(gen, 8, min_separation_deg=120.0, max_tries=200)
    with pytest.raises(ConfigError, match="el_range_deg"):
        sample_viewpoints(gen, 2, el_range_deg=(10.0, -10.0))
    with pytest.raises(ConfigError, match="hfov_deg"):
        sample_viewpoints(gen, 2, hfov_deg=(30.0, 200.0))
    with pytest.raises(ConfigError, match="aspect"):
        sample_viewpoints(gen, 2, aspect=(0.0, 1.0))


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    frames = torch.randint(0, 256, (4, 48, 96, 3), generator=gen, dtype=torch.uint8)
    vp = sample_viewpoints(gen, 4, min_separation_deg=30.0)
    foa = torch.randn(4, 2400, generator=gen)
    torch.testing.assert_close(
        nfov_crop(frames.cuda(), vp, 16).cpu(), nfov_crop(frames, vp, 16), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        rotate_foa(foa.cuda(), vp.az.cuda(), vp.el.cuda()).cpu(),
        rotate_foa(foa, vp.az, vp.el),
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        energy_map(foa.cuda())[0].cpu(), energy_map(foa)[0], rtol=1e-4, atol=1e-6
    )
