"""`avsa transfer` end to end on tiny synthetic shards, tracked by a real MLflow server."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from presets import tiny_model

from avsa import synth
from avsa.config import audio_channels, compose, config_digest
from avsa.data.shards import write_shards
from avsa.downstream import run
from avsa.errors import CheckpointError, ConfigError, ShardError, StorageError
from avsa.models import build_model
from avsa.train import checkpoint as ckpt

TINY = ["model=tiny", "data.crop_size=32", "data.frames=4", "data.num_viewpoints=2",
        "data.n_mels=32", "data.audio_seconds=0.5", "data.shuffle_buffer=0",
        "downstream.epochs=1", "downstream.batch_size=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 synthetic clips (2 s, 128x64) as training shards, 4 of them as the test split."""
    root = tmp_path_factory.mktemp("transfer")
    clips = root / "clips"
    synth.write_dataset(clips, 8, 2.0, 3, width=128, height=64, progress=False)
    test_clips = root / "test-clips"
    test_clips.mkdir()
    for p in sorted(clips.glob("clip-00000[0-3].*")):
        (test_clips / p.name).symlink_to(p)
    write_shards(str(clips), str(root / "train"), samples_per_shard=4, progress=False)
    write_shards(str(test_clips), str(root / "test"), samples_per_shard=4, split="test",
                 progress=False)
    return str(root / "train"), str(root / "test")


@pytest.fixture(scope="module")
def experiment():
    return f"transfer-{uuid.uuid4().hex[:8]}"


def overrides(shards, mlflow_uri, experiment) -> list[str]:
    return [*TINY, f"data.shards={shards[0]}", f"data.val_shards={shards[1]}",
            f"tracking.uri={mlflow_uri}", f"downstream.experiment={experiment}"]


def check_run(mlflow_uri, run_id, task, metrics):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    tags = r.data.tags
    assert tags["avsa.kind"] == "transfer" and tags["avsa.task"] == task
    assert tags["avsa.pretrain_run_id"] == "scratch" and tags["avsa.pretext"] == "scratch"
    for key in metrics:
        assert 0.0 <= r.data.metrics[key] <= 1.0, key
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0]
    assert r.data.params["downstream.task"] == task
    assert r.data.tags["avsa.seed"] == r.data.params["downstream.seed"]
    assert run.EXAMPLES in {a.path for a in client.list_artifacts(run_id)}
    return r


def stored_examples(mlflow_uri, run_id, tmp_path):
    from mlflow.tracking import MlflowClient

    path = MlflowClient(mlflow_uri).download_artifacts(run_id, run.EXAMPLES, str(tmp_path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_avc_bin_through_the_command(shards, mlflow_uri, experiment, capsys, tmp_path):
    args = overrides(shards, mlflow_uri, experiment)
    assert run.main(["avc_bin", "pretrain=scratch", *args]) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out).group(1)
    r = check_run(mlflow_uri, run_id, "avc_bin", ["test/acc"])
    assert r.data.metrics["test/examples"] == 2 * 4 * 2  # (pos + neg) x 4 test clips x 2 views
    assert "test/acc" in out
    assert re.search(r"^\[avsa\] avc_bin-scratch-s\d+ epoch 1/1  train/loss \d", out, re.M), out
    examples = stored_examples(mlflow_uri, run_id, tmp_path)
    # a negative pairs clip i's viewpoints with clip i + 1's audio: it is clip i's example
    assert examples["acc_unit"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    assert examples["clip_acc_unit"].tolist() == [0, 1, 2, 3] * 2


def test_epoch_lines_show_the_first_epoch_then_at_most_one_per_interval(capsys, monkeypatch):
    logged = []
    log = run.with_progress(lambda m, e: logged.append(e), "action-avsa-s0", 50)
    for epoch in range(3):
        log({"train/loss": 0.5}, epoch)
    assert logged == [0, 1, 2]  # MLflow gets every epoch
    assert capsys.readouterr().out == "[avsa] action-avsa-s0 epoch 1/50  train/loss 0.5000\n"
    monkeypatch.setattr(run, "PROGRESS_EVERY_S", 0.0)
    log = run.with_progress(lambda m, e: None, "x", 2)
    log({"train/loss": 1.0, "val/loss": 2.0}, 0)
    log({"train/loss": 1.0, "val/loss": 2.0}, 1)
    assert capsys.readouterr().out.splitlines() == [
        "[avsa] x epoch 1/2  train/loss 1.0000  val/loss 2.0000",
        "[avsa] x epoch 2/2  train/loss 1.0000  val/loss 2.0000"]


def test_avsa_bin(shards, mlflow_uri, experiment, tmp_path):
    cfg = compose([*overrides(shards, mlflow_uri, experiment), "downstream.task=avsa_bin",
                   "downstream.seed=3", "downstream.feature_passes=2"])
    res = run.run_transfer(cfg)
    r = check_run(mlflow_uri, res.run_id, "avsa_bin", ["test/acc"])
    assert res.metrics["test/examples"] == 4 * 2
    assert res.pretext == "scratch" and "avsa_bin" in res.summary()
    assert r.data.tags["avsa.seed"] == "3" and r.info.run_name.endswith("-s3")
    assert r.data.metrics["train/lr"] == 1e-3  # converges; METHOD.md's 1e-4 stops at the cap
    examples = stored_examples(mlflow_uri, res.run_id, tmp_path)
    hits, clips = examples["acc"], examples["clip_acc"]
    assert hits.shape == (8,) and hits.mean() == pytest.approx(res.metrics["test/acc"])
    assert clips.shape == (4,) and clips.mean() == pytest.approx(res.metrics["test/clip_acc"])
    assert r.data.metrics["test/clip_acc"] == pytest.approx(res.metrics["test/clip_acc"])
    # a clip's viewpoints are resampled together by `avsa compare`
    assert examples["acc_unit"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert examples["clip_acc_unit"].tolist() == [0, 1, 2, 3]
    assert r.data.tags["avsa.config"] == config_digest(cfg, transfer=True)
    other = compose([*overrides(shards, mlflow_uri, experiment), "downstream.task=avsa_bin",
                     "downstream.seed=3", "downstream.feature_passes=2", "downstream.epochs=7"])
    assert config_digest(other, transfer=True) != config_digest(cfg, transfer=True)


def test_action_linear_on_cached_features(shards, mlflow_uri, experiment):
    cfg = compose([*overrides(shards, mlflow_uri, experiment), "downstream.task=action",
                   "downstream.mode=linear", "downstream.eval_clips=2",
                   "downstream.epochs=20", "downstream.patience=2"])
    m = run.run_transfer(cfg).metrics
    assert 0.0 <= m["test/majority_clip_acc"] <= 1.0 and m["test/videos"] == 4
    assert 1 <= m["train/epochs"] <= 20 and m["train/best_epoch"] < m["train/epochs"]


def test_action_finetune(shards, mlflow_uri, experiment):
    cfg = compose([*overrides(shards, mlflow_uri, experiment), "downstream.task=action",
                   "downstream.mode=finetune", "downstream.eval_clips=2"])
    res = run.run_transfer(cfg)
    r = check_run(mlflow_uri, res.run_id, "action", ["test/clip_acc", "test/video_acc",
                                                     "test/majority_clip_acc"])
    assert r.data.metrics["test/videos"] == 4
    assert r.data.tags["avsa.mode"] == "finetune"


def test_finetune_trains_a_split_of_mixed_label_counts_with_one_loss(shards, tmp_path,
                                                                     monkeypatch):
    """Clips naming one class beside clips naming two: binary cross-entropy for every batch,
    as the linear probe chooses for the split, even for batches of single-label clips only."""
    import json
    import shutil
    from pathlib import Path

    from avsa.downstream import action
    from avsa.downstream.sources import ShardSource

    clips = tmp_path / "clips"
    clips.mkdir()
    named = [["disc"], ["ring"], ["disc", "ring"], ["star", "cross"]]
    for i, classes in enumerate(named):
        for p in Path(shards[0]).parent.joinpath("clips").glob(f"clip-{i:06d}.*"):
            shutil.copy(p, clips / p.name)
        meta = json.loads((clips / f"clip-{i:06d}.json").read_text())
        (clips / f"clip-{i:06d}.json").write_text(json.dumps({**meta, "classes": classes}))
    write_shards(str(clips), str(tmp_path / "train"), samples_per_shard=2, progress=False)
    cfg = compose([*TINY, f"data.shards={tmp_path / 'train'}", "downstream.task=action",
                   "downstream.mode=finetune", "downstream.batch_size=1",
                   "downstream.max_steps=4"])
    source = ShardSource.from_config(cfg.data, 1)
    labels = source.train_labels()
    assert labels.shape == (4, 8) and labels.sum(1).tolist() == [1, 1, 2, 2]
    chosen = []
    real_loss = action.action_loss
    monkeypatch.setattr(action, "action_loss",
                        lambda *a: chosen.append(a[2]) or real_loss(*a))
    model = run.load_pretrained(cfg, None).model
    metrics = run.run_task(cfg.downstream, model, source, seed=0, device=torch.device("cpu"))
    assert chosen == [False] * 4 and metrics["test/single_label"] == 0.0
    (tmp_path / "train" / "shard-000000.tar").unlink()  # training would fail or skip it too
    with pytest.raises(StorageError, match="shard-000000"):
        source.train_labels()
    skipping = dataclasses.replace(cfg.data, skip_missing_shards=True)
    assert ShardSource.from_config(skipping, 1).train_labels().sum(1).tolist() == [2, 2]


def test_segmentation_with_context(shards, mlflow_uri, experiment, tmp_path):
    cfg = compose([*overrides(shards, mlflow_uri, experiment), "downstream.task=segmentation",
                   "downstream.context=context"])
    res = run.run_transfer(cfg)
    r = check_run(mlflow_uri, res.run_id, "segmentation",
                  ["test/pixel_acc", "test/miou", "test/miou_fg", "test/miou_bg_only"])
    assert r.data.tags["avsa.context"] == "context"
    assert 1 <= r.data.metrics["test/classes_present"] <= len(synth.CLASSES) + 1
    assert r.data.metrics["test/miou_fg_bg_only"] == 0.0
    assert r.data.metrics["train/lr"] == 3e-3  # the segmentation head's own default
    examples = stored_examples(mlflow_uri, res.run_id, tmp_path)
    assert examples["confusion"].shape[0] == 8  # 4 test clips x 2 viewpoints
    assert examples["confusion_unit"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _save(tmp_path, model, overrides):
    cfg = compose(["model=tiny", *overrides])
    return str(ckpt.save(tmp_path / "ckpt", model=model, optimizer=None, step=5,
                         config=cfg.to_dict()))


@pytest.mark.parametrize(("pretext", "pre_overrides", "transformer"), [
    ("avc", ["loss=avc", "model.use_transformer=false"], False),
    ("avsa_cur", ["train.curriculum=true", "train.curriculum_avc_steps=2"], True),
])
def test_checkpoint_config_decides_the_architecture(tmp_path, pretext, pre_overrides,
                                                    transformer):
    pre_cfg = compose(["model=tiny", *pre_overrides])
    model = build_model(pre_cfg.model)
    uri = _save(tmp_path, model, pre_overrides)
    cfg = compose([f"downstream.pretrain={uri}"])  # model=full here: the checkpoint wins
    pre = run.load_pretrained(cfg, None)
    assert pre.pretext == pretext and pre.ref == uri
    assert (pre.model.video_transformer is not None) == transformer
    for k, v in model.state_dict().items():
        assert torch.equal(pre.model.state_dict()[k], v), k


def test_a_scratch_encoder_depends_on_its_seed_only():
    cfg = compose(["model=tiny"])
    first = run.load_pretrained(cfg, None, seed=3).model.state_dict()
    torch.rand(1000)  # whatever the process drew before
    again = run.load_pretrained(cfg, None, seed=3).model.state_dict()
    other = run.load_pretrained(cfg, None, seed=4).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_weights_that_do_not_fit_raise_checkpoint_error(tmp_path):
    uri = _save(tmp_path, tiny_model(video_width=4), [])
    with pytest.raises(CheckpointError, match="do not fit"):
        run.load_pretrained(compose([f"downstream.pretrain={uri}"]), None)


def test_command_shorthands_and_errors(capsys):
    assert run.expand_overrides(["pretrain=abc", "context=audio", "data.crop_size=32",
                                 "experiment=demo_local"]) == [
        "downstream.pretrain=abc", "downstream.context=audio", "data.crop_size=32",
        "experiment=demo_local"]
    assert run.main(["--help"]) == 0
    assert "avsa transfer TASK" in capsys.readouterr().out
    assert run.main([]) == 2  # no task: a usage error, as every other command's
    assert "avsa transfer TASK" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"downstream\.task"):
        run.main(["jump"])


def test_missing_shards_fail_before_a_run_and_a_lost_shard_fails_the_run(shards, tmp_path,
                                                                         mlflow_uri):
    import shutil

    from mlflow.tracking import MlflowClient

    exp = f"transfer-fail-{uuid.uuid4().hex[:8]}"
    base = [*TINY, f"tracking.uri={mlflow_uri}", f"downstream.experiment={exp}",
            "downstream.task=avsa_bin"]
    for missing in ([f"data.shards={tmp_path / 'none'}"],
                    [f"data.shards={shards[0]}", f"data.val_shards={tmp_path / 'none'}"]):
        with pytest.raises(ShardError, match="none"):
            run.run_transfer(compose([*base, *missing]))
    client = MlflowClient(mlflow_uri)
    assert client.get_experiment_by_name(exp) is None  # no run was created for bad input
    # A shard lost after its manifest was read fails the run that started.
    test = shutil.copytree(shards[1], tmp_path / "test")
    next(test.glob("*.tar")).unlink()
    with pytest.raises(ShardError, match="test"):
        run.run_transfer(compose([*base, f"data.shards={shards[0]}", f"data.val_shards={test}"]))
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_transfer_params_are_the_checkpoints_model(shards, mlflow_uri, experiment, tmp_path):
    """The command line says model=full; the run records the tiny network it really used."""
    from mlflow.tracking import MlflowClient

    pre_cfg = compose(["model=tiny", "data.audio_features=intensity"])
    model = build_model(pre_cfg.model, audio_channels(pre_cfg.data))
    uri = _save(tmp_path, model, ["data.audio_features=intensity"])
    args = [a for a in overrides(shards, mlflow_uri, experiment) if a != "model=tiny"]
    cfg = compose([*args, "downstream.task=avsa_bin", f"downstream.pretrain={uri}"])
    assert cfg.model.name == "full"
    res = run.run_transfer(cfg)
    params = MlflowClient(mlflow_uri).get_run(res.run_id).data.params
    for key, value in dataclasses.asdict(pre_cfg.model).items():
        assert params[f"model.{key}"] == str(value), key
    assert params["model.name"] == "tiny"
    assert params["data.audio_features"] == "intensity"
    assert params["data.crop_size"] == "32"  # the command line's, where it overrides


def test_a_transfer_records_absolute_paths_for_relative_ones(shards, mlflow_uri, experiment,
                                                             tmp_path, monkeypatch):
    """Run from the folder that holds them, relative shard and checkpoint paths are recorded
    absolute: the run names what it read wherever it is looked at from."""
    from mlflow.tracking import MlflowClient

    pre = compose(["model=tiny"])
    checkpoint = Path(_save(tmp_path, build_model(pre.model, audio_channels(pre.data)), []))
    train = Path(shards[0])
    monkeypatch.chdir(train.parent)
    (train.parent / "scratch").mkdir(exist_ok=True)  # a folder named as the keyword is no path
    args = [a for a in overrides(shards, mlflow_uri, experiment) if "shards=" not in a]
    for ref, recorded in ((os.path.relpath(checkpoint), str(checkpoint)), ("scratch", "scratch")):
        cfg = compose([*args, f"data.shards={train.name}", f"data.val_shards={shards[1]}",
                       "downstream.task=avsa_bin", f"downstream.pretrain={ref}"])
        r = MlflowClient(mlflow_uri).get_run(run.run_transfer(cfg).run_id)
        assert r.data.params["data.shards"] == str(train)
        assert r.data.params["downstream.pretrain"] == recorded
        assert r.data.tags["avsa.pretrain_run_id"] == recorded


def test_sigterm_ends_the_transfer_run_killed_not_running(shards, mlflow_uri, experiment):
    """`kill`, `ray job stop` and a pod's deletion send SIGTERM: the command stops as on Ctrl-C,
    exit 143 and one line, its MLflow run KILLED rather than RUNNING for ever."""
    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parent.parent
    args = [*overrides(shards, mlflow_uri, experiment), "downstream.mode=finetune",
            "downstream.epochs=10000", "downstream.row=sigterm"]
    proc = subprocess.Popen([sys.executable, "-m", "avsa.cli", "transfer", "action",
                             "pretrain=scratch", *args], cwd=repo, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:  # the run exists once the first epoch is reported
            if "epoch 1/10000" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "avsa transfer: stopped by SIGTERM"
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    (r,) = client.search_runs([exp.experiment_id], "tags.`avsa.row` = 'sigterm'")
    assert r.info.status == "KILLED"
