"""The network, built from a `ModelConfig` (presets: `configs/model/*.yaml`)."""

from __future__ import annotations

from torch import nn

from avsa.config import ModelConfig
from avsa.models.audio import AudioEncoder
from avsa.models.avsa_net import AVSANet
from avsa.models.transformer import ViewpointTransformer
from avsa.models.video import VideoEncoder


def build_model(m: ModelConfig, audio_channels: int = 4) -> AVSANet:
    """The AVSANet that `m` describes, taking `audio_channels` spectrogram channels per
    viewpoint (4: FOA log-mel; see `avsa.config.audio_channels`)."""
    return AVSANet(m, audio_channels)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's and torch.compile's wrappers (any nesting): the one whose
    parameter names checkpoints hold and the curriculum's reset reads."""
    while isinstance(inner := getattr(model, "_orig_mod", None) or getattr(model, "module", None),
                     nn.Module):
        model = inner
    return model


__all__ = [
    "AVSANet",
    "AudioEncoder",
    "VideoEncoder",
    "ViewpointTransformer",
    "build_model",
    "unwrap",
]
