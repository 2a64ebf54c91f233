"""Known-answer tests for avsa.audio: the Slaney mel scale, log-mel against an independent numpy
implementation, and per-bin normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import log_mel, normalize_log_mel

from avsa.audio import (
    hz_to_mel,
    log_mel_intensity_mixed,
    log_mel_mixed,
    mel_filterbank,
    mel_to_hz,
    stft,
)

SR, N_FFT, HOP, N_MELS = 24000, 512, 240, 128


def _slaney_mel(f: float) -> float:
    """Slaney (Auditory Toolbox) mel: 3 mels per 200 Hz up to 1 kHz, then 27 mels per
    factor 6.4."""
    return 3.0 * f / 200.0 if f < 1000.0 else 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def _slaney_hz(m: float) -> float:
    return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def _edges_hz(n_mels: int = N_MELS, sr: int = SR) -> list[float]:
    top = _slaney_mel(sr / 2)
    return [_slaney_hz(top * k / (n_mels + 1)) for k in range(n_mels + 2)]


def _numpy_filterbank(sr=SR, n_fft=N_FFT, n_mels=N_MELS) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels): triangle per filter, unit area in Hz, written out per entry."""
    edges = _edges_hz(n_mels, sr)
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if lo < f <= mid:
                fb[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[k, m] = (hi - f) / (hi - mid)
        fb[:, m] *= 2.0 / (hi - lo)
    return fb


def _numpy_log_mel(x: np.ndarray, sr=SR, n_fft=N_FFT, hop=HOP, n_mels=N_MELS) -> np.ndarray:
    """x (N,) -> (N // hop, n_mels): frames centred at k * hop, reflect padding."""
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[k * hop : k * hop + n_fft] for k in range(len(x) // hop)])
    mag = np.abs(np.fft.rfft(frames * window, axis=-1))
    return 10 * np.log10(mag @ _numpy_filterbank(sr, n_fft, n_mels) + 1e-10)


def test_mel_scale_known_values():
    hz = torch.tensor([0.0, 200.0, 1000.0, 6400.0, 12000.0])
    expected = torch.tensor([0.0, 3.0, 15.0, 42.0, _slaney_mel(12000.0)], dtype=torch.float64)
    torch.testing.assert_close(hz_to_mel(hz), expected)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz.double())


def test_filterbank_matches_formulas_and_has_no_empty_filter():
    fb = mel_filterbank(SR, N_FFT, N_MELS)
    assert fb.shape == (N_FFT // 2 + 1, N_MELS) and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.numpy(), _numpy_filterbank(), rtol=1e-5, atol=1e-9)
    assert bool((fb.max(dim=0).values > 0).all())
    # unit area: wide (high) filters integrate to ~1 over the FFT bin spacing
    area = fb.sum(0) * (SR / N_FFT)
    assert float((area[-40:] - 1).abs().max()) < 0.05


def _log_mel(wave: torch.Tensor) -> torch.Tensor:
    """The product's log-mel of each channel of wave (C, N) -> (C, F, M): an identity mix."""
    return log_mel_mixed(wave, torch.eye(wave.shape[0]))


def test_log_mel_shape():
    wave = torch.randn(4, SR)  # 1 s of 4-channel audio
    assert _log_mel(wave).shape == (4, 100, 128)
    assert log_mel_mixed(wave, torch.eye(4).expand(2, 4, 4)).shape == (2, 4, 100, 128)
    assert _log_mel(torch.randn(1, SR // 2 + 7)).shape == (1, 50, 128)
    with pytest.raises(ValueError):
        _log_mel(torch.randn(1, 100))


def test_log_mel_matches_numpy_reference():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    x = 0.1 * rng.standard_normal(SR) + 0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, SR)
    ours = _log_mel(torch.from_numpy(x).float()[None])[0].numpy()
    ref = _numpy_log_mel(x.astype(np.float32))
    assert ref.shape == ours.shape == (100, 128)
    np.testing.assert_allclose(ours, ref, atol=5e-4, rtol=0)
    # the float reference the mixing tests below compare against agrees too
    np.testing.assert_allclose(log_mel(torch.from_numpy(x).float()).numpy(), ref, atol=5e-4, rtol=0)


def test_log_mel_channels_are_independent():
    wave = torch.randn(3, SR // 4)
    batched = _log_mel(wave)
    for c in range(3):
        torch.testing.assert_close(batched[c], _log_mel(wave[c:c + 1])[0])


def test_sine_peaks_in_its_mel_bin():
    t = torch.arange(SR) / SR
    peak = int(_log_mel(torch.sin(2 * math.pi * 1000.0 * t)[None])[0].mean(0).argmax())
    edges = _edges_hz()
    containing = [m for m in range(N_MELS) if edges[m] < 1000.0 < edges[m + 2]]
    assert containing and peak in containing
    peak_4k = int(_log_mel(torch.sin(2 * math.pi * 4000.0 * t)[None])[0].mean(0).argmax())
    assert edges[peak_4k] < 4000.0 < edges[peak_4k + 2]


def test_normalize_log_mel_per_bin_keeps_channel_differences():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 50, 8, generator=gen) * torch.arange(1, 9) + torch.arange(8) * 10
    x = torch.cat((base, base - 6.0), dim=0)  # channel 1 is 6 dB quieter everywhere
    y = normalize_log_mel(x)
    flat = y.permute(2, 0, 1).reshape(8, -1)  # per mel bin, channels and frames pooled
    torch.testing.assert_close(flat.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(8), atol=1e-4, rtol=0)
    std = x.permute(2, 0, 1).reshape(8, -1).std(1, correction=0)
    torch.testing.assert_close(y[0] - y[1], (6.0 / std).expand(50, 8), atol=1e-4, rtol=0)
    assert normalize_log_mel(torch.stack((x, 2 * x))).shape == (2, 2, 50, 8)


def _foa_scene(seconds: float = 1.0) -> torch.Tensor:
    """(4, N) ambiX of two plane waves (noise from the front left, a tone from behind above)."""
    gen = torch.Generator().manual_seed(3)
    n = int(SR * seconds)
    t = torch.arange(n) / SR
    noise = 0.1 * torch.randn(n, generator=gen)
    tone = 0.3 * torch.sin(2 * math.pi * 700.0 * t)

    def gains(az: float, el: float) -> torch.Tensor:  # (W, Y, Z, X), column vector
        ce = math.cos(el)
        return torch.tensor([1.0, ce * math.sin(az), math.sin(el), ce * math.cos(az)])[:, None]

    return gains(0.6, 0.1) * noise + gains(2.8, 0.5) * tone


def test_log_mel_mixed_equals_log_mel_of_the_mixed_waves():
    foa = _foa_scene()
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(3, 4, 4, generator=gen)  # any real mixing, batched over 3 views
    ref = log_mel(mix @ foa)
    ours = log_mel_mixed(foa, mix)
    assert ours.shape == ref.shape == (3, 4, 100, 128)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # dB
    torch.testing.assert_close(log_mel_mixed(foa, torch.eye(4)), log_mel(foa), atol=2e-3, rtol=0)
    beams = torch.rand(5, 1, 4, generator=gen)  # one channel per view
    torch.testing.assert_close(log_mel_mixed(foa, beams), log_mel(beams @ foa), atol=2e-3, rtol=0)


def test_log_mel_mixed_normalized_matches_normalize_log_mel():
    foa = _foa_scene(0.5)
    mix = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5))
    ours = log_mel_mixed(foa, mix, n_mels=64, normalize=True)
    ref = normalize_log_mel(log_mel(mix @ foa, n_mels=64))
    assert ours.shape == (2, 4, 50, 64)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_log_mel_mixed_equals_the_mixed_spectra_directly():
    """The matmul mixing and sparse mel sum against the plain formula on the same STFT:
    |mix @ spec| through the dense filterbank, 10 log10 (within 1e-4 dB, float32 sums in
    another order)."""
    foa = _foa_scene()
    mix = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    spec = stft(foa, N_FFT, HOP)  # (4, K, F)
    mag = torch.einsum("vdc,ckf->vdkf", mix.to(spec), spec).abs()
    ref = 10 * torch.log10(mag.transpose(-1, -2) @ mel_filterbank(SR, N_FFT, N_MELS) + 1e-10)
    torch.testing.assert_close(log_mel_mixed(foa, mix, spec=spec), ref, atol=1e-4, rtol=0)


def test_intensity_part_equals_the_dense_formula():
    """The sparse mel sums and in-place products against the plain formula on the same STFT:
    Re(conj(W) [Y, Z, X]) and the half energy through the dense filterbank (within 1e-5 of
    values in [-1, 1]); a plane wave from the front gives X near +1 where it is loud."""
    foa = _foa_scene()
    mix = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7))
    spec = stft(foa, N_FFT, HOP)
    rot = torch.einsum("vdc,ckf->vdkf", mix.to(spec), spec)  # (V, 4, K, F) complex
    active = (rot[:, :1].conj() * rot[:, 1:]).real
    energy = rot.abs().square().sum(dim=1) / 2
    fb = mel_filterbank(SR, N_FFT, N_MELS)
    ref = (torch.einsum("vckf,km->vcfm", active, fb)
           / (torch.einsum("vkf,km->vfm", energy, fb)[:, None] + 1e-10))
    ours = log_mel_intensity_mixed(spec, mix)[:, 4:]
    assert ours.shape == (3, 3, 100, 128)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    front = torch.sin(2 * math.pi * 1000 * torch.arange(SR) / SR) * torch.tensor(
        [1.0, 0.0, 0.0, 1.0])[:, None]  # W = X = s: a plane wave from az 0, el 0
    x = log_mel_intensity_mixed(stft(front, N_FFT, HOP), torch.eye(4)[None])[0, 6]  # (F, M)
    loud = x[:, 35:45]  # the mel bins around 1 kHz
    torch.testing.assert_close(loud, torch.ones_like(loud), atol=1e-3, rtol=0)


def test_log_mel_mixed_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="4 wave channels"):
        log_mel_mixed(torch.randn(4, SR), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="n_fft"):
        log_mel_mixed(torch.randn(4, 100), torch.eye(4))


def test_log_mel_intensity_mixed_starts_with_the_log_mels():
    foa = _foa_scene()
    mix = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8))
    spec = stft(foa, N_FFT, HOP)
    both = log_mel_intensity_mixed(spec, mix)
    assert both.shape == (3, 7, 100, 128)
    torch.testing.assert_close(both[:, :4], log_mel_mixed(foa, mix, normalize=True, spec=spec),
                               atol=1e-5, rtol=0)
