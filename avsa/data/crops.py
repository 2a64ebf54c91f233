"""NFOV crops of decoded frames for the data pipeline, and their colour jitter.

The crops are sampled with OpenCV's `cv2.remap` (bilinear, BORDER_WRAP across the ±180° seam)
at the points of `geometry.nfov_maps`, straight from the uint8 frames; the colour jitter is
then one affine RGB map per crop applied to the small crops with `cv2.transform`.

Tolerance against the float reference (`geometry.nfov_crop`, then jitter_maps applied in float
and rounded once; tests/reference.py): OpenCV interpolates in fixed point (positions rounded to
1/32 pixel, 15-bit weights) and the jitter rounds a second time. On decoded synthetic clips at
most 6 grey levels (at sharp object edges), under 1 % of values off by more than 1 (0.2 % at
1024x512, 12 plans measured); where neighbouring pixels differ by the full range (uint8 noise) a
1/64 pixel position error is 4 levels per axis, amplified by the jitter's gain (up to about 2),
so up to 16 (13 seen, 1 on average). tests/test_crops.py checks both.

Colour jitter (brightness, contrast, saturation, hue; torchvision ColorJitter ranges, applied
in that fixed order and fused into one affine RGB map per crop, clamped once; contrast uses the
crop's mean grey over all its frames; hue rotates the (I, Q) chroma plane of YIQ, a cheap
stand-in for an HSV hue shift).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

from avsa import geometry

GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]]
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def jitter_factors(rng: np.random.Generator, n: int, jitter) -> np.ndarray:
    """(n, 4) per-crop factors (brightness, contrast, saturation, hue) in ColorJitter ranges."""
    b, c, s, h = (float(x) for x in jitter)
    lo = [max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h]
    hi = [1 + b, 1 + c, 1 + s, h]
    return rng.uniform(lo, hi, size=(n, 4)).astype(np.float32)


def jitter_maps(factors) -> tuple[Tensor, Tensor]:
    """Colour jitter of each crop as one affine RGB map x -> A x + u m, with m the crop's mean
    grey level: brightness b, contrast c (blend with the crop's mean grey after brightness),
    saturation s (blend with the pixel's grey), hue h (rotation by 2 pi h of the YIQ chroma
    plane), composed in that order. factors (V, 4) (tensor or array) -> A (V, 3, 3), u (V, 3)
    float32. A does not depend on the crop; only the contrast step blends with its mean.
    (Small: numpy, float64 inside.)"""
    b, c, s, h = np.asarray(factors, dtype=np.float64).T
    sat = s[:, None, None] * np.eye(3) + (1 - s)[:, None, None] * np.array(GRAY)
    rot = np.zeros((len(b), 3, 3))
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1] = rot[:, 2, 2] = np.cos(2 * math.pi * h)
    rot[:, 2, 1] = np.sin(2 * math.pi * h)
    rot[:, 1, 2] = -rot[:, 2, 1]
    mix = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ sat  # (V, 3, 3)
    a = mix * (b * c)[:, None, None]
    u = mix.sum(-1) * ((1 - c) * b)[:, None]
    return torch.from_numpy(a.astype(np.float32)), torch.from_numpy(u.astype(np.float32))


def view_crops(frames, vp: geometry.Viewpoints, size: int, *, jitter=None,
               flip: bool = False) -> Tensor:
    """frames (T, H, W, 3) uint8 -> (V, 3, T, S, S) uint8: bilinear NFOV crops (cv2.remap at
    the maps of geometry.nfov_maps, converted once per crop to OpenCV's fixed-point form),
    colour jitter when jitter (V, 4) factors are given (each crop through x -> A x + u m,
    jitter_maps, with m its mean grey, by cv2.transform: rounded and saturated), mirrored
    left/right when flip (the maps' columns reversed: the same samples as mirroring the crops,
    without a pass over them). Within the module's stated tolerance of the float reference."""
    frames = np.ascontiguousarray(frames)
    t, h, w = frames.shape[:3]
    map_x, map_y = geometry.nfov_maps(vp, size, h, w)
    if flip:
        map_x, map_y = (np.ascontiguousarray(m[:, ::-1]) for m in (map_x, map_y))
    if jitter is not None:
        a, u = (m.numpy().astype(np.float64) for m in jitter_maps(jitter))
    img = np.empty((t * size, size, 3), np.uint8)  # one crop's frames stacked vertically
    out = np.empty((len(vp), 3, t * size, size), np.uint8)
    for v in range(len(vp)):
        rows = slice(v * size, (v + 1) * size)
        fixed, frac = cv2.convertMaps(map_x[rows], map_y[rows], cv2.CV_16SC2)
        for k in range(t):
            cv2.remap(frames[k], fixed, frac, cv2.INTER_LINEAR, dst=img[k * size:(k + 1) * size],
                      borderMode=cv2.BORDER_WRAP)
        if jitter is not None:
            shift = u[v] * (np.array(cv2.mean(img)[:3]) @ np.array(GRAY))
            cv2.transform(img, np.concatenate((a[v], shift[:, None]), axis=1), dst=img)
        cv2.split(img, list(out[v]))  # straight into the planes
    return torch.from_numpy(out).view(len(vp), 3, t, size, size)
