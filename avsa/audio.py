"""Log-mel features of multichannel audio (pure torch, batched).

Mel scale: Slaney (librosa's default, htk=False): linear below 1 kHz (200/3 Hz per mel),
logarithmic above (27 mels per factor 6.4), each triangle scaled by 2 / its width in Hz (equal
areas). At 128 bins, n_fft 512 and 24 kHz the HTK scale would leave low filters narrower than
one FFT bin; Slaney's linear low range keeps every filter non-empty.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

_F_SP = 200.0 / 3.0  # Hz per mel in the linear range
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOG_STEP = math.log(6.4) / 27.0
_EPS = 1e-10  # added to mel magnitudes before the log
_NORM_EPS = 1e-5  # added to the std (dB) when standardising


def hz_to_mel(f: Tensor) -> Tensor:
    """Slaney mel of frequencies f (Hz)."""
    f = torch.as_tensor(f, dtype=torch.float64)
    log_part = _MIN_LOG_MEL + torch.log(f.clamp(min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return torch.where(f < _MIN_LOG_HZ, f / _F_SP, log_part)


def mel_to_hz(m: Tensor) -> Tensor:
    """Inverse of hz_to_mel."""
    m = torch.as_tensor(m, dtype=torch.float64)
    log_part = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (m - _MIN_LOG_MEL))
    return torch.where(m < _MIN_LOG_MEL, m * _F_SP, log_part)


def mel_filterbank(sr: int = 24000, n_fft: int = 512, n_mels: int = 128) -> Tensor:
    """Slaney-scale, area-normalised triangular filters: (n_fft // 2 + 1, n_mels) float32.

    Filter m rises from edge m to its centre m + 1 and falls to edge m + 2, where the
    n_mels + 2 edges are equally spaced in mel between 0 and sr / 2.
    """
    fft_hz = torch.linspace(0.0, sr / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(0.0, hz_to_mel(sr / 2.0).item(), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1)
    rise = (fft_hz[None, :] - lo) / (mid - lo)
    fall = (hi - fft_hz[None, :]) / (hi - mid)
    tri = torch.minimum(rise, fall).clamp(min=0.0)  # (M, K)
    return (tri * (2.0 / (hi - lo))).T.contiguous().float()


@lru_cache(maxsize=16)
def _mel_bands(sr: int, n_fft: int, n_mels: int) -> tuple[tuple[int, int, int, int, Tensor], ...]:
    """mel_filterbank(sr, n_fft, n_mels) cut into blocks of 16 filters, each with the FFT
    bins where any of them is non-zero: (m0, m1, k0, k1, fb[k0:k1, m0:m1]) per block (CPU
    tensors, cached, never mutated). The blocks hold about 1/8 of the dense matrix (128 mels,
    n_fft 512); a block of empty filters (n_mels large for n_fft) keeps no bins: columns 0."""
    fb = mel_filterbank(sr, n_fft, n_mels)
    bands = []
    for m0 in range(0, n_mels, 16):
        m1 = min(m0 + 16, n_mels)
        bins = fb[:, m0:m1].sum(dim=1).nonzero()[:, 0]
        k0, k1 = (int(bins[0]), int(bins[-1]) + 1) if len(bins) else (0, 0)
        bands.append((m0, m1, k0, k1, fb[k0:k1, m0:m1].contiguous()))
    return tuple(bands)


def _banded_mel(x: Tensor, sr: int, n_fft: int, n_mels: int) -> Tensor:
    """x @ mel_filterbank(sr, n_fft, n_mels) through its non-zero blocks: x (X, K) -> (X, M).

    Frames stay rows, so the result is already in the (..., F, M) output layout."""
    out = torch.empty(x.shape[0], n_mels, dtype=x.dtype, device=x.device)
    for m0, m1, k0, k1, w in _mel_bands(sr, n_fft, n_mels):
        torch.mm(x[:, k0:k1], w.to(x), out=out[:, m0:m1])
    return out


@lru_cache(maxsize=4)
def _hann(n_fft: int) -> Tensor:
    """Periodic Hann window (n_fft,) float32 on the CPU (cached, never mutated)."""
    return torch.hann_window(n_fft, periodic=True)


def stft(wave: Tensor, n_fft: int = 512, hop: int = 240) -> Tensor:
    """Complex spectra (C, K, F) of wave (C, N): periodic Hann window of n_fft, frames centred
    at k * hop (reflect padding), F = N // hop (the extra centred frame at the very end is
    dropped, so 1 s at 24 kHz gives exactly 100 frames), K = n_fft // 2 + 1."""
    n = wave.shape[-1]
    if n <= n_fft // 2:
        raise ValueError(f"stft needs more than n_fft // 2 = {n_fft // 2} samples, got {n}")
    x = wave.float()
    window = _hann(n_fft).to(x.device)
    return torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", return_complex=True)[..., : n // hop]


def _mixed_spectra(spec: Tensor, rows: Tensor) -> Tensor:
    """Real and imaginary parts of rows @ spec, frames before bins: spec (C, K, F) complex,
    rows (R, C) real -> (2, R, F * K). torch.stft's output is stored frame-major (a (C, F, K)
    array seen transposed), so reading it in that order is a plain de-interleaving copy."""
    c = spec.shape[0]
    planes = torch.view_as_real(spec.transpose(1, 2)).permute(3, 0, 1, 2).reshape(2, c, -1)
    return torch.matmul(rows.to(planes), planes.contiguous())


def log_mel_mixed(
    wave: Tensor,
    mix: Tensor,
    sr: int = 24000,
    n_fft: int = 512,
    hop: int = 240,
    n_mels: int = 128,
    normalize: bool = False,
    spec: Tensor | None = None,
) -> Tensor:
    """Log-mel spectrograms of the mixed waves mix @ wave from a single STFT of the C channels
    of wave (the STFT is linear): magnitude, Slaney mel filters, then 10 * log10(x + _EPS).

    wave: (C, N); mix: (..., D, C) real weights (e.g. (V, 4, 4) ambisonic rotations, or
    (V, 1, 4) beams). Returns (..., D, F, n_mels) with F = N // hop. normalize=True
    standardises each mel bin per leading index over D and F together (so level differences
    between channels, direction cues, survive), _NORM_EPS added to the std. `spec`:
    stft(wave, n_fft, hop) when the caller has it already.
    """
    c = wave.shape[0]
    if mix.shape[-1] != c:
        raise ValueError(f"mix (..., D, {mix.shape[-1]}) does not match {c} wave channels")
    spec = stft(wave, n_fft, hop) if spec is None else spec  # (C, K, F)
    lead, d = mix.shape[:-2], mix.shape[-2]
    re, im = _mixed_spectra(spec, mix.reshape(-1, c))  # (B * D, F * K) each
    power = re.mul_(re).addcmul_(im, im)
    logs = _log_mel_of_power(power, spec.shape[1], d, sr, n_fft, n_mels, normalize)
    return logs.view(*lead, d, spec.shape[2], n_mels)


def _log_mel_of_power(power: Tensor, k: int, d: int, sr: int, n_fft: int, n_mels: int,
                      normalize: bool) -> Tensor:
    """|spectra|^2 (B * D, F * K), frames before bins (overwritten) -> log-mels (B, D * F, M)
    in dB, or standardised per leading index and mel bin over D and F when normalize."""
    mel = _banded_mel(power.sqrt_().view(-1, k), sr, n_fft, n_mels)  # (B * D * F, M)
    count = mel.shape[0] // (power.shape[0] // d)  # D * F
    logs = mel.add_(_EPS).log_().view(-1, count, n_mels)  # natural log
    db = 10.0 / math.log(10.0)  # 10 log10 x = db ln x
    if not normalize:
        return logs.mul_(db)
    # standardising removes db except next to _NORM_EPS; the variance from the centred values,
    # as float32 E[x^2] - E[x]^2 loses up to 6e-4 of a unit on quiet clips
    logs.sub_(logs.sum(dim=1, keepdim=True).div_(count))
    var = (logs * logs).sum(dim=1, keepdim=True).div_(count)
    return logs.mul_(var.sqrt_().add_(_NORM_EPS / db).reciprocal_())


def log_mel_intensity_mixed(spec: Tensor, mix: Tensor, sr: int = 24000, n_fft: int = 512,
                            n_mels: int = 128) -> Tensor:
    """The sign-preserving "intensity" input from one mixing pass: log_mel_mixed(normalize=True)
    of the rotated ambiX channels, then the active intensity vector per mel band (the DCASE
    SELD baselines' feature). spec: stft of ambiX (W, Y, Z, X) (4, K, F); mix: (V, 4, 4) maps
    to each viewpoint's ambiX. Returns (V, 7, F, n_mels): the 4 log-mels, then (Y, Z, X) of
    mel-weighted Re(conj(W) [Y, Z, X]) over mel-weighted (|W|^2 + |Y|^2 + |Z|^2 + |X|^2) / 2:
    a plane wave from unit direction u gives u (signed), a diffuse field about 0."""
    k, frames = spec.shape[1:]
    v = mix.shape[0]
    re, im = (x.view(v, 4, -1) for x in _mixed_spectra(spec, mix.reshape(-1, 4)))  # (V, 4, F * K)
    # parts (V, 4, F * K): Re(conj(W) [Y, Z, X]), then the energy; re is left holding |.|^2
    parts = torch.empty_like(re)
    torch.mul(re[:, 1:], re[:, :1], out=parts[:, :3]).addcmul_(im[:, 1:], im[:, :1])
    torch.sum(re.mul_(re).addcmul_(im, im), dim=1, out=parts[:, 3]).mul_(0.5)
    logs = _log_mel_of_power(re.view(v * 4, -1), k, 4, sr, n_fft, n_mels, True)
    mel = _banded_mel(parts.view(-1, k), sr, n_fft, n_mels).view(v, 4, frames, n_mels)
    intensity = torch.div(mel[:, :3], mel[:, 3:].add_(_EPS))
    return torch.cat((logs.view(v, 4, frames, n_mels), intensity), dim=1)

