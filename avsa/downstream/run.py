"""`avsa transfer TASK pretrain=RUN|URI|models:/NAME/VERSION|latest|models:/NAME@ALIAS|scratch`: one
transfer run, tracked in MLflow.

The network is rebuilt from the checkpoint's own config (so the architecture matches its
weights) and loaded whole. The run, in `downstream.experiment`, is tagged with the task, the
pretraining run, the pretext ("avsa", "avsa_cur" after an AVC curriculum, "avc", "avts",
"scratch") and the seed (`downstream.seed`, else `data.seed`), so `avsa compare` can pool a
cell's seeds; it stores its per-example test results (EXAMPLES), which `avsa compare`
resamples. `data.shards` trains and `data.val_shards` tests; for `action`, `data.shards` may
name a local UCF101 / HMDB51 folder (avsa.downstream.ucf, split `downstream.fold`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avsa import tracking
from avsa.config import (
    SCRATCH,
    Config,
    DownstreamConfig,
    audio_channels,
    compose,
    config_digest,
    from_dict,
    with_absolute_paths,
)
from avsa.downstream import report
from avsa.downstream.action import ActionTask
from avsa.downstream.binary import BinaryTask
from avsa.downstream.fit import EpochLog, TransferHead
from avsa.downstream.segmentation import SegmentationTask
from avsa.errors import CheckpointError, ConfigError
from avsa.models import AVSANet, build_model
from avsa.tracking import models as mlflow_models
from avsa.tracking import system_metrics
from avsa.tracking.datasets import log_datasets

log = logging.getLogger("avsa.transfer")

PRETEXT = "avsa.pretext"
CONTEXT = "avsa.context"
MODE = "avsa.mode"
SEED = "avsa.seed"
ROW = "avsa.row"  # the row a transfer run fills in `avsa compare` (default: its pretext)
CONFIG = "avsa.config"  # config_digest(transfer=True): the same transfer run again has it
PROGRESS_EVERY_S = 30.0  # at most one epoch line on stdout this often (MLflow gets every epoch)
# per-example test results (npz): acc / clip_acc / video_acc hit vectors, per-crop confusion,
# NAME_unit: the clip (or video) of each row of NAME, which `avsa compare` resamples together
EXAMPLES = "test_examples.npz"
# The registry: each task's class says where its clips come from, builds its head and
# defines its batch adapter, loss and metrics (avsa.downstream.fit.TransferHead).
TASKS: dict[str, type[TransferHead]] = {
    "avc_bin": BinaryTask, "avsa_bin": BinaryTask, "action": ActionTask,
    "segmentation": SegmentationTask,
}
# `avsa transfer` shorthands: `pretrain=...` means `downstream.pretrain=...`.
SHORT_KEYS = ("pretrain", "mode", "context", "epochs", "lr", "batch_size", "max_steps",
              "eval_clips", "fold", "seed", "patience", "val_fraction", "feature_passes")


@dataclass
class Pretrained:
    model: AVSANet
    config: Config  # what built `model`: the checkpoint's, or this command's for "scratch"
    pretext: str  # "scratch", "avc", "avts", "avsa", "avsa_cur", ...
    ref: str  # the MLflow run id, the checkpoint URI, or "scratch"
    version: mlflow_models.ModelRef | None = None  # for a models:/ reference


@dataclass
class TransferResult:
    task: str
    pretext: str
    pretrain: str
    run_id: str
    tracking_uri: str
    experiment: str
    context: str | None = None
    mode: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        what = self.task + (f"[{self.context}]" if self.context else "")
        what += f" ({self.mode})" if self.mode else ""
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(self.metrics.items())
                          if k.startswith("test/"))
        return (f"[avsa] transfer {what} from {self.pretext} ({self.pretrain}): {shown}\n"
                f"[avsa] MLflow run {self.run_id} in experiment {self.experiment!r} at "
                f"{tracking.redact(self.tracking_uri)}")


def load_pretrained(cfg: Config, tracking_uri: str | None, seed: int = 0) -> Pretrained:
    """The network for `downstream.pretrain`: a fresh one from cfg.model, initialised from
    `seed`, for "scratch", else the checkpoint's (run id or URI) architecture and weights."""
    ref = cfg.downstream.pretrain
    if ref == SCRATCH:
        with torch.random.fork_rng(devices=[]):  # the same cell, the same encoder, every time
            torch.manual_seed(seed)
            model = build_model(cfg.model, audio_channels(cfg.data))
        return Pretrained(model, cfg, SCRATCH, SCRATCH)
    from avsa.train.checkpoint import resolve_init, run_id_of

    version = mlflow_models.resolve(ref, tracking_uri) if mlflow_models.is_models_uri(ref) else None
    state, uri = resolve_init(version.uri if version else ref, tracking_uri)
    try:
        pre = from_dict(state["config"])
    except Exception as e:  # an old or foreign config: name the checkpoint
        raise CheckpointError(uri, f"checkpoint config unreadable ({type(e).__name__}: {e})"
                              .splitlines()[0]) from None
    model = build_model(pre.model, audio_channels(pre.data))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(uri, f"weights do not fit the checkpoint's model: {reason}") from None
    label = f"{pre.loss.kind}_cur" if pre.train.curriculum else pre.loss.kind  # AVC phase first
    if version is not None:  # the pretraining run behind the registered version
        ref = version.run_id or version.uri
    return Pretrained(model, pre, label, run_id_of(ref) or uri, version)


def task_class(task: str) -> type[TransferHead]:
    if task not in TASKS:
        raise ConfigError("downstream.task", f"must be one of {tuple(TASKS)}, got {task!r}")
    return TASKS[task]


def run_task(ds: DownstreamConfig, model: AVSANet, source, *, seed: int, device: torch.device,
             log: EpochLog | None = None,
             examples: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Train `ds.task`'s head on `source` (settings from `ds`; `seed` seeds the head and the
    minibatch order) and return its test metrics (see the task's class for which) with
    train/best_epoch, train/epochs and train/lr; per-example test results go to `examples`."""
    torch.manual_seed(seed)
    head = task_class(ds.task)(model, source, ds, device)
    result = head.fit(source, ds, seed, log)
    return {**head.score(source, examples), "train/best_epoch": float(result.best_epoch),
            "train/epochs": float(result.epochs), "train/lr": head.lr(ds)}


def with_progress(log: EpochLog, what: str, epochs: int) -> EpochLog:
    """`log`, and a line "[avsa] WHAT epoch E/EPOCHS  metrics" on stdout for the first epoch
    and then at most every PROGRESS_EVERY_S seconds, so a long head training shows it runs."""
    shown_at = -math.inf

    def log_and_show(metrics: dict[str, float], epoch: int) -> None:
        nonlocal shown_at
        log(metrics, epoch)
        if time.monotonic() - shown_at >= PROGRESS_EVERY_S:
            shown_at = time.monotonic()
            values = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"[avsa] {what} epoch {epoch + 1}/{epochs}  {values}", flush=True)

    return log_and_show


def _log_results(logger: tracking.RunLogger, task: str, examples: dict[str, np.ndarray],
                 class_names: Sequence[str]) -> None:
    """The per-example test results as the run's EXAMPLES artifact (for `avsa compare`) and
    the report made from them (confusion matrix, per-class table, overlays) under report/,
    its classes named by the source's `class_names`."""
    if not examples:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EXAMPLES
        np.savez_compressed(path, **{k: v for k, v in examples.items()
                                     if k not in report.OVERLAY_KEYS})
        logger.log_artifact(path)
        if report.write_report(task, examples, Path(tmp) / "report", labels=class_names):
            logger.log_artifact(Path(tmp) / "report", "report")


def _log_inputs(logger: tracking.RunLogger, cfg: Config, pre: Pretrained) -> None:
    """The shard sets (train, test) and the registered model the run started from."""
    log_datasets(logger, [(cfg.data.shards, "train"), (cfg.data.val_shards, "test")])
    if pre.version is not None and pre.version.model_id:
        from mlflow.entities import LoggedModelInput

        model = LoggedModelInput(pre.version.model_id)
        logger.attempt(f"the input model {pre.version.uri}",
                       lambda client: client.log_inputs(logger.run_id, models=[model]))


def run_transfer(cfg: Config, memo: dict | None = None) -> TransferResult:
    """Run `cfg.downstream.task` from `cfg.downstream.pretrain`; log and return the metrics.
    `memo`: a dict the caller keeps to reuse decoded clips across transfers (ShardSource)."""
    cfg = with_absolute_paths(cfg)  # the run records where its data and checkpoint are
    ds = cfg.downstream
    if ds.task != "action" and ds.mode == "finetune":
        log.warning("downstream.mode=finetune applies to action only; %s keeps the pretrained "
                    "network frozen", ds.task)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    seed = cfg.data.seed if ds.seed is None else ds.seed  # one replicate of a transfer cell
    pre = load_pretrained(cfg, uri, seed)
    context = ds.context if ds.task == "segmentation" else None
    mode = ds.mode if ds.task == "action" else None
    name = "-".join(p for p in (ds.task, context, mode, pre.pretext, f"s{seed}") if p)
    tags = {tracking.KIND: "transfer", tracking.TASK: ds.task, tracking.PRETRAIN_RUN: pre.ref,
            PRETEXT: pre.pretext, CONTEXT: context or "", MODE: mode or "", SEED: str(seed),
            ROW: ds.row or pre.pretext, CONFIG: config_digest(cfg, transfer=True)}
    # What the transfer ran with: the checkpoint's model and audio input, this command's rest.
    data = dataclasses.replace(cfg.data, audio_mode=pre.config.data.audio_mode,
                               audio_features=pre.config.data.audio_features)
    params = tracking.flatten_config({"downstream": dataclasses.replace(ds, seed=seed),
                                      "data": data, "model": pre.config.model})
    if pre.version is not None:
        tags[mlflow_models.MODEL_VERSION_TAG] = f"{pre.version.name}/{pre.version.version}"
    source = task_class(ds.task).source(data, ds, memo)  # unreadable data fails before the run
    with (tracking.RunLogger.start(uri, ds.experiment, name, tags=tags, params=params) as logger,
          system_metrics.sampling(logger, cfg.tracking)):
        _log_inputs(logger, cfg, pre)
        examples: dict[str, np.ndarray] = {}
        # The seed seeds the head only; the clips' windows and viewpoints follow data.seed, so
        # replicates can share decoded batches (`memo`, see ShardSource).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        metrics = run_task(ds, pre.model, source, seed=seed, device=device,
                           log=with_progress(logger.log_metrics, name, ds.epochs),
                           examples=examples)
        logger.log_metrics(metrics, step=ds.epochs)
        _log_results(logger, ds.task, examples, source.class_names)
    return TransferResult(ds.task, pre.pretext, pre.ref, logger.run_id, uri, ds.experiment,
                          context, mode, metrics)


def expand_overrides(args: list[str]) -> list[str]:
    """`pretrain=X` -> `downstream.pretrain=X` (and the other SHORT_KEYS); others unchanged."""
    return [f"downstream.{a}" if "=" in a and a.split("=", 1)[0].lstrip("+~") in SHORT_KEYS
            else a for a in args]


USAGE = (f"usage: avsa transfer TASK pretrain=RUN_ID|CHECKPOINT_URI|models:/NAME/VERSION|"
         f"models:/NAME/latest|models:/NAME@ALIAS|scratch [overrides...]\n"
         f"  TASK: one of {', '.join(TASKS)}\n"
         f"  e.g. avsa transfer segmentation pretrain=RUN_ID context=audio "
         f"data.val_shards=outputs/demo/shards/val")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    print(run_transfer(transfer_config(argv[0], argv[1:])).summary())
    return 0


def transfer_config(task: str, args: list[str]) -> Config:
    """The validated config of `avsa transfer TASK ARGS...`; no I/O. Raises ConfigError."""
    task_class(task)  # an unknown task fails before composing
    return compose([*expand_overrides(args), f"downstream.task={task}"])
