"""What synthetic scenes are drawn with: class shapes, the equirect pixel grid, backgrounds."""

from __future__ import annotations

import math

import numpy as np
import torch

from avsa import geometry


def shape(name: str, p: np.ndarray, q: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Inside test and texture mix (0 = color, 1 = color2) at local coordinates (p right,
    q up) in units of the source radius, already rotated by the spin; t in seconds."""
    rho, theta = np.hypot(p, q), np.arctan2(q, p)
    box = np.maximum(np.abs(p), np.abs(q))
    zero = np.zeros_like(p)
    if name == "disc":
        return rho < 1, 0.6 * rho**2
    if name == "square":
        return box < 0.85, (box > 0.6).astype(p.dtype)
    if name == "triangle":  # circumradius 1: every edge at distance 0.5 from the centre
        edges = [p * math.cos(a) + q * math.sin(a) for a in np.deg2rad([-90, 30, 150])]
        return np.maximum.reduce(edges) < 0.5, zero
    if name == "ring":
        return (rho > 0.55) & (rho < 1), 0.5 + 0.5 * np.sin(6 * theta - 4 * t)
    if name == "cross":
        a, b = np.abs(p), np.abs(q)
        return ((a < 0.3) & (b < 1)) | ((b < 0.3) & (a < 1)), zero
    if name == "stripes":  # a banner with scrolling stripes
        banner = (np.abs(p) < 1) & (np.abs(q) < 0.55)
        return banner, (np.sin(2 * np.pi * (2.5 * p - 1.5 * t)) > 0).astype(p.dtype)
    if name == "checker":  # a diamond
        return np.abs(p) + np.abs(q) < 1, ((np.floor(p * 3) + np.floor(q * 3)) % 2).astype(p.dtype)
    if name == "star":
        return rho < 0.4 + 0.6 * ((1 + np.cos(5 * theta)) / 2) ** 2, (rho < 0.3).astype(p.dtype)
    raise ValueError(f"unknown shape {name!r}")


def pixel_directions(height: int, width: int) -> np.ndarray:
    """Unit vectors (3, H * W) of the equirect pixel centres, row-major."""
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    az, el = geometry.pixel_to_direction(u[None, :], v[:, None])
    return geometry.direction_vector(az, el).reshape(-1, 3).T.float().numpy()


def background(rng: np.random.Generator, dirs: np.ndarray) -> np.ndarray:
    """(H * W, 3) uint8: smooth colour gradient over the sphere plus faint ripples."""
    base = rng.uniform(0.3, 0.55, (3, 1)) + rng.uniform(-0.12, 0.12, (3, 3)) @ dirs  # (3, HW)
    ripples = sum(0.035 * np.sin(rng.uniform(6, 20) * (rng.normal(size=3) @ dirs / 1.7)
                                 + rng.uniform(0, 2 * np.pi)) for _ in range(4))
    return (np.clip(base + ripples, 0, 1).T * 255 + 0.5).astype(np.uint8)
