"""Model presets and the builder: `build_model("full")` is the paper's network."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from avsa.errors import ConfigError
from avsa.models.audio import AudioEncoder
from avsa.models.avsa_net import AVSANet
from avsa.models.transformer import SphericalPositionalEncoding, ViewpointTransformer
from avsa.models.video import VideoEncoder


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build an AVSANet; field names match its constructor."""

    video_width: int = 64  # R(2+1)D base channels; features are 8x (512)
    audio_width: int = 64  # audio CNN base channels; features are 8x (512)
    embed_dim: int = 128  # output size of the four projection heads
    video_layers: tuple[int, int, int, int] = (2, 2, 2, 2)  # blocks per stage (R(2+1)D-18)
    audio_channels: int = 4  # 4 = FOA (W, Y, Z, X), 2 = stereo, 1 = mono
    use_transformer: bool = True  # False: AVC baseline, no viewpoint context
    transformer_depth: int = 2
    transformer_heads: int = 1
    transformer_dropout: float = 0.1
    transformer_ffn_mult: int = 4
    spherical_pos_enc: bool = False  # encode viewpoint directions (not in the paper)


PRESETS: dict[str, ModelSpec] = {
    "full": ModelSpec(),
    "tiny": ModelSpec(video_width=8, audio_width=8, embed_dim=32),
}


def model_spec(preset: str | ModelSpec = "full", **overrides: object) -> ModelSpec:
    """A preset by name (or a spec) with fields replaced by `overrides`.

    Raises ConfigError naming `model.preset` or the unknown field.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(
                "model.preset", f"unknown preset {preset!r}; one of {sorted(PRESETS)}"
            )
        preset = PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"model.{key}", "not a model field")
    if "video_layers" in overrides:
        overrides["video_layers"] = tuple(overrides["video_layers"])  # type: ignore[arg-type]
    return dataclasses.replace(preset, **overrides)


def build_model(preset: str | ModelSpec = "full", **overrides: object) -> AVSANet:
    """Build an AVSANet from a preset name or spec, e.g. build_model("tiny", use_transformer=False)."""
    spec = model_spec(preset, **overrides)
    return AVSANet(**dataclasses.asdict(spec))


__all__ = [
    "PRESETS",
    "AVSANet",
    "AudioEncoder",
    "ModelSpec",
    "SphericalPositionalEncoding",
    "VideoEncoder",
    "ViewpointTransformer",
    "build_model",
    "model_spec",
]
