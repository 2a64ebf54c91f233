"""The pretrained network as an MLflow model: logged on its run, registered, loaded by transfer.

At a run's end the final network is logged with ``mlflow.pytorch`` as the run's model
``encoders``, with a signature, ``config.yaml`` and ``weights.pt`` (a plain state dict that
transfer loads with ``weights_only=True``: no pickled code runs). A pretraining registers it as
a version of ``tracking.model_name``; a sweep registers its best trial's with the alias
``best``. ``avsa transfer`` accepts ``models:/NAME/VERSION`` (or ``latest``, the highest
version, as MLflow's own model URIs take it) and ``models:/NAME@ALIAS``.
Logging is best effort: with the server down it warns once and training goes on.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avsa.errors import CheckpointError, TrackingError
from avsa.tracking.client import connect, is_remote, one_line
from avsa.tracking.store import CHECKPOINT

if TYPE_CHECKING:
    from avsa.config import Config
    from avsa.tracking.run import RunLogger

log = logging.getLogger("avsa.tracking")

MODEL_NAME = "encoders"  # the logged model's name on its run
BEST_ALIAS = "best"
MODEL_VERSION_TAG = "avsa.model_version"  # "NAME/VERSION" on the runs that made or used it
WEIGHTS = "weights.pt"
CONFIG = "config.yaml"
_MODELS_URI = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version: ``models:/NAME/VERSION`` and the run that logged it."""

    name: str
    version: str
    run_id: str | None
    model_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def is_models_uri(ref: str) -> bool:
    return bool(_MODELS_URI.match(ref or ""))


def signature(cfg: Config):
    """Inputs video (B, V, 3, T, S, S) and audio (B, V, C, F, M) float32; outputs the
    (B, V, D) features and embeddings (-1: any size)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from avsa.config import audio_channels

    d, v = cfg.data, cfg.data.num_viewpoints
    f32 = np.dtype("float32")
    inputs = Schema([
        TensorSpec(f32, (-1, v, 3, d.frames, d.crop_size, d.crop_size), "video"),
        TensorSpec(f32, (-1, v, audio_channels(d), -1, d.n_mels), "audio"),
    ])
    outputs = Schema([TensorSpec(f32, (-1, v, -1), k) for k in (
        "video_feat", "audio_feat", "video_target", "audio_target", "video_pred", "audio_pred")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def save_local(state: dict[str, Any], path: Path) -> None:
    """Write the MLflow model folder for a checkpoint state to ``path``."""
    import mlflow
    import mlflow.pytorch
    import torch
    from omegaconf import OmegaConf

    from avsa.config import audio_channels, from_dict
    from avsa.models import build_model

    cfg = from_dict(state["config"])
    model = build_model(cfg.model, audio_channels(cfg.data))
    model.load_state_dict(state["model"])
    model.eval()
    extra = path.parent / "extra"
    extra.mkdir()
    torch.save(model.state_dict(), extra / WEIGHTS)
    (extra / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(state["config"])))
    mlflow.pytorch.save_model(
        # Pickled, not exported (pt2 needs an input example traced through the whole
        # network); transfer never unpickles it: it reads weights.pt.
        model, str(path), signature=signature(cfg), serialization_format="pickle",
        extra_files=[str(extra / WEIGHTS), str(extra / CONFIG)],
        # Stated, not inferred: inference would load the model again in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"mlflow=={mlflow.__version__}"],
        metadata={"avsa_step": int(state.get("step", 0))},
    )


def log_encoders(logger: RunLogger, checkpoint_uri: str, *, register_as: str | None = None,
                 step: int = 0) -> ModelRef | None:
    """Log the network of ``checkpoint_uri`` as the model ``encoders`` of ``logger``'s run
    and, with ``register_as``, register it. Returns the registered version; None without
    ``register_as``, or (after one warning) when MLflow could not take it. Never raises."""
    from avsa.train.checkpoint import resolve_init

    try:
        state, _ = resolve_init(checkpoint_uri)
    except Exception as e:
        log.warning("not logging the encoders of run %s as an MLflow model: %s", logger.run_id, e)
        return None

    def upload(client) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        with tempfile.TemporaryDirectory(prefix="avsa-model-") as tmp:
            local = Path(tmp) / "model"
            save_local(state, local)
            model = client.create_logged_model(
                logger.experiment_id, name=MODEL_NAME, source_run_id=logger.run_id,
                model_type="avsa-encoders", tags={CHECKPOINT: checkpoint_uri})
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(logger.run_id, [LoggedModelOutput(model.model_id, step=step)])

    if not logger.attempt(f"the encoders model (from {checkpoint_uri})", upload):
        log.warning("MLflow run %s has no model; transfer can still start from pretrain=%s or "
                    "pretrain=%s", logger.run_id, logger.run_id, checkpoint_uri)
        return None
    return register(logger, register_as) if register_as else None


def log_final(logger: RunLogger, cfg: Config, checkpoint_uri: str | None, *, register: bool,
              step: int = 0) -> None:
    """At a run's end: its final network as the run's model (registered as
    ``tracking.model_name`` when ``register``) unless a resumed run has it already, and the
    prediction figure. Never raises."""
    if not checkpoint_uri:
        return
    if cfg.tracking.log_model and not _has_model(logger):
        log_encoders(logger, checkpoint_uri, step=step,
                     register_as=cfg.tracking.model_name if register else None)
    try:
        from avsa.pretrain_figure import log_figure

        log_figure(logger, cfg, checkpoint_uri)
    except Exception as e:  # a figure is never worth a failed run
        log.warning("no prediction figure for run %s: %s", logger.run_id, e)


def _has_model(logger: RunLogger) -> bool:
    found: list[str | None] = []
    return (logger.attempt("the run's models",
                           lambda c: found.append(_run_model_id(c, logger.run_id)))
            and found[0] is not None)


def _run_model_id(client, run_id: str) -> str | None:
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


def register(logger: RunLogger, name: str, alias: str | None = None) -> ModelRef | None:
    """Register the model logged on ``logger``'s run as a new version of ``name`` (the
    version already registered from this run, if any), point ``alias`` at it, and tag the
    run with ``avsa.model_version``. None (after a warning) on failure."""
    found: list[ModelRef] = []

    def reg(client) -> None:
        model_id = _run_model_id(client, logger.run_id)
        if model_id is None:
            raise TrackingError(logger.run_id, "the run has no logged model")
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{logger.run_id}'")
        if existing:
            mv = existing[0]
        else:
            from mlflow.exceptions import MlflowException

            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = client.create_model_version(name, _version_source(client, logger.uri, model_id),
                                             run_id=logger.run_id, model_id=model_id)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
        found.append(ModelRef(name, str(mv.version), logger.run_id, model_id))

    if not logger.attempt(f"registering the model of run {logger.run_id} as {name!r}", reg):
        return None
    ref = found[0]
    logger.set_tags({MODEL_VERSION_TAG: f"{ref.name}/{ref.version}"})
    log.info("registered %s (run %s)%s", ref.uri, logger.run_id, f" as @{alias}" if alias else "")
    return ref


def _version_source(client, tracking_uri: str, model_id: str) -> str:
    """``models:/<id>`` for a server, which resolves it in its own store; the model's artifact
    location for a local store, whose registry would resolve ``models:/<id>`` through the
    process's default tracking URI instead of this one."""
    if is_remote(tracking_uri):
        return f"models:/{model_id}"
    return client.get_logged_model(model_id).artifact_location


def resolve(ref: str, tracking_uri: str) -> ModelRef:
    """The registered version behind ``models:/NAME/VERSION|latest`` or ``models:/NAME@ALIAS``."""
    m = _MODELS_URI.match(ref)
    if m is None:
        raise CheckpointError(ref, "expected models:/NAME/VERSION, models:/NAME/latest or "
                                   "models:/NAME@ALIAS")
    registry, name = connect(tracking_uri), m["name"]
    try:
        if m["version"] == "latest":
            versions = registry.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"{name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        elif m["version"]:
            mv = registry.get_model_version(name, m["version"])
        else:
            mv = registry.get_model_version_by_alias(name, m["alias"])
    except Exception as e:
        raise CheckpointError(ref, f"no such registered model version ({one_line(e)})") from None
    model_id = getattr(mv, "model_id", None)
    if not model_id and (mv.source or "").startswith("models:/m-"):  # servers that omit it
        model_id = mv.source[len("models:/"):]
    if not model_id and mv.run_id:  # a local store's version, sourced by artifact location
        model_id = _run_model_id(registry, mv.run_id)
    return ModelRef(name, str(mv.version), mv.run_id, model_id)


def load_state(ref: str, tracking_uri: str) -> tuple[dict[str, Any], ModelRef]:
    """A checkpoint-like state ({"model", "config"}) for a ``models:/`` reference, read from
    the version's ``weights.pt`` and ``config.yaml`` (no pickled code is loaded)."""
    import mlflow.artifacts
    import torch
    from omegaconf import OmegaConf

    version = resolve(ref, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="avsa-model-") as tmp:
        try:
            location = connect(tracking_uri).get_logged_model(version.model_id).artifact_location
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri))
            extra = local / "extra_files"  # where mlflow.pytorch keeps extra_files
            weights = torch.load(extra / WEIGHTS, map_location="cpu", weights_only=True)
            config = OmegaConf.to_container(OmegaConf.load(extra / CONFIG), resolve=True)
        except Exception as e:
            raise CheckpointError(version.uri, f"cannot load the model ({one_line(e)})") from None
    return {"model": weights, "config": config}, version
