"""Room acoustics for synthetic scenes: B-format reverberant tails from image-source room
acoustics, and the diffuse noise field.

pyroomacoustics computes the image sources of a shoebox room (Allen & Berkley) whose wall
absorption gives the requested RT60 (Sabine). Each image source reaches a point microphone
with delay d / c and amplitude damping / (4 pi d) from its own direction, and first-order
ambisonics encodes it exactly there (ambiX ACN/SN3D, as `geometry.encode_foa`): the omni and
three figure-of-eight pickups of an ideal coincident B-format microphone. The direct path
(order 0) is left out: the scene encodes it itself, following the source as it moves, so
only the room's reflections are added here, at the source's starting direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from avsa.errors import ConfigError

SPEED_OF_SOUND = 343.0  # m/s
ROOM_M = (7.0, 5.5, 3.2)  # nominal shoebox, scaled by U(0.8, 1.25) per scene
SOURCE_DISTANCE_M = 2.0
MAX_ORDER = 30  # reflections beyond this are below -70 dB at RT60 0.4 s


def bformat_tails(directions: Sequence[tuple[float, float]], rt60_s: float, sample_rate: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Reverberant tails (S, 4, L) float32 ambiX, relative to a unit direct path, for sources
    at (az, el) radians, SOURCE_DISTANCE_M from the microphone (nearer when a wall is closer),
    in one random room with reverberation time rt60_s. L covers 1.2 rt60_s."""
    import pyroomacoustics as pra

    if not rt60_s > 0:
        raise ConfigError("rt60_s", f"must be > 0 for a room, got {rt60_s}")
    dims = np.array(ROOM_M) * rng.uniform(0.8, 1.25, 3)
    mic = dims * rng.uniform((0.35, 0.35, 0.35), (0.65, 0.65, 0.5))  # off-centre: no symmetry
    try:
        absorption, max_order = pra.inverse_sabine(rt60_s, dims)
    except ValueError as e:
        raise ConfigError("rt60_s", f"{rt60_s} s is not reachable in a {dims.round(1)} m room "
                                    f"({e})") from None
    length = int(1.2 * rt60_s * sample_rate) + 1
    out = np.zeros((len(directions), 4, length), np.float32)
    for i, (az, el) in enumerate(directions):
        unit = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        room_span = np.where(unit > 0, dims - mic, mic) / np.maximum(np.abs(unit), 1e-9)
        pos = mic + unit * min(SOURCE_DISTANCE_M, 0.9 * room_span.min())
        shoebox = pra.ShoeBox(dims, fs=sample_rate, materials=pra.Material(absorption),
                              max_order=min(max_order, MAX_ORDER), air_absorption=False)
        shoebox.add_microphone_array(pra.MicrophoneArray(mic[:, None], sample_rate))
        shoebox.add_source(pos)
        shoebox.image_source_model()
        src = shoebox.sources[0]
        offset = src.images - mic[:, None]  # (3, K)
        dist = np.linalg.norm(offset, axis=0)
        amp = src.damping[0] / (4 * math.pi * dist)
        direct = src.orders == 0
        delay = (dist - dist[direct].min()) / SPEED_OF_SOUND  # relative to the direct path
        keep = ~direct & (delay * sample_rate < length - 0.5)
        x, y, z = offset[:, keep] / dist[keep]
        gains = np.stack([np.ones_like(x), y, z, x]) * (amp[keep] / amp[direct].max())
        taps = np.rint(delay[keep] * sample_rate).astype(int)
        for c in range(4):
            np.add.at(out[i, c], taps, gains[c])
    return out


def convolve(waves: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Sum over sources of each wave (S, N) convolved with its tail (S, 4, L), cut to N:
    (4, N) float32."""
    n = waves.shape[1]
    size = 1 << (n + tails.shape[-1] - 1).bit_length()
    spectra = np.fft.rfft(waves, size)[:, None, :] * np.fft.rfft(tails, size)
    return np.fft.irfft(spectra.sum(axis=0), size)[:, :n].astype(np.float32)


def diffuse_noise(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """(4, n) float32 ambiX of an isotropic diffuse field with `std` on W: independent noise
    per channel, the first-order channels at 1/sqrt(3) of W (SN3D: a plane wave from a uniform
    direction has E[Y^2] = E[Z^2] = E[X^2] = E[W^2] / 3)."""
    scale = np.array([1.0, 3**-0.5, 3**-0.5, 3**-0.5])[:, None] * std
    return (rng.standard_normal((4, n)) * scale).astype(np.float32)
