"""AVSANet: video and audio encoders, two viewpoint transformers and four projection heads.

For clip i and viewpoint j the network returns targets (each modality's own embedding through
its target head) and cross-modal predictions: `video_pred` is made from the audio embeddings of
all viewpoints (audio transformer, then the video prediction head), `audio_pred` from the video
ones. Without transformers (the AVC baseline) each prediction is the other modality's feature
through the prediction head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from avsa.config import ModelConfig
from avsa.errors import CheckpointError
from avsa.models.audio import AudioEncoder
from avsa.models.transformer import ViewpointTransformer
from avsa.models.video import VideoEncoder

ENCODERS = ("video_encoder", "audio_encoder")


class AVSANet(nn.Module):
    """Audio-visual spatial alignment network as `m` describes it (see `ModelConfig`), taking
    `audio_channels` spectrogram channels per viewpoint (4 FOA, 2 stereo, 1 mono).
    `m.use_transformer=False` is the AVC baseline: no context across viewpoints."""

    def __init__(self, m: ModelConfig, audio_channels: int = 4):
        super().__init__()
        self.video_encoder = VideoEncoder(m.video_width)
        self.audio_encoder = AudioEncoder(m.audio_width, audio_channels, m.audio_pool)
        dv, da = self.video_encoder.out_dim, self.audio_encoder.out_dim
        self.video_transformer: ViewpointTransformer | None = None
        self.audio_transformer: ViewpointTransformer | None = None
        if m.use_transformer:
            kw = dict(depth=m.transformer_depth, heads=m.transformer_heads,
                      dropout=m.transformer_dropout, spherical_pos_enc=m.spherical_pos_enc)
            self.video_transformer = ViewpointTransformer(dv, **kw)
            self.audio_transformer = ViewpointTransformer(da, **kw)
        self.video_head = nn.Linear(dv, m.embed_dim)
        self.audio_head = nn.Linear(da, m.embed_dim)
        self.video_pred_head = nn.Linear(da, m.embed_dim)
        self.audio_pred_head = nn.Linear(dv, m.embed_dim)
        self.video_dim, self.audio_dim, self.embed_dim = dv, da, m.embed_dim

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, V, 3, T, S, S) -> (B, V, Dv); the encoder sees one (B*V) batch."""
        b, v = video.shape[:2]
        return self.video_encoder(video.flatten(0, 1)).view(b, v, -1)

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, V, C, F, M) log-mel -> (B, V, Da)."""
        b, v = audio.shape[:2]
        return self.audio_encoder(audio.flatten(0, 1)).view(b, v, -1)

    def context(
        self,
        video_feat: torch.Tensor,
        audio_feat: torch.Tensor,
        directions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Viewpoint context (B, V, Dv), (B, V, Da); the features themselves without transformers."""
        if self.video_transformer is None:
            return video_feat, audio_feat
        return (
            self.video_transformer(video_feat, directions),
            self.audio_transformer(audio_feat, directions),
        )

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        directions: torch.Tensor | None = None,
        *,
        use_context: bool = True,
        audio_other: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """video (B, V, 3, T, S, S), audio (B, V, C, F, M), directions (B, V, 2) radians or None.

        use_context=False skips the transformers (AVC/AVTS objectives, and the AVC phase of the
        curriculum); audio_other (B, V, C, F, M), audio at another time (AVTS), adds
        `audio_other_target`. Both go through `forward` so DDP sees every use of the weights.

        Returns video_feat (B, V, Dv), audio_feat (B, V, Da), video_context, audio_context
        (transformer outputs, same shapes), and (B, V, embed_dim) video_target, audio_target,
        video_pred (from audio), audio_pred (from video).
        """
        if video.dim() != 6 or audio.dim() != 5 or video.shape[:2] != audio.shape[:2]:
            raise ValueError(
                f"AVSANet: expected video (B, V, 3, T, S, S) and audio (B, V, C, F, M), "
                f"got {tuple(video.shape)} and {tuple(audio.shape)}"
            )
        video_feat = self.encode_video(video)
        audio_feat = self.encode_audio(audio)
        video_ctx, audio_ctx = (self.context(video_feat, audio_feat, directions) if use_context
                                else (video_feat, audio_feat))
        out = {
            "video_feat": video_feat,
            "audio_feat": audio_feat,
            "video_context": video_ctx,
            "audio_context": audio_ctx,
            "video_target": self.video_head(video_feat),
            "audio_target": self.audio_head(audio_feat),
            "video_pred": self.video_pred_head(audio_ctx),
            "audio_pred": self.audio_pred_head(video_ctx),
        }
        if audio_other is not None:
            out["audio_other_target"] = self.audio_head(self.encode_audio(audio_other))
        return out

    def load_encoders(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the encoder weights (keys prefixed 'video_encoder.' / 'audio_encoder.') of a
        full or encoders-only state dict; transformers and heads keep their (fresh) weights.
        Raises CheckpointError when a key is missing or unexpected, or a shape differs."""
        for name in ENCODERS:
            prefix = name + "."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                getattr(self, name).load_state_dict(sub, strict=True)
            except RuntimeError as err:
                reason = " ".join(str(err).split())
                if len(reason) > 300:
                    reason = reason[:300] + "..."
                raise CheckpointError(name, f"cannot load encoder weights: {reason}") from None
