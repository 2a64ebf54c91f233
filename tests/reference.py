"""Plain float references that the product's fast paths are tested against: the log-mel of
each wave on its own (avsa.audio mixes many from one STFT, sparsely) and colour jitter applied
in float (avsa.data.crops jitters uint8 crops with OpenCV)."""

from __future__ import annotations

import torch
from torch import Tensor

from avsa.audio import mel_filterbank, stft
from avsa.data.crops import GRAY, jitter_maps


def log_mel(wave: Tensor, sr: int = 24000, n_fft: int = 512, hop: int = 240, n_mels: int = 128,
            eps: float = 1e-10) -> Tensor:
    """Log-mel spectrogram: wave (..., N) -> (..., F, n_mels) with F = N // hop: the magnitude
    (power 1) of avsa.audio.stft through the dense Slaney filters, then 10 * log10(x + eps)."""
    n = wave.shape[-1]
    mag = stft(wave.reshape(-1, n), n_fft, hop).abs()  # (B, K, F)
    mel = mag.transpose(-1, -2) @ mel_filterbank(sr, n_fft, n_mels)  # (B, F, M)
    return (10.0 * torch.log10(mel + eps)).reshape(*wave.shape[:-1], n // hop, n_mels)


def normalize_log_mel(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardise each mel bin of x (..., C, F, M) with mean and std taken over channels C and
    frames F together, so level differences between channels (direction cues) survive."""
    mean = x.mean(dim=(-3, -2), keepdim=True)
    std = x.std(dim=(-3, -2), keepdim=True, correction=0)
    return (x - mean) / (std + eps)


def _jittered(crops: Tensor, factors: Tensor, scale: float, offset: float) -> Tensor:
    """scale * (A x + u m) + offset per crop: crops (V, 3, T, S, S), A, u from jitter_maps,
    m the crop's mean grey."""
    a, u = jitter_maps(factors)
    t = u * (crops.float().mean(dim=(2, 3, 4)) @ torch.tensor(GRAY))[:, None]
    x = crops.reshape(crops.shape[0], 3, -1)
    return torch.baddbmm(t[..., None] * scale + offset, (a * scale).to(x.dtype), x).view(crops.shape)


def color_jitter(crops: Tensor, factors: Tensor) -> Tensor:
    """crops (V, 3, T, S, S) float in [0, 1]; factors (V, 4) -> same shape, clamped once at the
    end (torchvision clamps after every step; only saturated pixels differ)."""
    return _jittered(crops, factors, 1.0, 0.0).clamp_(0.0, 1.0)


def to_uint8(crops: Tensor, factors: Tensor | None = None) -> Tensor:
    """crops (V, 3, T, S, S) float in [0, 1] -> uint8, colour-jittered on the way when factors
    are given."""
    if factors is None:
        return crops.mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
    return _jittered(crops, factors, 255.0, 0.5).clamp_(0.0, 255.0).to(torch.uint8)
