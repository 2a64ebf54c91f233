"""The training-step benchmark runs and prints one JSON line; the channels-last video path it
measures computes the same thing as the default layout."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from presets import tiny_model

from avsa.models.inputs import normalize_video, to_channels_last
from avsa.train.objective import compute_objective

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_step_quick_prints_one_json_line():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_step.py"), "--quick", "--no-ray",
         "--device", "cpu", "--threads", "1", "--feed-workers", "1", "--feed-width", "128"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    r = json.loads(lines[0])
    assert r["bench"] == "train_step" and r["device"] == "cpu" and r["model"] == "tiny"
    assert r["video_shape"] == [2, 2, 3, 4, 32, 32] and r["audio_shape"] == [2, 2, 4, 20, 32]
    assert r["steps_per_s"] > 0
    assert r["clips_per_s"] == pytest.approx(r["steps_per_s"] * r["batch_clips"])
    assert r["flops_per_step"] > 0 and r["tflops"] > 0
    assert r["torch_threads"] == 1
    assert r["ray_over_bare"] is None and r["mfu"] is None  # no Ray run, no GPU
    assert r["peak_mem_mb"] > 0
    # the run fed by a decode process: real samples reached the step
    assert r["feed_workers"] == 1 and r["feed_width"] == 128
    assert r["feed_steps_per_s"] > 0 and 0 <= r["feed_wait_frac"] <= 1


def test_channels_last_video_path_matches_default_layout():
    torch.manual_seed(0)
    model = tiny_model(transformer_dropout=0.0)
    model_cl = to_channels_last(copy.deepcopy(model))
    assert model_cl.video_encoder.stem[0].weight.is_contiguous(
        memory_format=torch.channels_last_3d)
    video = torch.randint(0, 256, (2, 3, 3, 4, 32, 32), dtype=torch.uint8)
    x = normalize_video(video, channels_last=True)
    assert torch.equal(x, normalize_video(video, channels_last=False))
    assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last_3d)
    batch = {"video": video, "audio": torch.randn(2, 3, 4, 20, 32),
             "directions": torch.zeros(2, 3, 2)}
    loss, _ = compute_objective(model, batch, kind="avsa", temperature=0.07, channels_last=False)
    loss_cl, _ = compute_objective(model_cl, batch, kind="avsa", temperature=0.07,
                                   channels_last=True)
    assert loss_cl.item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    loss_cl.backward()
    for p, q in zip(model.parameters(), model_cl.parameters(), strict=True):
        if p.grad is not None:  # same up to float summation order
            assert (p.grad - q.grad).norm() <= 1e-4 * p.grad.norm() + 1e-8
