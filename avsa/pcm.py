"""4-channel PCM between PyAV audio frames and numpy: sample formats and resampling.

Channels keep their order (ambiX W, Y, Z, X in this project): one layout in and out, so no
channel is ever mixed into another.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

AUDIO_LAYOUT = "quad"  # 4 channels stored in ambiX order W, Y, Z, X; decoders return that order


def planar_float(frame) -> np.ndarray | list[np.ndarray]:
    """Any PCM sample format -> (channels, samples) float32 in [-1, 1]. Planar float (what
    FFmpeg's AAC decoder gives) is read in place, as a list of (samples,) views."""
    if frame.format.name == "fltp":
        return [np.frombuffer(p, np.float32, frame.samples) for p in frame.planes]
    x = frame.to_ndarray()
    x = x if frame.format.is_planar else x.reshape(-1, len(frame.layout.channels)).T
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    scale = -np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else 1.0
    return (x / np.float32(scale)).astype(np.float32, copy=False)


def resample(x: np.ndarray, rate: int, new_rate: int, n_out: int) -> np.ndarray:
    """(4, N) at rate -> (4, n_out) at new_rate with swresample, in and out in one 4-channel
    layout so that no channel is mixed into another."""
    resampler = av.AudioResampler(format="fltp", layout=AUDIO_LAYOUT, rate=new_rate)
    frame = audio_frame(x, rate, 0)
    parts = [f.to_ndarray() for f in (*resampler.resample(frame), *resampler.resample(None))]
    y = np.concatenate([np.zeros((4, 0), np.float32), *parts], axis=1)[:, :n_out]
    return np.pad(y, ((0, 0), (0, n_out - y.shape[1])))


def audio_frame(x: np.ndarray, rate: int, pts: int) -> av.AudioFrame:
    """(4, N) float -> an fltp 4-channel frame at `rate` Hz starting at sample `pts`."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout=AUDIO_LAYOUT)
    frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
    return frame
