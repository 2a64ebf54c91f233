"""Known-answer tests for the contrastive losses, including a 2-process gloo run."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from avsa.losses import (
    avc_views_loss,
    avsa_logits,
    avsa_loss,
    avsa_objective,
    avts_loss,
    gather_with_grad,
)


def one_hot_views(b: int, v: int) -> torch.Tensor:
    """(B, V, B*V) orthonormal embeddings: clip i, view j is basis vector i * V + j."""
    return torch.eye(b * v).view(b, v, b * v)


def loop_avsa_loss(pred, target, temperature, easy_negatives="same_view"):
    """Explicit per-anchor implementation of the AVSA loss."""
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    b, v, _ = p.shape
    total = 0.0
    for i in range(b):
        for j in range(v):
            cands = [t[i, k] for k in range(v)]
            for i2 in range(b):
                if i2 != i:
                    cands += [t[i2, j]] if easy_negatives == "same_view" else list(t[i2])
            logits = torch.stack([p[i, j] @ c for c in cands]) / temperature
            total = total - torch.log_softmax(logits, 0)[j]
    return total / (b * v)


def test_aligned_embeddings_give_zero_loss_and_full_accuracy():
    x = one_hot_views(3, 4)
    loss, m = avsa_loss(x, x.clone(), 0.01)
    assert loss.item() < 1e-6
    assert m["avsa_acc"].item() == 1.0 and m["avc_acc"].item() == 1.0
    assert m["avsa_acc"].dim() == 0


@pytest.mark.parametrize("shift", ["view", "clip"])
def test_shifted_targets_have_exact_loss_and_zero_accuracy(shift):
    b, v, temp = 3, 4, 0.5
    x = one_hot_views(b, v)
    target = x.roll(1, dims=1 if shift == "view" else 0)
    loss, m = avsa_loss(x, target, temp)
    k = v + b - 1  # one candidate matches the anchor (logit 1/T), the rest, positive included, 0
    assert loss.item() == pytest.approx(math.log(math.exp(1 / temp) + k - 1), rel=1e-5)
    assert loss.item() > math.log(k)
    assert m["avsa_acc"].item() == 0.0 and m["avc_acc"].item() == 0.0


def test_view_shift_only_hurts_avsa_accuracy():
    x = one_hot_views(4, 3) + 0.1  # positives now beat the other clips, not the other view
    target = x.roll(1, dims=1) * 0.5 + x * 0.3  # the next view of the same clip matches better
    _, m = avsa_loss(x, target, 0.07)
    assert m["avsa_acc"].item() == 0.0 and m["avc_acc"].item() == 1.0


@pytest.mark.parametrize(("mode", "count"), [("same_view", 4 + 5 - 1), ("all_views", 4 * 5)])
def test_logit_count_and_layout(mode, count):
    pred, target = torch.randn(5, 4, 8), torch.randn(5, 4, 8)
    logits, labels = avsa_logits(pred, target, 0.1, easy_negatives=mode)
    assert logits.shape == (5, 4, count)
    assert torch.equal(labels[2], torch.arange(4))
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    assert logits[1, 2, 3].item() == pytest.approx((p[1, 2] @ t[1, 3]).item() / 0.1, abs=1e-5)
    # easy negatives start with clip 0: view 2 only ("same_view") or views 0..3 ("all_views")
    col = 4 + (2 if mode == "all_views" else 0)
    assert logits[1, 2, col].item() == pytest.approx((p[1, 2] @ t[0, 2]).item() / 0.1, abs=1e-5)
    assert logits[1, 2, -1].item() == pytest.approx(
        (p[1, 2] @ t[4, -1 if mode == "all_views" else 2]).item() / 0.1, abs=1e-5
    )


@pytest.mark.parametrize("mode", ["same_view", "all_views"])
def test_matches_loop_implementation(mode):
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    loss, _ = avsa_loss(pred, target, 0.2, easy_negatives=mode)
    assert loss.item() == pytest.approx(loop_avsa_loss(pred, target, 0.2, mode).item(), rel=1e-5)


def test_hand_computed_two_clip_case():
    # B=2, V=1: pred (1,0) and (0,1); target (1,0) and (1,1)/sqrt2 -> logits per anchor [pos, neg]
    pred = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    target = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    s = 1 / math.sqrt(2)
    expected = (math.log(1 + math.exp(s - 1)) + math.log(1 + math.exp(0 - s))) / 2
    loss, _ = avsa_loss(pred, target, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_reaches_both_inputs():
    pred = torch.randn(3, 2, 5, requires_grad=True)
    target = torch.randn(3, 2, 5, requires_grad=True)
    loss, _ = avsa_loss(pred, target, 0.1, easy_negatives="all_views")
    loss.backward()
    assert pred.grad.abs().sum() > 0 and target.grad.abs().sum() > 0


def test_objective_averages_both_directions():
    gen = torch.Generator().manual_seed(1)
    out = {k: torch.randn(2, 3, 4, generator=gen) for k in ("video_pred", "video_target")}
    out |= {k: torch.randn(2, 3, 4, generator=gen) for k in ("audio_pred", "audio_target")}
    loss, m = avsa_objective(out, 0.07)
    a2v, _ = avsa_loss(out["video_pred"], out["video_target"], 0.07)
    v2a, _ = avsa_loss(out["audio_pred"], out["audio_target"], 0.07)
    assert loss.item() == pytest.approx((a2v.item() + v2a.item()) / 2)
    assert m["a2v_loss"].item() == pytest.approx(a2v.item())
    assert {"avsa_acc", "avc_acc", "v2a_avsa_acc"} <= set(m)


def test_avts_hard_negative():
    x = torch.eye(3)
    loss, m = avts_loss(x, x.clone(), -x, 0.01)  # other-time audio points away from the video
    assert loss.item() < 1e-6 and m["avts_acc"].item() == 1.0 and m["avc_acc"].item() == 1.0
    # other-time audio identical to the synchronous one: a tie, so never beaten, loss >= log 2 / 2
    loss, m = avts_loss(x, x.clone(), x.clone(), 0.01)
    assert m["avts_acc"].item() == 0.0 and m["avc_acc"].item() == 1.0
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-4)


def test_bad_shapes_and_temperature_raise():
    with pytest.raises(ValueError, match="B, V, D"):
        avsa_loss(torch.randn(2, 3), torch.randn(2, 3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        avts_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="easy_negatives"):
        avsa_loss(torch.randn(2, 2, 3), torch.randn(2, 2, 3), 0.1, easy_negatives="x")


def test_gather_with_grad_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


# ---- two processes over gloo: gathered losses and gradients equal one process on the union ----

WORLD, B, V, D, TEMP = 2, 3, 4, 5, 0.1


def _full_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    shapes = {"pred": (WORLD * B, V, D), "target": (WORLD * B, V, D)}
    shapes |= {k: (WORLD * B, D) for k in ("video", "audio", "audio_other")}
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


def _losses(x: dict[str, torch.Tensor], gather) -> dict[str, torch.Tensor]:
    return {
        "avsa_same": avsa_loss(x["pred"], x["target"], TEMP, gather=gather)[0],
        "avsa_all": avsa_loss(
            x["pred"], x["target"], TEMP, gather=gather, easy_negatives="all_views"
        )[0],
        "avc_views": avc_views_loss(x["pred"], x["target"], TEMP, gather=gather)[0],
        "avts": avts_loss(x["video"], x["audio"], x["audio_other"], TEMP, gather=gather)[0],
    }


def _run_losses(inputs: dict[str, torch.Tensor], gather) -> dict[str, tuple]:
    """For each loss: (loss value, {input name: grad}) with fresh leaves."""
    results = {}
    for name in _losses({k: v.clone() for k, v in inputs.items()}, None):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        loss = _losses(leaves, gather)[name]
        loss.backward()
        grads = {
            k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in leaves.items()
        }
        results[name] = (loss.detach(), grads)
    return results


def _worker(rank: int, store_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        local = {k: v[rank * B : (rank + 1) * B] for k, v in _full_inputs().items()}
        torch.save(_run_losses(local, gather_with_grad), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run_losses(_full_inputs(), None)
    for name, (loss, grads) in single.items():
        rank_losses = torch.stack([ranks[r][name][0] for r in range(WORLD)])
        assert rank_losses.mean().item() == pytest.approx(loss.item(), rel=1e-5), name
        for key, grad in grads.items():
            # each rank's grad is d(sum of rank losses)/d(its rows); DDP averages over ranks
            summed = torch.cat([ranks[r][name][1][key] for r in range(WORLD)]) / WORLD
            torch.testing.assert_close(summed, grad, rtol=1e-4, atol=1e-6, msg=f"{name}/{key}")
    # the per-rank losses differ (different anchors), so the offset really matters
    assert ranks[0]["avsa_same"][0].item() != pytest.approx(ranks[1]["avsa_same"][0].item())
