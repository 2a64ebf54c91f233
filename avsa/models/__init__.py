"""The network, built from a `ModelConfig` (presets: `configs/model/*.yaml`)."""

from __future__ import annotations

from avsa.config import ModelConfig
from avsa.models.audio import AudioEncoder
from avsa.models.avsa_net import AVSANet
from avsa.models.transformer import SphericalPositionalEncoding, ViewpointTransformer
from avsa.models.video import VideoEncoder


def build_model(m: ModelConfig, audio_channels: int = 4) -> AVSANet:
    """The AVSANet that `m` describes, taking `audio_channels` spectrogram channels per
    viewpoint (4: FOA log-mel; see `avsa.config.audio_channels`)."""
    return AVSANet(
        video_width=m.video_width,
        audio_width=m.audio_width,
        embed_dim=m.embed_dim,
        audio_channels=audio_channels,
        audio_pool=m.audio_pool,
        use_transformer=m.use_transformer,
        transformer_depth=m.transformer_depth,
        transformer_heads=m.transformer_heads,
        transformer_dropout=m.transformer_dropout,
        spherical_pos_enc=m.spherical_pos_enc,
    )


__all__ = [
    "AVSANet",
    "AudioEncoder",
    "SphericalPositionalEncoding",
    "VideoEncoder",
    "ViewpointTransformer",
    "build_model",
]
