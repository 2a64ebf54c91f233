"""One training objective per pretext task, on a batch of tensors from the pipeline.

Batches hold `video` (B, V, 3, T, S, S) uint8, `audio` (B, V, C, F, M) float32 log-mel,
`directions` (B, V, 2) radians and, for AVTS, `audio_other` (B, V, C, F, M).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from avsa.config import Config, ModelConfig
from avsa.losses import avsa_objective, avts_loss
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
    return 4 if cfg.data.audio_mode == "foa" else 1


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, V, 3, T, S, S) -> float normalised with per-channel mean and std."""
    x = video.float().div_(255.0)
    shape = (1, 1, 3, 1, 1, 1)
    mean = torch.tensor(VIDEO_MEAN, device=x.device).view(shape)
    std = torch.tensor(VIDEO_STD, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics (0-d tensors) of `kind` in {"avsa", "avc", "avts"}.

    AVC and AVTS use the first viewpoint only and no viewpoint context, so the same network
    serves both phases of the curriculum. `model` may be DDP-wrapped: it is always called
    through `forward`.
    """
    video = normalize_video(batch["video"])
    audio = batch["audio"]
    if kind == "avsa":
        out = model(video, audio, batch.get("directions"))
        return avsa_objective(out, temperature, gather=gather, easy_negatives=easy_negatives)
    video, audio = video[:, :1], audio[:, :1]
    if kind == "avc":
        out = model(video, audio, None, use_context=False)
        loss, m = avsa_objective(out, temperature, gather=gather)
        return loss, {"avc_acc": m["avc_acc"]}
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
