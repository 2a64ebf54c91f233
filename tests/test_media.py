"""PyAV decode/encode of 360 clips: frame picking, 4-channel order, resampling, bad input."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from avsa import media
from avsa.encode import encode_clip
from avsa.errors import MediaError

FREQS = (300.0, 700.0, 1300.0, 2100.0)  # one sine per ambiX channel W, Y, Z, X


def bar_video(frames: int, height: int = 64, width: int = 128) -> np.ndarray:
    """Frame i shows a white 4-pixel-wide bar at column 4 i (mod width): decodable after H.264."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        col = (4 * i) % width
        video[i, :, col:col + 4] = 255
    return video


def bar_index(frame: np.ndarray) -> int:
    """The frame number shown by bar_video, modulo width / 4."""
    return int(np.argmax(frame[..., 0].mean(axis=0).reshape(-1, 4).mean(axis=1)))


def sines(sample_rate: int, seconds: float, channels: int = 4) -> np.ndarray:
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in FREQS[:channels]]).astype(np.float32)


def peak_hz(x: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / sample_rate)[spectrum.argmax()])


def write_raw(path, *, video=None, fps=16, audio=None, sample_rate=48000, layout="quad",
              fmt="mp4", codec="aac"):
    """A file with only the streams given (to build inputs encode_clip would never write)."""
    with av.open(str(path), "w", format=fmt) as c:
        if video is not None:
            vs = c.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        if audio is not None:
            aus = c.add_stream(codec, rate=sample_rate, layout=layout)
        if video is not None:
            for i, img in enumerate(video):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                c.mux(vs.encode(frame))
            c.mux(vs.encode(None))
        if audio is not None:
            fmt_name = aus.codec_context.format.name
            for s in range(0, audio.shape[1], 1024):
                chunk = np.ascontiguousarray(audio[:, s:s + 1024])
                if fmt_name == "s16":  # packed int16 for PCM in WAV
                    chunk = (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(chunk, format=fmt_name, layout=layout)
                frame.sample_rate, frame.pts = sample_rate, s
                c.mux(aus.encode(frame))
            c.mux(aus.encode(None))


@pytest.fixture(scope="module")
def clip30(tmp_path_factory):
    """2 s at 30 fps, 128x64, 48 kHz four-sine audio."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    encode_clip(path, bar_video(60), 30, sines(48000, 2.0), 48000)
    return path


def test_probe_reads_metadata(clip30):
    info = media.probe(clip30)
    assert (info.video.width, info.video.height, info.video.fps) == (128, 64, 30.0)
    assert info.video.frames == 60 and info.video.duration == pytest.approx(2.0, abs=0.01)
    assert info.video.codec == "h264" and info.equirect
    assert (info.audio.sample_rate, info.audio.channels, info.audio.codec) == (48000, 4, "aac")
    assert info.audio.duration == pytest.approx(2.0, abs=0.03)


def test_decode_video_resamples_30_to_16_fps_by_latest_frame(clip30):
    video = media.decode_video(clip30, fps=16)
    assert video.shape == (32, 64, 128, 3) and video.dtype == np.uint8
    expected = [int(np.floor(k / 16 * 30 + 1e-9)) % 32 for k in range(32)]
    assert [bar_index(f) for f in video] == expected


def test_decode_video_window_after_seek_and_resize(clip30):
    video = media.decode_video(clip30, fps=16, start=1.0, duration=0.5)
    assert video.shape == (8, 64, 128, 3)
    assert [bar_index(f) for f in video] == [int(np.floor((1 + k / 16) * 30 + 1e-9)) % 32
                                             for k in range(8)]
    small = media.decode_video(clip30, fps=8, start=0.5, duration=1.0, size=(32, 64))
    assert small.shape == (8, 32, 64, 3)


@pytest.mark.parametrize("sample_rate", [48000, 24000])
def test_four_channels_come_back_in_order_and_level(clip30, sample_rate):
    foa = media.decode_audio(clip30, sample_rate=sample_rate)
    assert foa.shape == (4, 2 * sample_rate) and foa.dtype == np.float32
    mid = foa[:, sample_rate // 2: sample_rate // 2 + sample_rate]
    assert [peak_hz(ch, sample_rate) for ch in mid] == pytest.approx(FREQS, abs=2)
    rms = np.sqrt((mid**2).mean(axis=1))
    assert rms == pytest.approx(np.full(4, 0.3 / np.sqrt(2)), rel=0.05)


def test_audio_window_is_time_aligned(tmp_path):
    clicks = np.zeros((4, 96000), np.float32)
    clicks[:, 24000::12000] = 0.8  # 0.5 s, 0.75 s, ... at 48 kHz
    path = tmp_path / "clicks.mp4"
    encode_clip(path, bar_video(32), 16, clicks, 48000)
    foa = media.decode_audio(path, sample_rate=24000, start=0.3, duration=1.0)
    assert foa.shape == (4, 24000)
    peaks = sorted(np.argsort(-np.abs(foa[0]))[:4])
    assert peaks == pytest.approx([4800, 10800, 16800, 22800], abs=2)


def test_bytes_source_equals_path(clip30):
    data = clip30.read_bytes()
    np.testing.assert_array_equal(media.decode_video(data, fps=16, duration=0.5),
                                  media.decode_video(clip30, fps=16, duration=0.5))
    np.testing.assert_array_equal(media.decode_audio(data, duration=0.5),
                                  media.decode_audio(clip30, duration=0.5))
    assert media.probe(data, name="shard/KEY.mp4").path == "shard/KEY.mp4"


def test_window_mid_gop_equals_a_full_decode_with_any_threads(clip30):
    """A window starting mid-GOP, where the frames before it that nothing refers to are not
    decoded, gives the frames of a decode from the start; so do other decoder thread counts."""
    full = media.decode_video(clip30, fps=16)  # from 0: nothing before the window
    for start, threads in ((11 / 16, 1), (21 / 16, 1), (11 / 16, 2), (11 / 16, 0)):
        k = round(start * 16)
        window = media.decode_video(clip30, fps=16, start=start, duration=0.5, threads=threads)
        np.testing.assert_array_equal(window, full[k:k + 8])


def test_rgb_is_pyavs_own_conversion(clip30):
    """The reused reformatter converts exactly as frame.to_ndarray(format="rgb24") (tolerance
    0 grey levels)."""
    with av.open(str(clip30)) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(3), c.decode(video=0))])
    np.testing.assert_array_equal(media.decode_video(clip30, fps=30, duration=0.1), ref)


def test_decode_clip_opens_the_container_once(clip30, monkeypatch):
    """Video and an audio window elsewhere in the clip (here before the video's, so the audio
    stream is rewound) from one open, equal to separate decodes."""
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    video, foa = media.decode_clip(clip30.read_bytes(), fps=16, start=1.25, duration=0.5,
                                   audio_start=0.0, audio_duration=1.5, sample_rate=24000)
    assert len(opened) == 1
    monkeypatch.setattr(av, "open", real_open)
    np.testing.assert_array_equal(video, media.decode_video(clip30, fps=16, start=1.25,
                                                            duration=0.5))
    np.testing.assert_array_equal(foa, media.decode_audio(clip30, sample_rate=24000, start=0.0,
                                                          duration=1.5))


def test_decoding_opens_mp4s_from_the_header_alone(clip30, monkeypatch):
    """Decoders open an MP4 without FFmpeg's stream probing (no frame decoded at open, so the
    pixel format is not known yet; the 4-channel AAC's channel count, kept in its codec
    config, reads 0) and decode exactly what a probed open decodes (tolerance 0)."""
    data = clip30.read_bytes()
    with media._open(data, "clip", header_only=True) as c:
        assert c.streams.video[0].codec_context.pix_fmt is None
        assert c.streams.audio[0].codec_context.channels == 0
    kw = dict(fps=16, start=0.7, duration=0.5, audio_start=0.3, audio_duration=1.0)
    fast = media.decode_clip(data, **kw)
    monkeypatch.setattr(media, "_iso_bmff", lambda src: False)  # FFmpeg's probing
    probed = media.decode_clip(data, **kw)
    for a, b in zip(fast, probed):
        np.testing.assert_array_equal(a, b)


def test_decode_clip_defaults_to_whole_clip(clip30):
    video, foa = media.decode_clip(clip30, fps=16, sample_rate=24000, size=(32, 64))
    assert video.shape == (32, 32, 64, 3) and foa.shape == (4, 48000)


def test_sidecar_audio_next_to_video_only_mp4(tmp_path):
    path = tmp_path / "KEY.mp4"
    write_raw(path, video=bar_video(16))
    assert media.find_audio_sidecar(path) is None
    write_raw(tmp_path / "KEY.wav", audio=sines(48000, 1.0), fmt="wav", codec="pcm_s16le")
    assert media.find_audio_sidecar(path) == tmp_path / "KEY.wav"
    assert media.probe(path).audio.channels == 4
    video, foa = media.decode_clip(path, fps=16, sample_rate=24000)
    assert video.shape[0] == 16 and foa.shape == (4, 24000)
    assert [peak_hz(ch, 24000) for ch in foa] == pytest.approx(FREQS, abs=2)
    # the same audio handed over explicitly (as shards do, bytes)
    _, foa2 = media.decode_clip(path.read_bytes(), audio_src=(tmp_path / "KEY.wav").read_bytes())
    np.testing.assert_allclose(foa2, foa, atol=1e-6)


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match=r"nope\.mp4: file not found"):
        media.probe(tmp_path / "nope.mp4")


def test_garbage_bytes():
    with pytest.raises(MediaError, match=r"^KEY\.mp4: not a media file") as e:
        media.decode_video(b"\x00garbage" * 1000, name="KEY.mp4")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("decode", [media.decode_video, media.decode_audio])
@pytest.mark.parametrize("faststart", [True, False])
def test_truncated_mp4(tmp_path, clip30, faststart, decode):
    """Second half cut off: with the index first the data runs out, without it the index is
    gone."""
    data = clip30.read_bytes()
    if not faststart:
        path = tmp_path / "late.mp4"
        write_raw(path, video=bar_video(60), fps=30, audio=sines(48000, 2.0))
        data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"cut\.mp4: .*truncated or corrupt") as e:
        decode(cut)
    assert "\n" not in str(e.value)


def test_video_only_without_sidecar(tmp_path):
    path = tmp_path / "silent.mp4"
    write_raw(path, video=bar_video(16))
    with pytest.raises(MediaError, match=r"silent\.mp4: no audio stream and no sidecar"):
        media.decode_audio(path)
    assert media.probe(path).audio is None


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.m4a"
    write_raw(path, audio=sines(48000, 1.0), fmt="mp4")
    with pytest.raises(MediaError, match=r"sound\.m4a: no video stream"):
        media.decode_video(path)
    with pytest.raises(MediaError, match="no video stream"):
        media.probe(path)
    assert media.decode_audio(path).shape == (4, 24000)


def test_stereo_audio(tmp_path):
    path = tmp_path / "stereo.mp4"
    write_raw(path, video=bar_video(16), audio=sines(48000, 1.0, channels=2), layout="stereo")
    with pytest.raises(MediaError, match=r"stereo\.mp4: expected 4-channel first-order "
                                         r"ambisonics \(ambiX\), found 2$"):
        media.decode_audio(path)


def test_clip_shorter_than_asked(clip30):
    with pytest.raises(MediaError, match=r"clip\.mp4: clip too short"):
        media.decode_video(clip30, start=1.5, duration=1.0)
    with pytest.raises(MediaError, match="clip too short"):
        media.decode_audio(clip30, start=1.5, duration=1.0)


def test_non_equirect_video_warns(tmp_path):
    path = tmp_path / "tv.mp4"
    encode_clip(path, bar_video(16, height=96, width=128), 16, sines(24000, 1.0), 24000)
    with pytest.warns(UserWarning, match=r"tv\.mp4: video is 128x96, not 2:1"):
        info = media.probe(path)
    assert not info.equirect
    with pytest.warns(UserWarning, match="tv.mp4"):
        assert media.decode_video(path).shape == (16, 96, 128, 3)


def test_encode_rejects_bad_arrays(tmp_path):
    with pytest.raises(MediaError, match="even H and W"):
        encode_clip(tmp_path / "odd.mp4", np.zeros((2, 63, 128, 3), np.uint8), 16,
                          np.zeros((4, 100), np.float32), 24000)
    with pytest.raises(MediaError, match=r"and foa \(4, N\)"):
        encode_clip(tmp_path / "x.mp4", bar_video(2), 16, np.zeros((2, 100)), 24000)
    assert not list(tmp_path.iterdir())
