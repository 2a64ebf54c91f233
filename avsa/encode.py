"""Writing 360° clips: equirect H.264 video + 4-channel ambiX AAC in one MP4, as avsa reads them
(avsa.media)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avsa.errors import MediaError
from avsa.media import AV_ERRORS, av_reason
from avsa.pcm import AUDIO_LAYOUT, audio_frame


def encode_clip(path: str | os.PathLike, video: np.ndarray, fps: float, foa: np.ndarray,
                sample_rate: int) -> None:
    """Write an MP4: H.264 (yuv420p, keyframe every second) + 4-channel AAC, 96 kb/s per
    channel, channels in the order given (ambiX W, Y, Z, X). video: (T, H, W, 3) uint8 with
    even H and W; foa: (4, N) float in [-1, 1]. Written next to path and renamed into place,
    so a reader never sees a partial file."""
    path = Path(path)
    if (video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[1] % 2
            or video.shape[2] % 2 or foa.ndim != 2 or foa.shape[0] != 4):
        raise MediaError(path, "need video (T, H, W, 3) uint8 with even H and W, and foa (4, N);"
                               f" got {video.dtype} {video.shape} and {foa.shape}")
    rate, tmp = Fraction(fps).limit_denominator(1001), path.with_name(f".{path.name}.tmp")
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as c:
            vs = c.add_stream("libx264", rate=rate, options={
                "preset": "veryfast", "crf": "23", "g": str(max(1, round(fps)))})
            vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
            aus = c.add_stream("aac", rate=sample_rate, layout=AUDIO_LAYOUT,
                               options={"aac_coder": "fast", "aac_is": "0", "aac_pns": "0"})
            aus.bit_rate = 4 * 96_000
            samples = np.clip(foa, -1.0, 1.0).astype(np.float32)
            n_audio, done = samples.shape[1], 0
            for i in range(len(video) + 1):
                if i < len(video):
                    frame = av.VideoFrame.from_ndarray(video[i], format="rgb24")
                    frame.pts, frame.time_base = i, 1 / rate
                    c.mux(vs.encode(frame))
                # interleaved: audio up to the end of this video frame (all of it after the last)
                upto = n_audio if i == len(video) else min(n_audio, (i + 1) * sample_rate / fps)
                while done + 1024 <= upto or (i == len(video) and done < n_audio):
                    c.mux(aus.encode(audio_frame(samples[:, done:done + 1024], sample_rate, done)))
                    done += 1024
            c.mux(vs.encode(None))
            c.mux(aus.encode(None))
        os.replace(tmp, path)
    except AV_ERRORS as e:
        raise MediaError(path, f"cannot encode ({av_reason(e)})") from e
    finally:
        tmp.unlink(missing_ok=True)
