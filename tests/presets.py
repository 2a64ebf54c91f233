"""The model presets of `configs/model/` for tests that build a network directly."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from avsa.config import ModelConfig, compose
from avsa.models import AVSANet, build_model


@cache
def _preset(name: str) -> ModelConfig:
    return compose([f"model={name}"]).model


def preset(name: str) -> ModelConfig:
    """`configs/model/<name>.yaml` as composed by `model=<name>` (a fresh copy)."""
    return replace(_preset(name))


def tiny_model(**changes) -> AVSANet:
    """The `tiny` preset with `changes` (ModelConfig fields), built for FOA input."""
    return build_model(replace(_preset("tiny"), **changes))


def encoder_state(model: AVSANet) -> dict:
    """The two encoders' entries of model.state_dict() (keys 'video_encoder.' / 'audio_encoder.')."""
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(("video_encoder.", "audio_encoder."))}
