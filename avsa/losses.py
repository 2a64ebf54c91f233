"""Contrastive pretext losses: AVSA, AVC and AVTS. Pure functions of embeddings.

All embeddings are L2-normalised here; logits are cosine similarities / temperature. Metrics
are detached 0-dim tensors holding fractions in [0, 1]. Under DDP pass
`gather=gather_with_grad`: candidates (targets) are gathered from every rank with gradients, so
the negative pool is the global batch, and each rank's anchors find their positives at
`rank * local_batch`. With equal local batches, the mean of the per-rank losses equals the loss
of one process over the whole batch, and DDP's gradient averaging gives its exact gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch.nn import functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]
EASY_NEGATIVES = ("same_view", "all_views")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient over ranks and keeps this rank's rows.

    torch.distributed.nn.functional.all_gather is not used: on gloo its backward receives into
    buffers shaped like non-contiguous gradients (as einsum produces) and scrambles them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (N, ...) from all ranks along dim 0 (rank order), keeping gradients;
    x itself when torch.distributed is not initialised or has one process. Every rank must
    pass the same shape and call backward, as with any collective."""
    if not _distributed():
        return x
    return _AllGather.apply(x.contiguous())


def _own_index(local_n: int, gathered_n: int, device: torch.device) -> torch.Tensor:
    """Rows of this rank's samples inside a gathered batch: (local_n,) long. A batch that was
    not enlarged by gathering holds them first; a gathered one at rank * local_n."""
    offset = dist.get_rank() * local_n if gathered_n > local_n and _distributed() else 0
    if offset + local_n > gathered_n:
        raise ValueError(
            f"gathered batch of {gathered_n} cannot hold rows {offset}..{offset + local_n}"
        )
    return offset + torch.arange(local_n, device=device)


def _others_index(own: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n - 1) long: for each row b, the indices 0..n-1 without own[b], in order."""
    ar = torch.arange(n - 1, device=own.device)
    return ar[None, :] + (ar[None, :] >= own[:, None]).long()


def _beats_all(pos: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Fraction of anchors whose positive (...,) is strictly above every negative (..., K)."""
    return (negatives < pos[..., None]).all(dim=-1).float().mean()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def avsa_logits(
    pred: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    *,
    gather: Gather | None = None,
    easy_negatives: str = "same_view",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate logits of the AVSA task.

    pred, target: (B, V, D); anchor pred[i, j] has positive target[i, j], hard negatives
    target[i, k != j] and easy negatives target[i' != i, j] ("same_view") or target[i' != i, :]
    ("all_views"), i' over the gathered batch of N clips.
    Returns logits (B, V, K) laid out as [target[i, 0..V-1], easy negatives in clip order] with
    K = V + N - 1 ("same_view") or V * N ("all_views"), and labels (B, V) = j.
    """
    if easy_negatives not in EASY_NEGATIVES:
        raise ValueError(f"easy_negatives must be one of {EASY_NEGATIVES}, got {easy_negatives!r}")
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be (B, V, D), got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    _check_temperature(temperature)
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    b, v, _ = p.shape
    t_all = gather(t) if gather is not None else t  # (N, V, D)
    n = t_all.shape[0]
    others = _others_index(_own_index(b, n, p.device), n)  # (B, N-1)
    hard = torch.einsum("ijd,ikd->ijk", p, t)  # (B, V, V); includes the positive at k = j
    if easy_negatives == "same_view":
        easy = torch.einsum("ijd,njd->ijn", p, t_all)  # (B, V, N)
        easy = easy.gather(2, others[:, None, :].expand(b, v, n - 1))
    else:
        easy = torch.einsum("ijd,nkd->ijnk", p, t_all)  # (B, V, N, V)
        easy = easy.gather(2, others[:, None, :, None].expand(b, v, n - 1, v)).flatten(2)
    logits = torch.cat((hard, easy), dim=-1) / temperature
    labels = torch.arange(v, device=p.device).expand(b, v)
    return logits, labels


def avsa_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    *,
    gather: Gather | None = None,
    easy_negatives: str = "same_view",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AVSA cross-entropy over `avsa_logits` candidates, mean over the B * V local anchors.

    Metrics: avsa_acc (positive above every other viewpoint of the same clip) and avc_acc
    (positive above the same viewpoint of every other clip).
    """
    logits, labels = avsa_logits(
        pred, target, temperature, gather=gather, easy_negatives=easy_negatives
    )
    v = pred.shape[1]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    with torch.no_grad():
        hard, easy = logits[..., :v], logits[..., v:]
        if easy_negatives == "all_views":  # (B, V, (N-1) V) -> same-view columns (B, V, N-1)
            easy = easy.unflatten(-1, (-1, v)).diagonal(dim1=1, dim2=3).transpose(1, 2)
        pos = hard.diagonal(dim1=1, dim2=2)  # (B, V)
        eye = torch.eye(v, dtype=torch.bool, device=hard.device)
        hard_neg = hard.masked_fill(eye, float("-inf"))
        metrics = {"avsa_acc": _beats_all(pos, hard_neg), "avc_acc": _beats_all(pos, easy)}
    return loss, metrics


def avsa_objective(
    out: Mapping[str, torch.Tensor],
    temperature: float,
    gather: Gather | None = None,
    easy_negatives: str = "same_view",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric AVSA loss on AVSANet outputs: the mean of A2V (video_pred, made from audio,
    vs video_target) and V2A (audio_pred vs audio_target). Works for V = 1 (AVC with heads).

    Metrics: avsa_acc, avc_acc (averaged over directions) plus per direction
    {a2v,v2a}_{loss,avsa_acc,avc_acc}.
    """
    kw = dict(gather=gather, easy_negatives=easy_negatives)
    a2v, m_a2v = avsa_loss(out["video_pred"], out["video_target"], temperature, **kw)
    v2a, m_v2a = avsa_loss(out["audio_pred"], out["audio_target"], temperature, **kw)
    metrics = {k: (m_a2v[k] + m_v2a[k]) / 2 for k in m_a2v}
    for name, loss, m in (("a2v", a2v, m_a2v), ("v2a", v2a, m_v2a)):
        metrics[f"{name}_loss"] = loss.detach()
        metrics.update({f"{name}_{k}": val for k, val in m.items()})
    return (a2v + v2a) / 2, metrics


def avc_views_loss(
    pred: torch.Tensor, target: torch.Tensor, temperature: float, *, gather: Gather | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AVC over every viewpoint of every clip: B * V anchors. pred, target (B, V, D); anchor
    pred[i, j] has positive target[i, j] and negatives target[i', j] of the N - 1 other
    (gathered) clips; the clip's other viewpoints are not candidates (that is AVSA's task).
    With V = 1 this is avsa_loss. Metric: avc_acc."""
    logits, _ = avsa_logits(pred, target, temperature, gather=gather)
    v = pred.shape[1]
    pos = logits[..., :v].diagonal(dim1=1, dim2=2)  # (B, V)
    easy = logits[..., v:]  # (B, V, N - 1)
    cand = torch.cat((pos[..., None], easy), dim=-1).flatten(0, 1)  # (B V, N)
    loss = F.cross_entropy(cand, torch.zeros(len(cand), dtype=torch.long, device=cand.device))
    return loss, {"avc_acc": _beats_all(pos, easy)}


def avc_objective(
    out: Mapping[str, torch.Tensor], temperature: float, gather: Gather | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric avc_views_loss on AVSANet outputs (A2V and V2A averaged): the AVC pretext and
    the curriculum's AVC phase, which sees all B x V (view, audio) pairs of an AVSA batch."""
    a2v, m_a2v = avc_views_loss(out["video_pred"], out["video_target"], temperature, gather=gather)
    v2a, m_v2a = avc_views_loss(out["audio_pred"], out["audio_target"], temperature, gather=gather)
    return (a2v + v2a) / 2, {"avc_acc": (m_a2v["avc_acc"] + m_v2a["avc_acc"]) / 2}


def _cross_modal(
    anchor: torch.Tensor, cand: torch.Tensor, gather: Gather | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N) of normalised anchors vs gathered candidates, and positive indices (B,)."""
    cand_all = gather(cand) if gather is not None else cand
    return anchor @ cand_all.T, _own_index(anchor.shape[0], cand_all.shape[0], anchor.device)


def _avc_acc(logits: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    pos = logits.gather(1, own[:, None]).squeeze(1)
    others = logits.gather(1, _others_index(own, logits.shape[1]))
    return _beats_all(pos, others)


def avts_loss(
    video: torch.Tensor,
    audio: torch.Tensor,
    audio_other_time: torch.Tensor,
    temperature: float,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AVC plus a temporal hard negative: video i also contrasts with the audio of its own clip
    at another time. V2A candidates are [audio of all clips, own other-time audio]; A2V is plain
    InfoNCE over videos. The two directions are averaged.

    video, audio, audio_other_time: (B, D). Metrics: avc_acc (both directions) and avts_acc
    (video closer to its synchronous audio than to its other-time audio).
    """
    xs = (video, audio, audio_other_time)
    if any(x.dim() != 2 or x.shape != video.shape for x in xs):
        raise ValueError(f"embeddings must all be (B, D), got {[tuple(x.shape) for x in xs]}")
    _check_temperature(temperature)
    v, a = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
    a_other = F.normalize(audio_other_time, dim=-1)
    va, own = _cross_modal(v, a, gather)
    av, _ = _cross_modal(a, v, gather)
    hard = (v * a_other).sum(-1, keepdim=True)  # (B, 1)
    va_hard = torch.cat((va, hard), dim=1)
    loss = (F.cross_entropy(va_hard / temperature, own)
            + F.cross_entropy(av / temperature, own)) / 2
    pos = va.gather(1, own[:, None])  # (B, 1)
    return loss, {"avc_acc": (_avc_acc(va, own) + _avc_acc(av, own)) / 2,
                  "avts_acc": (pos > hard).float().mean()}
