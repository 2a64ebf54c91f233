"""Unit tests of the training pieces that need no Ray: objectives, curriculum, checkpoints,
and the refusal of a cluster address where no Ray answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflowserver import free_port
from presets import encoder_state

from avsa.config import compose
from avsa.errors import CheckpointError, ConfigError
from avsa.models import build_model, unwrap
from avsa.models.inputs import normalize_video
from avsa.train import checkpoint as ckpt
from avsa.train.loop import STAGING_PREFIX, Meter, chance_score, phase_kind, remove_dead_staging
from avsa.train.objective import (
    compute_objective,
    leaves_parameters_unused,
    reset_context_and_heads,
)
from avsa.train.ray_setup import join_cluster


def _batch(b=4, v=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randint(0, 255, (b, v, 3, 4, 32, 32), generator=g, dtype=torch.uint8),
        "audio": torch.randn(b, v, 4, 20, 32, generator=g),
        "audio_other": torch.randn(b, v, 4, 20, 32, generator=g),
        "directions": torch.rand(b, v, 2, generator=g),
    }


@pytest.fixture(scope="module")
def cfg():
    return compose(["model=tiny", "data.num_viewpoints=2"])


@pytest.mark.parametrize("kind", ["avsa", "avc", "avts"])
def test_each_objective_trains_the_encoders(cfg, kind):
    model = build_model(cfg.model)
    loss, metrics = compute_objective(model, _batch(), kind=kind, temperature=0.07)
    loss.backward()
    assert torch.isfinite(loss)
    assert "avc_acc" in metrics
    grads = [p.grad for p in model.video_encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:1])
    used_transformer = model.video_transformer.layers[0].linear1.weight.grad is not None
    assert used_transformer == (kind == "avsa")


@pytest.mark.parametrize("kind", ["avsa", "avc", "avts"])
@pytest.mark.parametrize("use_transformer", [True, False])
def test_ddp_searches_for_unused_parameters_exactly_when_some_are(kind, use_transformer):
    """DDP with find_unused_parameters=False fails on a parameter without a gradient; with True
    it walks the graph after every backward pass, and warns when it finds nothing."""
    cfg = compose(["model=tiny", "data.num_viewpoints=2",
                   f"model.use_transformer={str(use_transformer).lower()}"])
    model = build_model(cfg.model)
    loss, _ = compute_objective(model, _batch(), kind=kind, temperature=0.07)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert bool(unused) == leaves_parameters_unused(kind, use_transformer, curriculum=False)
    assert leaves_parameters_unused(kind, use_transformer, curriculum=True)


def test_avts_hard_negative_changes_the_loss(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).train()  # batch statistics: embeddings differ
    b = _batch()
    same = dict(b, audio_other=b["audio"].clone())  # the "other time" equals the positive
    l_other, _ = compute_objective(model, b, kind="avts", temperature=0.07)
    l_same, m_same = compute_objective(model, same, kind="avts", temperature=0.07)
    assert not torch.isclose(l_same, l_other)  # the other-time audio enters the loss
    assert set(m_same) == {"avc_acc", "avts_acc"}


def test_curriculum_avc_phase_sees_b_times_v_pairs():
    """The AVC phase of a V-viewpoint batch is AVC over all B x V (view, audio) pairs: every
    viewpoint's audio enters the loss, and the loss equals AVC on B x V single-view clips whose
    negatives are only other clips (not the clip's other viewpoints)."""
    from avsa.losses import avc_views_loss

    cfg = compose(["model=tiny", "data.num_viewpoints=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()  # batch statistics: embeddings differ
    b = _batch(b=3, v=4)
    loss, _ = compute_objective(model, b, kind="avc", temperature=0.1)
    last_view = dict(b, audio=b["audio"].clone())
    last_view["audio"][:, 3] = torch.randn(3, 4, 20, 32)
    changed, _ = compute_objective(model, last_view, kind="avc", temperature=0.1)
    assert loss.item() != changed.item()  # view 3's audio is a pair of the phase

    pred, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    got, m = avc_views_loss(pred, target, 0.1)
    p, t = torch.nn.functional.normalize(pred, dim=-1), torch.nn.functional.normalize(target, dim=-1)
    anchors = [(i, j) for i in range(3) for j in range(4)]
    assert len(anchors) == 12  # B x V anchors, each against the B - 1 other clips
    manual = torch.stack([
        torch.nn.functional.cross_entropy(
            torch.stack([p[i, j] @ t[k, j] for k in [i] + [k for k in range(3) if k != i]])[None]
            / 0.1, torch.tensor([0]))
        for i, j in anchors]).mean()
    torch.testing.assert_close(got, manual)
    assert 0.0 <= float(m["avc_acc"]) <= 1.0


def test_normalize_video_uses_channel_stats():
    v = torch.full((1, 1, 3, 1, 2, 2), 255, dtype=torch.uint8)
    x = normalize_video(v)
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0], torch.full((1, 2, 2), (1 - 0.43216) / 0.22803))


def test_curriculum_phases():
    c = compose(["train.curriculum=true", "train.curriculum_avc_steps=3", "train.max_steps=6"])
    assert [phase_kind(c, s) for s in range(1, 7)] == ["avc"] * 3 + ["avsa"] * 3


def test_reset_keeps_encoders_and_renews_heads(cfg):
    model = build_model(cfg.model)
    enc = {k: v.clone() for k, v in encoder_state(model).items()}
    head = model.video_head.weight.detach().clone()
    attn = model.video_transformer.layers[0].self_attn.in_proj_weight.detach().clone()
    reset_context_and_heads(model, seed=123)
    assert all(torch.equal(enc[k], v) for k, v in encoder_state(model).items())
    assert not torch.equal(head, model.video_head.weight)
    assert not torch.equal(attn, model.video_transformer.layers[0].self_attn.in_proj_weight)
    # same seed, same fresh weights: DDP replicas stay identical
    other = build_model(cfg.model)
    reset_context_and_heads(other, seed=123)
    assert torch.equal(other.video_head.weight, model.video_head.weight)


def test_compiled_model_saves_loads_and_resets_by_its_own_names(cfg, tmp_path):
    """One worker gets no DDP wrapper: with train.compile=true the loop holds torch.compile's
    module, whose names all start `_orig_mod.`. Checkpoints must load into a fresh network,
    and the curriculum's reset must still leave the encoders alone."""
    model = build_model(cfg.model)
    raw = unwrap(torch.compile(model))
    assert raw is model
    ckpt.save(str(tmp_path), model=raw, optimizer=None, step=1, config={})
    fresh = build_model(cfg.model)
    fresh.load_state_dict(ckpt.load(str(tmp_path))["model"])
    enc = {k: v.clone() for k, v in encoder_state(model).items()}
    reset_context_and_heads(unwrap(torch.compile(model)), seed=1)
    assert all(torch.equal(enc[k], v) for k, v in encoder_state(model).items())


def test_chance_score_and_meter():
    assert chance_score(0.25, 4) == pytest.approx(0.0)
    assert chance_score(1.0, 8) == pytest.approx(1.0)
    m = Meter()
    m.add({"a": torch.tensor(1.0)})
    m.add({"a": torch.tensor(3.0), "avsa_acc": torch.tensor(0.5)})  # a curriculum's switch
    assert m.mean("train") == {"train/a": 2.0, "train/avsa_acc": 0.5}
    m.add({"a": torch.tensor(5.0)})
    assert m.mean("train") == {"train/a": 5.0}


def test_checkpoint_round_trip_and_resolve(cfg, tmp_path):
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = tmp_path / "run"
    ckpt.save(run / "checkpoint-00000002", model=model, optimizer=opt, step=2, config=cfg.to_dict())
    ckpt.save(run / "checkpoint-00000010", model=model, optimizer=opt, step=10,
              config=cfg.to_dict())
    state = ckpt.load(run / "checkpoint-00000010")
    assert state["step"] == 10 and state["config"]["model"]["name"] == "tiny"
    assert (run / "checkpoint-00000010" / "config.yaml").read_text().startswith("data:")
    # a run directory resolves to its newest checkpoint
    resolved, uri = ckpt.resolve_init(str(run))
    assert resolved["step"] == 10 and uri == str(run)
    # ... and not to a newer one that was set aside as damaged
    (run / "checkpoint-00000010").rename(run / "damaged-checkpoint-00000010")
    resolved, _ = ckpt.resolve_init(str(run))
    assert resolved["step"] == 2
    fresh = build_model(cfg.model)
    fresh.load_encoders(resolved["model"])
    assert torch.equal(fresh.video_encoder.stem[0].weight if hasattr(fresh.video_encoder, "stem")
                       else next(fresh.video_encoder.parameters()),
                       model.video_encoder.stem[0].weight if hasattr(model.video_encoder, "stem")
                       else next(model.video_encoder.parameters()))


def test_checkpoint_carries_the_runs_skip_count(cfg, tmp_path):
    """A resumed run counts skipped samples on from its checkpoint's count, so a skip seen
    before a worker death stays in `data/skipped_samples`; checkpoints from before the count
    was kept resume at 0."""
    model = build_model(cfg.model)
    ckpt.save(tmp_path / "a", model=model, optimizer=None, step=4, config=cfg.to_dict(),
              skipped_samples=3)
    assert ckpt.skipped_samples(ckpt.load(tmp_path / "a")) == 3
    old = ckpt.load(tmp_path / "a")
    del old["skipped_samples"]
    assert ckpt.skipped_samples(old) == 0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve_init(str(tmp_path))  # a folder without checkpoints
    for ref in ("deadbeef", str(tmp_path / "nosuch")):  # a short run id or a mistyped path
        with pytest.raises(CheckpointError, match=f"^{ref}: nothing there .*MLflow run id of 32"):
            ckpt.resolve_init(ref)
    (tmp_path / "checkpoint-00000001").mkdir()
    (tmp_path / "checkpoint-00000001" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        ckpt.load(tmp_path / "checkpoint-00000001")


def test_with_absolute_paths_resolves_what_only_the_driver_can(tmp_path, monkeypatch):
    """Ray Train workers run in their own directories: relative local paths must be made
    absolute in the driver, URIs and MLflow run ids left alone, and the input not touched."""
    from avsa.config import with_absolute_paths

    (tmp_path / "ck" / "checkpoint-00000010").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["data.shards=data/train", "data.val_shards=s3://bucket/val",
                   "storage.path=file:///srv/runs", "model.init_from=ck/checkpoint-00000010"])
    out = with_absolute_paths(cfg)
    assert out.data.shards == str(tmp_path / "data" / "train")
    assert out.data.val_shards == "s3://bucket/val"
    assert out.storage.path == "file:///srv/runs"
    assert out.model.init_from == str(tmp_path / "ck" / "checkpoint-00000010")
    assert cfg.data.shards == "data/train"
    run_id = "0123456789abcdef0123456789abcdef"
    kept = with_absolute_paths(compose([f"model.init_from={run_id}"]), cwd=tmp_path)
    assert kept.model.init_from == run_id
    assert with_absolute_paths(cfg, cwd="/elsewhere").data.shards == "/elsewhere/data/train"


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("stream", "env", "enabled"), [
    (_Stream(False), None, False),  # a log: each redraw would be a line
    (object(), None, False),  # no isatty at all: not a terminal
    (_Stream(True), None, True),  # a terminal: bars redraw in place
    (_Stream(False), "0", True),  # the user's explicit choice wins
])
def test_ray_data_progress_bars_are_off_in_logs_only(monkeypatch, stream, env, enabled):
    from ray.data import DataContext

    from avsa.train.driver import quiet_data_progress

    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", env)
    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    quiet_data_progress(stream)
    assert ctx.enable_progress_bars is enabled


def test_ray_trains_report_lines_are_dropped_and_its_warnings_kept():
    import logging

    from ray.train.v2._internal.execution import context

    from avsa.train.loop import quiet_report_lines

    source = logging.getLogger(context.__file__)  # where Ray Train logs each report
    level = source.level
    try:
        source.setLevel(logging.INFO)  # as in a worker, whose root logger is at INFO
        quiet_report_lines()
        assert not source.isEnabledFor(logging.INFO)
        assert source.isEnabledFor(logging.WARNING)
    finally:
        source.setLevel(level)


def test_a_resumed_run_streams_on_from_its_checkpoints_epoch(tmp_path):
    """10 clips at batch 2 make 5 steps an epoch: resumed at step 12 the stream starts in
    epoch 2, not again at epoch 0's shard order, and covers the 28 steps left."""
    from avsa.train import resume
    from avsa.train.driver import data_epochs

    cfg = compose(["train.batch_size=2", "train.max_steps=40"])
    run = tmp_path / "run"
    assert data_epochs(cfg, 10, str(run)) == (0, 9)  # a new run: 40 steps, plus one of slack
    for step in (6, 12, 14):
        (run / f"checkpoint-{step:08d}").mkdir(parents=True)
    for step in (6, 12):
        resume.commit(str(run / f"checkpoint-{step:08d}"), step)
    # step 14's upload never finished (no commit marker): the workers resume from step 12
    assert data_epochs(cfg, 10, str(run)) == (2, 7)
    assert data_epochs(compose(["train.batch_size=2", "train.max_steps=12"]), 10,
                       str(run)) == (2, 1)


@pytest.mark.parametrize(("address", "says"), [
    ("127.0.0.1:{port}", "no Ray answers at '127.0.0.1:{port}' ("),
    ("ray://127.0.0.1:{port}", "no Ray answers at 'ray://127.0.0.1:{port}' ("),
    ("http://127.0.0.1:8265", "'http://127.0.0.1:8265' is no Ray address: use the head's GCS"),
    ("no-ray-here", "'no-ray-here' is not HOST:PORT"),
])
def test_a_cluster_address_where_no_ray_answers_is_refused_before_ray_init(address, says):
    port = free_port()
    with pytest.raises(ConfigError) as info:
        join_cluster(address.format(port=port), timeout_s=2)
    assert str(info.value).startswith("RAY_ADDRESS: " + says.format(port=port)), info.value
    assert str(info.value).endswith("; unset RAY_ADDRESS to start a local Ray")


@pytest.mark.timeout(90)  # before the check, Ray retried a dead address for minutes
def test_avsa_pretrain_with_a_dead_ray_address_exits_with_one_line(tmp_path, mlflow_uri):
    from avsa.data.manifest import Manifest, write_manifest
    from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name

    blob = pack_shard([RawSample(f"k{i}", {"mp4": b"x"}) for i in range(4)])
    (tmp_path / "shards" / shard_name(0)).parent.mkdir(parents=True)
    (tmp_path / "shards" / shard_name(0)).write_bytes(blob)
    write_manifest(str(tmp_path / "shards"),
                   Manifest("train", [shard_info(shard_name(0), blob, 4)], 4))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "avsa.cli", "pretrain", "experiment=demo_local", "model=tiny",
         f"data.shards={tmp_path / 'shards'}", "data.val_shards=null", "train.batch_size=2",
         f"storage.path={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"avsa pretrain: error: RAY_ADDRESS: no Ray answers at '{env['RAY_ADDRESS']}'"), lines


def test_staging_folders_of_dead_workers_are_removed_and_live_ones_kept(tmp_path):
    """A worker killed inside its checkpoint report (Ctrl-C on the run, a node's failure)
    leaves its staging folder, a whole checkpoint, in the temp dir: the node's next worker
    removes it. Live workers' folders and names of another form stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    names = {"dead": f"{STAGING_PREFIX}{dead.stdout.strip()}-k3x9", "live":
             f"{STAGING_PREFIX}{os.getpid()}-a1b2", "other": f"{STAGING_PREFIX}q8_w2e1"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x" * 64)
    remove_dead_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other"]])
