"""Batches from the pipeline as the network takes them: on its device, video normalised.

Batches hold `video` (B, V, 3, T, S, S) uint8 and float tensors (`audio`, `directions`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from avsa.models.avsa_net import AVSANet

# Kinetics statistics, the usual normalisation for video encoders trained from scratch.
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)


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
    """`model` with its video encoder's 5-D weights in channels_last_3d, in place (before DDP
    wrapping): inputs from `normalize_video(..., channels_last=True)` then meet weights in the
    same layout and no convolution converts either per call."""
    model.video_encoder.to(memory_format=torch.channels_last_3d)
    return model


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (asynchronous copies from pinned memory on CUDA);
    anything else in it is dropped."""
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }
