"""Spherical geometry for 360° video and first-order ambisonics (pure torch, batched).

Conventions (see DESIGN.md), radians throughout:
- direction (az, el): az counter-clockwise from the front (+pi/2 = left), el up; unit vector
  (x, y, z) = (cos el cos az, cos el sin az, sin el) with x front, y left, z up.
- equirectangular frame: column fraction u in [0, 1) -> az = (1 - 2u) pi (the left half holds
  positive azimuths); row fraction v -> el = (1 - 2v) pi / 2 (row 0 is straight up).
- audio: ambiX, ACN channel order (W, Y, Z, X), SN3D.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avsa.errors import ConfigError

_XYZ = [3, 1, 2]  # ambiX channel indices of X, Y, Z
_FROM_XYZ = [1, 2, 0]  # (X, Y, Z) rows -> ambiX order (Y, Z, X) after W


def _tensors(*xs) -> list[Tensor]:
    """Python numbers / tensors -> float tensors on the device of the first tensor given."""
    ref = next((x for x in xs if isinstance(x, Tensor)), None)
    device = None if ref is None else ref.device
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return [torch.as_tensor(x, dtype=dtype, device=device) for x in xs]


def direction_vector(az, el) -> Tensor:
    """(az, el) broadcastable, radians -> unit vectors (..., 3) as (x front, y left, z up)."""
    az, el = torch.broadcast_tensors(*_tensors(az, el))
    ce = torch.cos(el)
    return torch.stack((ce * torch.cos(az), ce * torch.sin(az), torch.sin(el)), dim=-1)


def vector_to_direction(v: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors (..., 3), any non-zero length -> (az in (-pi, pi], el in [-pi/2, pi/2])."""
    x, y, z = v.unbind(-1)
    return torch.atan2(y, x), torch.atan2(z, torch.hypot(x, y))


def angular_distance(az1, el1, az2, el2) -> Tensor:
    """Great-circle angle in radians between two (broadcastable) directions, in [0, pi]."""
    a = direction_vector(az1, el1)
    b = direction_vector(*_tensors(az2, el2)).to(a)
    # atan2(|a x b|, a . b) stays accurate for nearly equal or opposite directions
    a, b = torch.broadcast_tensors(a, b)
    return torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))


def pixel_to_direction(u, v) -> tuple[Tensor, Tensor]:
    """Equirect fractions (u column, v row) -> (az, el) radians."""
    u, v = _tensors(u, v)
    return (1.0 - 2.0 * u) * math.pi, (1.0 - 2.0 * v) * (math.pi / 2)


def direction_to_pixel(az, el) -> tuple[Tensor, Tensor]:
    """(az, el) radians -> equirect fractions: u in [0, 1) (wrapped), v in [0, 1] (0 = up)."""
    az, el = _tensors(az, el)
    u = torch.remainder(0.5 - az / (2 * math.pi), 1.0)
    return u, 0.5 - el / math.pi


def encode_foa(signal: Tensor, az, el) -> Tensor:
    """Encode a mono plane wave into ambiX (W, Y, Z, X) SN3D: signal (..., N); az, el radians,
    scalars or (N,) per-sample trajectories (broadcasting against signal) -> (..., 4, N)."""
    az, el = _tensors(az, el)
    az, el = az.to(signal), el.to(signal)
    ce = torch.cos(el)
    gains = (torch.ones_like(ce), ce * torch.sin(az), torch.sin(el), ce * torch.cos(az))
    return torch.stack([signal * g for g in torch.broadcast_tensors(*gains)], dim=-2)


def rotation_to_front(az, el) -> Tensor:
    """Rotation matrices (..., 3, 3) with R @ direction_vector(az, el) == (1, 0, 0).

    R = R_y(el) @ R_z(-az): yaw to azimuth 0, then pitch to elevation 0, so no roll. Its rows
    are the camera's front, left and up axes in world coordinates (R maps world to camera).
    """
    az, el = torch.broadcast_tensors(*_tensors(az, el))
    ca, sa, ce, se = torch.cos(az), torch.sin(az), torch.cos(el), torch.sin(el)
    zero = torch.zeros_like(az)
    rows = ((ce * ca, ce * sa, se), (-sa, ca, zero), (-se * ca, -se * sa, ce))
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def rotate_foa(foa: Tensor, az, el) -> Tensor:
    """Rotate the sound field so each viewpoint centre becomes the front (+X): foa (*B, 4, N)
    ambiX, az, el (*B, V) radians -> (*B, V, 4, N), [X, Y, Z] rotated by rotation_to_front."""
    rot = rotation_to_front(az, el).to(foa)  # (*B, V, 3, 3)
    xyz = rot @ foa[..., None, _XYZ, :]  # (*B, V, 3, N)
    w = foa[..., None, :1, :].expand(*xyz.shape[:-2], 1, foa.shape[-1])
    return torch.cat((w, xyz[..., _FROM_XYZ, :]), dim=-2)


def beam_weights(az, el) -> Tensor:
    """(D,) directions -> (D, 4) ambiX weights of a cardioid: (W + d . [X, Y, Z]) / 2, so a
    plane wave from d0 with amplitude s gives s (1 + cos angle(d, d0)) / 2 on the beam."""
    x, y, z = direction_vector(az, el).unbind(-1)
    return 0.5 * torch.stack((torch.ones_like(x), y, z, x), dim=-1)


def beam(foa: Tensor, az, el) -> Tensor:
    """Cardioid beams toward (az, el) (D,) from foa (..., 4, N) -> (..., D, N)."""
    return torch.einsum("dc,...cn->...dn", beam_weights(az, el).to(foa), foa)


def energy_map(foa: Tensor, n_az: int = 72, n_el: int = 36) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-square cardioid beam power on an equirect grid of directions: foa (..., 4, N) ->
    (energy (..., n_el, n_az), az grid (n_az,), el grid (n_el,)) at cell centres; row 0 is the
    top, column 0 is next to az = +pi."""
    dev = foa.device
    u = (torch.arange(n_az, device=dev, dtype=torch.float32) + 0.5) / n_az
    v = (torch.arange(n_el, device=dev, dtype=torch.float32) + 0.5) / n_el
    az_grid, el_grid = pixel_to_direction(u, v)
    el_all, az_all = torch.meshgrid(el_grid, az_grid, indexing="ij")
    w = beam_weights(az_all.reshape(-1), el_all.reshape(-1)).to(foa)  # (D, 4)
    # mean_n (w . f_n)^2 == w^T C w with C the 4x4 second-moment matrix: no (D, N) beams
    cov = foa @ foa.transpose(-1, -2) / foa.shape[-1]
    energy = torch.einsum("dc,...ce,de->...d", w, cov, w)
    return energy.reshape(*energy.shape[:-1], n_el, n_az), az_grid, el_grid


def flip_foa(foa: Tensor) -> Tensor:
    """Mirror the sound field left/right: negate Y (ambiX channel 1). foa: (..., 4, N)."""
    return foa * foa.new_tensor([1.0, -1.0, 1.0, 1.0])[:, None]


def flip_video(crops: Tensor) -> Tensor:
    """Mirror crops (..., S, S) left/right (along the last axis)."""
    return torch.flip(crops, dims=(-1,))


@dataclass(frozen=True)
class Viewpoints:
    """V crop viewpoints; all fields (V,) radians except aspect (crop width / height)."""

    az: Tensor
    el: Tensor
    hfov: Tensor  # horizontal field of view
    aspect: Tensor

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.az, self.el, self.hfov, self.aspect)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"Viewpoints fields must share one (V,) shape, got {shapes}")

    def __len__(self) -> int:
        return self.az.shape[0]

    def to(self, device) -> Viewpoints:
        return Viewpoints(*(t.to(device) for t in (self.az, self.el, self.hfov, self.aspect)))


def _check_range(key: str, rng, lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(x) for x in rng)
    if not (lo <= a <= b <= hi):
        raise ConfigError(key, f"must satisfy {lo} <= low <= high <= {hi}, got ({a}, {b})")
    return a, b


def _draw_directions(gen: torch.Generator, k: int, el_lo: float, el_hi: float):
    u = torch.rand(k, generator=gen)
    t = torch.rand(k, generator=gen)
    return (1.0 - 2.0 * u) * math.pi, el_lo + (el_hi - el_lo) * t


def _place_separated(gen, n: int, sep: float, el_lo: float, el_hi: float, max_tries: int):
    """Place centres one at a time, each rejection-sampled (in chunks of candidates) to lie at
    least sep radians from those already placed. Returns (az, el) (n,) or (None, None)."""
    az, el = torch.empty(n), torch.empty(n)
    for k in range(n):
        for start in range(0, max_tries, 64):
            caz, cel = _draw_directions(gen, min(64, max_tries - start), el_lo, el_hi)
            dist = angular_distance(caz[:, None], cel[:, None], az[None, :k], el[None, :k])
            ok = (dist >= sep).all(dim=1)
            if ok.any():
                first = int(torch.nonzero(ok)[0, 0])
                az[k], el[k] = caz[first], cel[first]
                break
        else:
            return None, None
    return az, el


def sample_viewpoints(
    gen: torch.Generator,
    n: int,
    *,
    el_range_deg: tuple[float, float] = (-30.6, 30.6),
    hfov_deg: tuple[float, float] = (25.0, 76.0),
    aspect: tuple[float, float] = (0.75, 1.333),
    min_separation_deg: float = 0.0,
    max_tries: int = 1000,
) -> Viewpoints:
    """Draw n viewpoints: az uniform over 360°, el uniform in el_range_deg, tan(hfov / 2)
    uniform between those of hfov_deg (as the reference code: wide views likelier than with
    hfov uniform), aspect log-uniform; all randomness from `gen` (a CPU generator).

    Centres are placed one by one, each candidate at least min_separation_deg from those
    placed; ConfigError when a centre cannot be placed within max_tries candidates.
    """
    if n < 1:
        raise ConfigError("n", f"need at least one viewpoint, got {n}")
    el_lo, el_hi = (math.radians(x) for x in _check_range("el_range_deg", el_range_deg, -90, 90))
    fov_lo, fov_hi = _check_range("hfov_deg", hfov_deg, 1e-6, 179.0)
    asp_lo, asp_hi = _check_range("aspect", aspect, 1e-3, 1e3)
    sep = math.radians(float(min_separation_deg))
    if sep <= 0:
        az, el = _draw_directions(gen, n, el_lo, el_hi)
    else:
        az, el = _place_separated(gen, n, sep, el_lo, el_hi, max_tries)
        if az is None:
            raise ConfigError("min_separation_deg", f"cannot place {n} viewpoints "
                              f"{min_separation_deg} deg apart with elevation in "
                              f"{tuple(el_range_deg)} deg after {max_tries} tries")
    tan_lo, tan_hi = (math.tan(math.radians(x) / 2) for x in (fov_lo, fov_hi))
    hfov = 2 * torch.atan(tan_lo + (tan_hi - tan_lo) * torch.rand(n, generator=gen))
    log_lo, log_hi = math.log(asp_lo), math.log(asp_hi)
    asp = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=gen))
    return Viewpoints(az=az, el=el, hfov=hfov, aspect=asp)


def _camera(vp: Viewpoints, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float32 pixel-centre offsets (size,) in (-1, 1), tangent-plane half-width and
    half-height (V,), and rotation_to_front (V, 3, 3): world -> camera, rows front, left, up."""
    c = (torch.arange(size, device=vp.az.device, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    half_w = torch.tan(vp.hfov.float() / 2)
    return c, half_w, half_w / vp.aspect.float(), rotation_to_front(vp.az.float(), vp.el.float())


def nfov_grid(vp: Viewpoints, size: int) -> Tensor:
    """Gnomonic sampling grid: (V, size, size, 2) grid_sample (x, y) coords in [-1, 1] on the
    equirect frame (x = 2u - 1, y = 2v - 1, align_corners=False).

    Output pixel (i, j) looks along the camera ray (1, -a_j tan(hfov/2), -b_i tan(hfov/2) /
    aspect), a_j, b_i the pixel-centre offsets in (-1, 1) (columns rightward, rows downward),
    rotated to world by rotation_to_front(az, el)^T.
    """
    c, half_w, half_h, rot = _camera(vp, size)
    y = -c[None, None, :] * half_w[:, None, None]  # (V, 1, S) left coordinate
    z = -c[None, :, None] * half_h[:, None, None]  # (V, S, 1) up coordinate
    x, y, z = torch.broadcast_tensors(torch.ones_like(y), y, z)
    ray = torch.stack((x, y, z), dim=-1)  # (V, S, S, 3) camera frame
    world = torch.einsum("vji,vhwj->vhwi", rot, ray)
    u, v = direction_to_pixel(*vector_to_direction(world))
    return torch.stack((2.0 * u - 1.0, 2.0 * v - 1.0), dim=-1)


def nfov_pixels(vp: Viewpoints, size: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Equirect pixel coordinates (x column, y row; pixel centres at integers) of the points
    nfov_grid samples: (V, size, size) each, x in [0, w) (wrapped), y clamped to [0, h - 1] as
    grid_sample's border padding clamps it.

    The camera ray (1, l_j, u_i) maps to the world as front + l_j left + u_i up (the rows of
    rotation_to_front), so each world coordinate is a (V, S, 1) + (V, 1, S) broadcast sum."""
    c, half_w, half_h, rot = _camera(vp, size)
    row = rot[:, None, 0] - (c[None, :] * half_h[:, None])[..., None] * rot[:, None, 2]  # (V, S, 3)
    col = -(c[None, :] * half_w[:, None])[..., None] * rot[:, None, 1]  # (V, S, 3)
    wx, wy, wz = (row[:, :, None, k] + col[:, None, :, k] for k in range(3))
    y = torch.atan2(wz, torch.hypot(wx, wy)).mul_(-h / math.pi).add_(0.5 * h - 0.5)
    x = torch.atan2(wy, wx).mul_(-w / (2 * math.pi)).add_(0.5 * w - 0.5)  # u = 1/2 - az / 2 pi
    x = torch.where(x < 0, x + w, x)
    return torch.where(x >= w, x - w, x), y.clamp_(0.0, h - 1.0)  # x + w may round up to w


@functools.lru_cache(maxsize=256)
def _cached_maps(key: tuple[float, ...], size: int, h: int, w: int) -> tuple[np.ndarray, ...]:
    vp = Viewpoints(*torch.tensor(key, dtype=torch.float64).view(4, -1))  # az, el, hfov, aspect
    maps = tuple(m.numpy().reshape(len(vp) * size, size) for m in nfov_pixels(vp, size, h, w))
    for m in maps:
        m.flags.writeable = False  # shared by every caller of the cache
    return maps


def nfov_maps(vp: Viewpoints, size: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """nfov_pixels as cv2.remap maps: (map_x, map_y) float32 (V * size, size), the crops
    stacked vertically, read-only. Use with INTER_LINEAR and BORDER_WRAP: columns wrap around
    the seam; rows stay in [0, h - 1], so the wrap never reaches them (a row at h - 1 has
    weight 0 on the row below). Cached per (viewpoints, size, frame size): a fixed plan builds
    its maps once; random training viewpoints pay about 1 ms per 4 crops of 112 px."""
    key = tuple(float(v) for t in (vp.az, vp.el, vp.hfov, vp.aspect) for v in t.cpu().tolist())
    return _cached_maps(key, int(size), int(h), int(w))


def _thwc(frames) -> tuple[Tensor, float]:
    """Frames as a (T, H, W, 3) view (no copy) and the factor mapping values to [0, 1]."""
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[-1] == 3:
        return x, 1.0 / 255.0
    if x.is_floating_point() and x.ndim == 4 and x.shape[1] == 3:
        return x.permute(0, 2, 3, 1), 1.0
    raise ValueError(f"frames must be uint8 (T, H, W, 3) or float (T, 3, H, W), "
                     f"got {x.dtype} {tuple(x.shape)}")


def nfov_crop(frames, vp: Viewpoints, size: int) -> Tensor:
    """Gnomonic (NFOV) crops of equirect frames, the same crop for every frame.

    frames: (T, H, W, 3) uint8 or (T, 3, H, W) float in [0, 1] (tensor or numpy array, any
    device). Returns (V, 3, T, size, size) float32 on the frames' device, bilinear at the
    points of nfov_pixels in float32. Columns wrap around the ±180° seam, so interpolation
    across it is exact; rows clamp at the poles. The reference for the uint8 cv2.remap path
    of the data pipeline (avsa.data.crops), which samples the same nfov_maps.
    """
    x, scale = _thwc(frames)
    h, w = x.shape[1], x.shape[2]
    px, py = nfov_pixels(vp.to(x.device), size, h, w)
    x0, y0 = px.floor(), py.floor()
    fx, fy = (px - x0)[..., None], (py - y0)[..., None]  # (V, S, S, 1)
    c0, r0 = x0.long(), y0.long()
    c1, r1 = (c0 + 1) % w, (r0 + 1).clamp_(max=h - 1)

    def tap(r: Tensor, c: Tensor) -> Tensor:  # (T, V, S, S, 3) float, gathered before converting
        return x[:, r, c].float()

    top = tap(r0, c0) * (1 - fx) + tap(r0, c1) * fx
    bottom = tap(r1, c0) * (1 - fx) + tap(r1, c1) * fx
    out = (top * (1 - fy) + bottom * fy).permute(1, 4, 0, 2, 3)  # (V, 3, T, S, S)
    return out.mul(scale).contiguous()
