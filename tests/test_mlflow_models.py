"""Datasets, code version, experiment kind, the registered encoders and transfer from
`models:/`, against a real `mlflow server` (no Ray: the checkpoint is written directly)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
import torch

from avsa import synth, tracking
from avsa.config import audio_channels, compose
from avsa.data.manifest import read_manifest
from avsa.data.shards import write_shards
from avsa.downstream import run
from avsa.errors import CheckpointError
from avsa.models import build_model
from avsa.tracking import code_version
from avsa.tracking import models as mlflow_models
from avsa.tracking.datasets import log_datasets, manifest_digest
from avsa.train import checkpoint as ckpt
from avsa.train.resume import commit

TINY = ["model=tiny", "data.crop_size=32", "data.frames=4", "data.num_viewpoints=2",
        "data.n_mels=32", "data.audio_seconds=0.5", "data.shuffle_buffer=0",
        "downstream.epochs=1", "downstream.batch_size=4", "tracking.system_metrics_interval_s=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    synth.write_dataset(root / "clips", 8, 2.0, 3, width=128, height=64, progress=False)
    write_shards(str(root / "clips"), str(root / "shards" / "train"), samples_per_shard=4,
                 progress=False)
    write_shards(str(root / "clips"), str(root / "shards" / "val"), samples_per_shard=8,
                 split="val", progress=False)
    return str(root / "shards" / "train"), str(root / "shards" / "val")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = compose(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, audio_channels(cfg.data))
    d = tmp_path_factory.mktemp("ckpt") / "checkpoint-00000005"
    ckpt.save(d, model=model, optimizer=None, step=5, config=cfg.to_dict())
    return str(d), model.state_dict()


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_pretraining_run_gets_kind_code_datasets_and_registered_model(
        mlflow_uri, shards, checkpoint, tmp_path):
    exp, name = f"mm-{uuid.uuid4().hex[:8]}", f"enc-{uuid.uuid4().hex[:6]}"
    logger = tracking.RunLogger.start(mlflow_uri, exp, "pre", tags={tracking.KIND: "pretrain"})
    client = _client(mlflow_uri)
    assert client.get_experiment_by_name(exp).tags["mlflow.experimentKind"] == \
        "custom_model_development"

    assert log_datasets(logger, [(shards[0], "train"), (shards[1], "val"), (None, "x")])
    ref = mlflow_models.log_encoders(logger, checkpoint[0], register_as=name, step=5)
    logger.end()
    assert isinstance(ref, mlflow_models.ModelRef) and ref.version == "1"

    r = client.get_run(logger.run_id)
    tags = r.data.tags
    assert tags[code_version.GIT_COMMIT] and len(tags[code_version.GIT_COMMIT]) == 40
    assert tags[code_version.GIT_DIRTY] in ("true", "false")
    assert tags[code_version.SOURCE_NAME] and tags[code_version.CODE_VERSION].startswith("0.1.0")
    assert tags[mlflow_models.MODEL_VERSION_TAG] == f"{name}/1"
    inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    assert inputs["train"].name == "shards/train" and inputs["val"].name == "shards/val"
    assert inputs["train"].digest == manifest_digest(read_manifest(shards[0]))
    assert json.loads(inputs["train"].source)["uri"] == shards[0]
    assert '"num_samples": 8' in inputs["train"].profile
    assert [o.step for o in r.outputs.model_outputs] == [5]

    mv = client.get_model_version(name, "1")
    assert mv.run_id == logger.run_id
    assert mv.source == f"models:/{r.outputs.model_outputs[0].model_id}"
    model = client.get_logged_model(r.outputs.model_outputs[0].model_id)
    assert model.source_run_id == logger.run_id and model.name == "encoders"
    # the files are in the artifact store, the signature in the MLmodel file
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                dst_path=str(tmp_path), tracking_uri=mlflow_uri)
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "signature" in mlmodel and '"name": "video"' in mlmodel

    # an alias, and both reference forms load the same weights
    best = mlflow_models.register(logger, name, alias="best")
    assert best.version == "1"  # the version this run already has, not a new one
    for ref_text in (f"models:/{name}/1", f"models:/{name}@best", f"models:/{name}/latest"):
        state, uri = ckpt.resolve_init(ref_text, mlflow_uri)
        assert uri == f"models:/{name}/1"
        for k, v in checkpoint[1].items():
            assert torch.equal(state["model"][k], v)
    with pytest.raises(CheckpointError, match="no such registered model version"):
        ckpt.resolve_init(f"models:/{name}@nosuch", mlflow_uri)
    # `latest`, as MLflow's model URIs take it: the highest version, not the first
    client.create_model_version(name, mv.source, run_id=mv.run_id, model_id=model.model_id)
    assert mlflow_models.resolve(f"models:/{name}/latest", mlflow_uri).version == "2"
    with pytest.raises(CheckpointError, match=r"no such registered model version .*no versions"):
        ckpt.resolve_init(f"models:/{name}-none/latest", mlflow_uri)


def test_transfer_from_a_registered_version(mlflow_uri, shards, checkpoint):
    exp, name = f"mm-{uuid.uuid4().hex[:8]}", f"enc-{uuid.uuid4().hex[:6]}"
    logger = tracking.RunLogger.start(mlflow_uri, exp, "pre")
    mlflow_models.log_encoders(logger, checkpoint[0], register_as=name)
    mlflow_models.register(logger, name, alias="best")
    logger.end()
    cfg = compose([*TINY, f"data.shards={shards[0]}", f"data.val_shards={shards[1]}",
                   f"tracking.uri={mlflow_uri}", f"downstream.experiment={exp}-t",
                   "downstream.task=avsa_bin", f"downstream.pretrain=models:/{name}@best"])
    res = run.run_transfer(cfg)
    client = _client(mlflow_uri)
    r = client.get_run(res.run_id)
    assert r.data.tags["avsa.pretrain_run_id"] == logger.run_id
    assert r.data.tags[mlflow_models.MODEL_VERSION_TAG] == f"{name}/1"
    assert client.get_experiment_by_name(f"{exp}-t").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    assert {i.tags[0].value for i in r.inputs.dataset_inputs} == {"train", "test"}
    assert f"models:/{r.inputs.model_inputs[0].model_id}" == \
        client.get_model_version(name, "1").source
    assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics)
    report = {f.path for f in client.list_artifacts(res.run_id, "report")}
    assert report == {"report/confusion_matrix.png", "report/per_class.csv"}


def test_model_logging_with_the_server_down_warns_and_returns(
        tmp_path, checkpoint, caplog):
    from mlflowserver import mlflow_server

    with mlflow_server(tmp_path / "srv") as uri:
        logger = tracking.RunLogger.start(uri, "down", "pre", policy=tracking.BufferPolicy(
            end_timeout_s=1))
        uri.stop()
        with caplog.at_level(logging.WARNING, logger="avsa.tracking"):
            assert mlflow_models.log_encoders(logger, checkpoint[0], register_as="x") is None
        logger.end()
    text = caplog.text
    assert "could not log artifact the encoders model" in text
    assert f"transfer can still start from pretrain={logger.run_id}" in text


def test_registration_on_a_local_store_stays_in_that_store(tmp_path, checkpoint, monkeypatch):
    """MLflow's SQLite registry resolves a ``models:/<id>`` source through the process's
    default store: registering on a local store from another directory must neither fail
    nor create a second store in the working directory."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = tracking.RunLogger.start(uri, "local", "pre")
    ref = mlflow_models.log_encoders(logger, checkpoint[0], register_as="enc", step=5)
    logger.end()
    assert isinstance(ref, mlflow_models.ModelRef) and ref.version == "1"
    assert list(elsewhere.iterdir()) == []
    mv = _client(uri).get_model_version("enc", "1")
    assert mv.run_id == logger.run_id
    assert mlflow_models.resolve("models:/enc/1", uri).model_id == ref.model_id
    state, resolved = ckpt.resolve_init("models:/enc/1", uri)
    assert resolved == "models:/enc/1"
    for k, v in checkpoint[1].items():
        assert torch.equal(state["model"][k], v)


def test_a_sweep_completes_trials_whose_actor_the_scheduler_ended(mlflow_uri, shards,
                                                                   tmp_path):
    """ASHA stops a trial at its last step (max_t) by ending its actor, before the trial's
    driver tags the checkpoint and logs the model: the sweep does both for it, then registers
    the best trial's model as @best."""
    from avsa.sweep.driver import _finish_children
    from avsa.train import resume
    from avsa.train.driver import start_tracking

    exp, name = f"sw-{uuid.uuid4().hex[:8]}", f"enc-{uuid.uuid4().hex[:6]}"
    cfg = compose([*TINY, f"data.shards={shards[0]}", f"data.val_shards={shards[1]}",
                   f"tracking.uri={mlflow_uri}", f"tracking.experiment={exp}",
                   f"tracking.model_name={name}", "tracking.system_metrics=false"])
    trials, rows = tmp_path / "trials", []
    for vp in (2, 4):
        trial = f"sweep-num_viewpoints={vp}"
        start_tracking(cfg, kind="trial", run_name=trial, run_uri=str(trials / trial)).flush()
        trial_cfg = compose([*TINY, f"data.num_viewpoints={vp}"])  # left RUNNING, untagged
        checkpoint = trials / trial / "checkpoint-00000004"
        ckpt.save(checkpoint, model=build_model(trial_cfg.model, audio_channels(trial_cfg.data)),
                  optimizer=None, step=4, config=trial_cfg.to_dict())
        resume.commit(str(checkpoint), 4)
        rows.append({"trial": trial, "status": "done", "data.num_viewpoints": vp})
    _finish_children(mlflow_uri, cfg, rows, rows[1], str(trials), ["data.num_viewpoints"])

    client = _client(mlflow_uri)
    for row in rows:
        r = client.get_run(row["run_id"])
        assert r.info.status == "FINISHED"
        assert r.data.tags[tracking.CHECKPOINT] == str(trials / row["trial"] /
                                                       "checkpoint-00000004")
    best = client.get_model_version_by_alias(name, mlflow_models.BEST_ALIAS)
    assert best.run_id == rows[1]["run_id"]
    state, ref = mlflow_models.load_state(f"models:/{name}@best", mlflow_uri)
    assert state["config"]["data"]["num_viewpoints"] == 4 and ref.version == "1"


def test_a_stopped_runs_id_resolves_to_its_newest_complete_checkpoint(mlflow_uri, tmp_path,
                                                                     caplog):
    """A pretraining stopped by Ctrl-C (or still going) has tagged no final checkpoint; its run
    id still names the newest complete one in its run directory, with a warning. A sweep's run
    id names its best trial's."""
    cfg = compose(TINY)
    model = build_model(cfg.model, audio_channels(cfg.data))
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        d = ckpt.save(run_dir / f"checkpoint-{step:08d}", model=model, optimizer=None,
                      step=step, config=cfg.to_dict())
        if step < 6:  # step 6 was being written when the run stopped
            commit(str(d), step)
    exp = f"mm-{uuid.uuid4().hex[:8]}"
    stopped = tracking.RunLogger.start(mlflow_uri, exp, "stopped",
                                       tags={tracking.RUN_URI: str(run_dir)})
    stopped.end("KILLED")
    with caplog.at_level(logging.WARNING, logger="avsa.train"):
        state, uri = ckpt.resolve_init(stopped.run_id, mlflow_uri)
    assert state["step"] == 4 and uri == str(run_dir / "checkpoint-00000004")
    assert f"MLflow run {stopped.run_id} is KILLED, not FINISHED" in caplog.text
    sweep = tracking.RunLogger.start(mlflow_uri, exp, "sweep",
                                     tags={tracking.BEST_RUN: stopped.run_id})
    sweep.end()
    for ref in (sweep.run_id, f"runs:/{sweep.run_id}/encoders"):  # its best trial's
        state, uri = ckpt.resolve_init(ref, mlflow_uri)
        assert state["step"] == 4 and uri == str(run_dir / "checkpoint-00000004")
    bare = tracking.RunLogger.start(mlflow_uri, exp, "bare")
    bare.end("FAILED")
    with pytest.raises(CheckpointError, match=r"\(FAILED\) has no avsa.checkpoint_uri tag and "
                                              r"no complete checkpoint \(no avsa.run_uri tag\)"):
        ckpt.resolve_init(bare.run_id, mlflow_uri)


@pytest.mark.parametrize(("ref", "run_id"), [
    ("0" * 32, "0" * 32),
    (f"runs:/{'a1' * 16}/encoders", "a1" * 16),
    (f"runs:/{'a1' * 16}", "a1" * 16),
    ("runs:/not-an-id/encoders", None),
    ("A" * 32, None),  # MLflow's ids are lowercase hex
    (f"s3://bucket/{'0' * 32}", None),
    ("models:/enc/1", None),
])
def test_run_id_of_a_bare_id_or_an_mlflow_runs_uri(ref, run_id):
    assert ckpt.run_id_of(ref) == run_id
