"""The end-of-pretraining figure: what the network matches, on one validation clip.

One column per viewpoint of the clip: the crop's middle frame, the log-mel energy of the
audio heard from that direction (channel W, time along x), and the audio viewpoint the
network's prediction from that crop's context is most similar to (green when it is the
crop's own, red otherwise). Logged as ``viewpoint_matches.png`` on the pretraining run.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from avsa.config import Config
    from avsa.tracking import RunLogger

FIGURE = "viewpoint_matches.png"


@torch.no_grad()
def predicted_matches(model, batch: dict) -> torch.Tensor:
    """(B, V) index of the audio viewpoint whose embedding is closest to each crop's
    predicted audio embedding (the AVSA objective's choice)."""
    from avsa.models.inputs import normalize_video

    model.eval()
    out = model(normalize_video(batch["video"], None), batch["audio"], batch.get("directions"))
    pred = torch.nn.functional.normalize(out["audio_pred"], dim=-1)  # (B, V, D)
    target = torch.nn.functional.normalize(out["audio_target"], dim=-1)
    return torch.einsum("bvd,bwd->bvw", pred, target).argmax(-1)


def render(batch: dict, matches: torch.Tensor, path: Path) -> None:
    """The figure of the batch's first clip; matches: (B, V) as `predicted_matches`."""
    from matplotlib.figure import Figure

    video = batch["video"][0].float()  # (V, 3, T, S, S)
    audio = batch["audio"][0].float()  # (V, C, F, M)
    v = video.shape[0]
    fig = Figure(figsize=(2.2 * v, 4.4))
    axes = fig.subplots(2, v, squeeze=False)
    for j in range(v):
        frame = video[j, :, video.shape[2] // 2].permute(1, 2, 0).numpy()
        frame = (frame - frame.min()) / max(float(frame.max() - frame.min()), 1e-6)
        match = int(matches[0, j])
        axes[0, j].imshow(frame)
        axes[0, j].set_title(f"view {j} -> audio {match}", fontsize=8,
                             color="green" if match == j else "red")
        axes[1, j].imshow(audio[j, 0].T.numpy(), origin="lower", aspect="auto", cmap="magma")
        axes[1, j].set_title(f"audio {j} (W log-mel)", fontsize=8)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    fig.suptitle(f"clip {batch['key'][0] if 'key' in batch else 0}: predicted audio viewpoint "
                 f"per crop", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def log_figure(logger: RunLogger, cfg: Config, checkpoint_uri: str) -> bool:
    """Render the figure for the network at ``checkpoint_uri`` on the first validation clip
    (training shards when there are none) and log it; False when there is nothing to show."""
    from avsa.config import audio_channels
    from avsa.data.pipeline import iter_local
    from avsa.models import build_model
    from avsa.train.checkpoint import resolve_init

    if cfg.loss.kind != "avsa" or cfg.data.num_viewpoints < 2:
        return False
    state, _ = resolve_init(checkpoint_uri)
    model = build_model(cfg.model, audio_channels(cfg.data))
    model.load_state_dict(state["model"])
    data = replace(cfg.data, augment=False)
    batch = next(iter(iter_local(cfg.data.val_shards or cfg.data.shards, data, epochs=1, seed=0,
                                 batch_size=2, shuffle=False)), None)
    if batch is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FIGURE
        render(batch, predicted_matches(model, batch), path)
        return logger.log_artifact(path)

