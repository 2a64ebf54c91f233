"""One training objective per pretext task, on a batch of tensors from the pipeline.

Batches hold `video` (B, V, 3, T, S, S) uint8, `audio` (B, V, C, F, M) float32 log-mel,
`directions` (B, V, 2) radians and, for AVTS, `audio_other` (B, V, C, F, M).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from avsa.losses import avc_objective, avsa_objective, avts_loss
from avsa.models import AVSANet
from avsa.models.inputs import normalize_video


def compute_objective(model: nn.Module, batch: Mapping[str, torch.Tensor], *, kind: str,
                      temperature: float, easy_negatives: str = "same_view",
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      channels_last: bool | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics (0-d tensors) of `kind` in {"avsa", "avc", "avts"}.

    AVC pairs every viewpoint with its own audio (B x V pairs, as many as AVSA sees); AVTS uses
    the first viewpoint; neither uses the viewpoint context. `model` may be DDP-wrapped.
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
        return avts_loss(out["video_target"][:, 0], out["audio_target"][:, 0],
                         out["audio_other_target"][:, 0], temperature, gather=gather)
    raise ValueError(f"unknown objective {kind!r}")


def leaves_parameters_unused(kind: str, use_transformer: bool, curriculum: bool) -> bool:
    """Whether some parameter of the model gets no gradient from the objective `kind` (DDP must
    then look for such parameters after every backward pass): AVC and AVTS skip the viewpoint
    transformers, AVTS scores targets only and skips the prediction heads, and the
    curriculum's AVC phase skips the transformers of its AVSA model."""
    return curriculum or kind == "avts" or (kind == "avc" and use_transformer)


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
