"""How much of what a viewpoint sees is a sound source: crop coverage from class masks.

A scene caps what any model can learn from it: a crop that shows no source cannot be matched
to its sound by anything but elimination. `crop_coverage` samples crops of equirect class
masks the way the pipeline samples viewpoints and measures the fraction of each crop's pixels
that belong to a source; `coverage_stats` summarises it over clips (`avsa synth --stats`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avsa import geometry

MIN_SHARE = 0.02  # a crop "shows a source" when at least this share of its pixels is one
SIZE = 32  # crop side in pixels for the measurement


def crop_coverage(mask: np.ndarray, vp: geometry.Viewpoints, size: int = SIZE) -> np.ndarray:
    """mask (H, W) class ids (0 = background) -> (V,) float share of each NFOV crop's pixels
    that hold a source (nearest-neighbour sampling)."""
    frame = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    grid = geometry.nfov_grid(vp, size)
    crops = F.grid_sample(frame.expand(len(vp), -1, -1, -1), grid, mode="nearest",
                          padding_mode="border", align_corners=False)
    return crops.mean(dim=(1, 2, 3)).numpy()


def coverage_stats(masks: Iterable[np.ndarray], draws: int = 8, seed: int = 0) -> dict[str, float]:
    """Crop coverage over clips: masks yields (L, H, W) label stacks; for each, `draws` sets of
    `data.num_viewpoints` viewpoints from the pipeline's sampler at the DataConfig defaults,
    each on a random label frame. Returns crops, share_with_source (crops with >= MIN_SHARE of
    source pixels), mean_source_share."""
    from avsa.config import DataConfig

    data = DataConfig()
    gen = torch.Generator().manual_seed(seed)
    shares = []
    for stack in masks:
        for _ in range(draws):
            vp = geometry.sample_viewpoints(
                gen, data.num_viewpoints, el_range_deg=(data.el_min_deg, data.el_max_deg),
                hfov_deg=(data.fov_min_deg, data.fov_max_deg),
                aspect=(data.aspect_min, data.aspect_max),
                min_separation_deg=data.min_separation_deg)
            frame = int(torch.randint(len(stack), (1,), generator=gen))
            shares.append(crop_coverage(stack[frame], vp))
    s = np.concatenate(shares) if shares else np.zeros(0)
    return {"crops": int(s.size),
            "share_with_source": float((s >= MIN_SHARE).mean()) if s.size else float("nan"),
            "mean_source_share": float(s.mean()) if s.size else float("nan")}


def load_masks(paths: Iterable[Path]) -> Iterable[np.ndarray]:
    """The `masks` arrays of `KEY.masks.npz` files, one at a time."""
    for p in paths:
        with np.load(p) as npz:
            yield npz["masks"]
