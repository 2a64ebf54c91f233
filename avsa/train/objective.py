"""One training objective per pretext task, on a batch of tensors from the pipeline.

Batches hold `video` (B, V, 3, T, S, S) uint8, `audio` (B, V, C, F, M) float32 log-mel,
`directions` (B, V, 2) radians and, for AVTS, `audio_other` (B, V, C, F, M).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from avsa.config import Config, ModelConfig
from avsa.config import audio_channels as data_audio_channels
from avsa.losses import avc_objective, avsa_objective, avts_loss
from avsa.models import AVSANet, build_model

# Kinetics statistics, the usual normalisation for video encoders trained from scratch.
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)


def model_from_config(m: ModelConfig, audio_channels: int = 4) -> AVSANet:
    return build_model(
        "full",
        video_width=m.video_width,
        audio_width=m.audio_width,
        embed_dim=m.embed_dim,
        audio_channels=audio_channels,
        use_transformer=m.use_transformer,
        transformer_depth=m.transformer_depth,
        transformer_heads=m.transformer_heads,
        transformer_dropout=m.transformer_dropout,
        spherical_pos_enc=m.spherical_pos_enc,
    )


def audio_channels(cfg: Config) -> int:
    return data_audio_channels(cfg.data)


def normalize_video(video: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """uint8 (B, V, 3, T, S, S) -> float normalised with per-channel mean and std.

    channels_last (None: on CUDA) lays the result out as (B, V, T, S, S, 3) in memory, so each
    clip the video encoder sees is `torch.channels_last_3d` (NDHWC), cuDNN's fast layout for
    bf16 3-D convolutions. Values and shape are the same either way. No host-device sync: the
    constants reach the device with a non-blocking copy.
    """
    if channels_last is None:
        channels_last = video.is_cuda
    if channels_last:
        video = video.permute(0, 1, 3, 4, 5, 2).contiguous().permute(0, 1, 5, 2, 3, 4)
    shape = (1, 1, 3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD)
    scale = (1.0 / (255.0 * std)).view(shape).to(video.device, non_blocking=True)
    shift = (torch.tensor(VIDEO_MEAN) / std).view(shape).to(video.device, non_blocking=True)
    return video.float().mul_(scale).sub_(shift)


def use_channels_last(device: torch.device) -> bool:
    """Whether the video path runs channels_last_3d (NDHWC): on CUDA only."""
    return device.type == "cuda"


def to_channels_last(model: AVSANet) -> AVSANet:
    """The video encoder's 5-D weights in channels_last_3d, in place (before DDP wrapping).

    Inputs from `normalize_video(..., channels_last=True)` then meet weights in the same layout
    and no convolution converts either per call. Returns `model`.
    """
    model.video_encoder.to(memory_format=torch.channels_last_3d)
    return model


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def compute_objective(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    kind: str,
    temperature: float,
    easy_negatives: str = "same_view",
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics (0-d tensors) of `kind` in {"avsa", "avc", "avts"}.

    AVC pairs every viewpoint with its own audio against the other clips' (B x V pairs, so
    the curriculum's AVC phase sees as many pairs as its AVSA phase); AVTS uses the first
    viewpoint only; neither uses the viewpoint context, so the same network serves both
    phases of the curriculum. `model` may be DDP-wrapped: it is always called
    through `forward`. `channels_last`: the video layout (see `normalize_video`).
    """
    video = normalize_video(batch["video"], channels_last)
    audio = batch["audio"]
    if kind == "avsa":
        out = model(video, audio, batch.get("directions"))
        return avsa_objective(out, temperature, gather=gather, easy_negatives=easy_negatives)
    if kind == "avc":  # every viewpoint is an AVC pair: B x V of them (one when V = 1)
        return avc_objective(model(video, audio, None, use_context=False), temperature, gather)
    video, audio = video[:, :1], audio[:, :1]
    if kind == "avts":
        out = model(video, audio, None, use_context=False, audio_other=batch["audio_other"][:, :1])
        return avts_loss(
            out["video_target"][:, 0],
            out["audio_target"][:, 0],
            out["audio_other_target"][:, 0],
            temperature,
            gather=gather,
        )
    raise ValueError(f"unknown objective {kind!r}")


def reset_context_and_heads(model: AVSANet, seed: int) -> None:
    """Fresh transformers and heads (the curriculum's switch from AVC to AVSA); the same seed
    on every rank keeps DDP replicas identical."""
    torch.manual_seed(seed)
    for name, child in model.named_children():
        if name.endswith("_encoder"):
            continue
        for sub in child.modules():
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
            if callable(reset):
                reset()
