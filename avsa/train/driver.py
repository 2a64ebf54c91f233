"""The run driver: `run` takes one Ray Train run (a pretraining, or a sweep trial) from its
MLflow run's start to its end; `pretrain` (`avsa pretrain`) first checks what can fail cheaply
(config, manifest, tracking server) and holds the run directory. Run name and storage path are
deterministic, so a resubmitted job resumes its own checkpoints and MLflow run, or reports the
run without starting Ray once it has finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from avsa import lease, resources, storage, tracking
from avsa.config import Config, config_digest, with_absolute_paths
from avsa.config_checks import check_batch_fits_data, short_clips_warning, temperature_warning
from avsa.data.manifest import read_manifest
from avsa.errors import AvsaError, CheckpointError, StorageError
from avsa.progress import is_terminal
from avsa.tracking import models
from avsa.tracking.datasets import log_datasets
from avsa.train import interrupt, resume
from avsa.train.ray_setup import ensure_ray

log = logging.getLogger("avsa.train")
VAL_SEED = 12345  # the validation set's windows and viewpoints, the same in every run
RUN_MARKER = "avsa_run.json"  # in every run directory: the digest of the config it belongs to


@dataclass
class RunResult:
    run_id: str
    run_name: str
    run_uri: str
    checkpoint_uri: str | None
    metrics: dict[str, Any]


def claim_run_dir(cfg: Config, run_uri: str, *, sweep: bool = False) -> None:
    """Make `run_uri` this config's run directory (`avsa_run.json` holds its config digest,
    with `sweep` the sweep's), or raise CheckpointError when it holds another config's
    checkpoints. As the run's first write (under the directory's lease) it also fails an
    unwritable storage path before Ray."""
    marker = storage.join(run_uri, RUN_MARKER)
    digest = config_digest(cfg, sweep=sweep)
    try:
        if storage.exists(marker):
            try:
                held = json.loads(storage.read_bytes(marker))["config_digest"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(marker, "unreadable run marker; move the run directory "
                                              "aside or choose another storage.run_name") from None
            if held != digest:
                raise CheckpointError(run_uri, f"holds the checkpoints of another config (digest "
                                               f"{held}, this config {digest}); choose another "
                                               f"storage.run_name or storage.path")
            return
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        body = {"config_digest": digest, "run_name": run_uri.rstrip("/").rsplit("/", 1)[-1],
                "created": created}
        storage.write_bytes(marker, json.dumps(body, indent=1).encode())
    except StorageError as e:
        raise CheckpointError(run_uri, f"cannot use the run directory ({e.reason})") from None


def project_error(exc: BaseException) -> AvsaError | None:
    """The avsa error behind a Ray Train failure (a worker's CheckpointError, ...), to report
    as one line instead of Ray's wrapper."""
    failures = getattr(exc, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        # Ray wraps each worker's exception with its traceback text.
        base = getattr(failure, "_base_exc", failure)
        if isinstance(base, AvsaError):
            return base
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, AvsaError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def data_epochs(cfg: Config, total_samples: int, run_uri: str) -> tuple[int, int]:
    """(start epoch, epochs) of the streaming dataset of the run at `run_uri`: the epoch of the
    step its newest complete checkpoint holds (where its workers resume), so a resumed run goes
    on through new shard orders instead of repeating epoch 0's, and enough epochs to cover the
    steps left to `train.max_steps`, with slack for skips."""
    done = resume.checkpoints(run_uri)  # newest first
    start_step = done[0][0] if done else 0
    per_epoch = max(total_samples // cfg.train.batch_size, 1)
    left = max(cfg.train.max_steps - start_step, 0)
    return start_step // per_epoch, max(1, math.ceil(left / per_epoch) + 1)


def build_trainer(cfg: Config, logger: tracking.RunLogger | None,
                  callbacks: Sequence[Any] = ()):
    """The `TorchTrainer` of one run; its rank 0 logs through `logger`'s run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from avsa.data.pipeline import build_dataset
    from avsa.train.loop import has_validation, train_loop_per_worker

    quiet_data_progress()  # first: each dataset keeps a copy of the DataContext
    run_name = cfg.run_name()
    run_uri = storage.join(cfg.storage.path, run_name)
    manifest = read_manifest(cfg.data.shards)
    other_time = cfg.loss.kind == "avts"
    batch = cfg.train.batch_size
    start_epoch, epochs = data_epochs(cfg, manifest.total_samples, run_uri)
    datasets = {"train": build_dataset(
        cfg.data.shards, cfg.data, epochs=epochs, start_epoch=start_epoch,
        seed=cfg.data.seed, other_time=other_time, batch_size=batch)}
    if has_validation(cfg):  # decoded by Ray Data when rank 0 first validates
        datasets["val"] = build_dataset(
            cfg.data.val_shards, replace(cfg.data, augment=False), epochs=1, seed=VAL_SEED,
            other_time=other_time, shuffle=False, batch_size=batch,
            limit=cfg.train.val_batches * batch)
    fs, path = storage.pyarrow_filesystem(cfg.storage.path)
    return TorchTrainer(
        train_loop_per_worker,
        # logger: a pickled copy, the same run, opened once, here
        train_loop_config={"cfg": cfg.to_dict(), "logger": logger, "run_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # Ray Train replaces each dataset's execution options with these: the bounded ones
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options={k: d.context.execution_options for k, d in datasets.items()}),
    )


def quiet_data_progress(stream: Any = None) -> None:
    """Turn Ray Data's progress bars off when `stream` (default stderr) is not a terminal: in a
    log every redraw is a line, hundreds a minute, burying the loop's step lines that say the
    same. RAY_DATA_DISABLE_PROGRESS_BARS, when set, decides instead."""
    from ray.data import DataContext

    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ and not is_terminal(stream):
        DataContext.get_current().enable_progress_bars = False


def start_tracking(
    cfg: Config, *, kind: str = "pretrain", parent_run_id: str | None = None,
    run_name: str | None = None, run_uri: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> tracking.RunLogger:
    """Create (or find again, for a resubmitted job) the MLflow run of `cfg.run_name()` (or
    `run_name`) whose directory is `run_uri` (default: `<storage.path>/<run name>`), and open
    its logger: the one logger of the run, which the caller ends."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    run_name = run_name or cfg.run_name()
    run_uri = run_uri or storage.join(cfg.storage.path, run_name)
    tags = {tracking.KIND: kind, tracking.RUN_URI: run_uri, **(extra_tags or {})}
    # the same name at another storage.path is another run, its checkpoints elsewhere
    existing = tracking.find_run(uri, cfg.tracking.experiment, run_name, run_uri)
    logger = tracking.RunLogger.start(
        uri, cfg.tracking.experiment, run_name, tags=tags,
        params=None if existing else tracking.flatten_config(cfg.to_dict()),
        parent_run_id=parent_run_id, resume_run_id=existing,
    )
    with contextlib.ExitStack() as ends_the_run_on_error:  # a signal here too: not RUNNING
        ends_the_run_on_error.enter_context(logger)
        if existing:
            log.info("resuming MLflow run %s (%s)", existing, run_name)
        else:
            from omegaconf import OmegaConf

            logger.log_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), "config.yaml")
            log_datasets(logger, [(cfg.data.shards, "train"), (cfg.data.val_shards, "val")])
        logger.flush()
        ends_the_run_on_error.pop_all()
    return logger


def run(cfg: Config, callbacks: Sequence[Any] = (), *, parent_run_id: str | None = None,
        trial_tags: Mapping[str, str] | None = None) -> RunResult:
    """One Ray Train run, its MLflow run ended FINISHED, FAILED or KILLED (by a signal): a
    pretraining, or with `parent_run_id` (its sweep's MLflow run) a sweep trial tagged
    `trial_tags` (its model logged, not registered). Expects absolute local paths and Ray
    started (see `pretrain`)."""
    run_name = cfg.run_name()
    run_uri = storage.join(cfg.storage.path, run_name)
    logger = start_tracking(cfg, kind="pretrain" if parent_run_id is None else "trial",
                            parent_run_id=parent_run_id, extra_tags=trial_tags)
    controller: dict = {}
    with logger:  # FINISHED, or FAILED on an error (a signal ends it KILLED below)
        try:
            trainer = build_trainer(cfg, logger, callbacks)
            controller = interrupt.keep_controller(trainer)
            result = trainer.fit()
            metrics = dict(result.metrics or {})
            checkpoint_uri = _checkpoint_uri(cfg, result)
            if checkpoint_uri:
                logger.set_tags({tracking.CHECKPOINT: checkpoint_uri})
            models.log_final(logger, cfg, checkpoint_uri, register=parent_run_id is None,
                             step=int(metrics.get("step", 0)))
        except KeyboardInterrupt as k:
            interrupt.stop_controller(controller)
            raise interrupt.record_killed(logger, run_uri, interrupt.as_interrupted(k)) from None
        except Exception as e:
            cause = project_error(e)
            if cause is not None:
                raise cause from None
            raise
    return RunResult(logger.run_id, run_name, run_uri, checkpoint_uri, metrics)


def check_inputs(cfg: Config) -> None:
    """The shards' manifests read and the batch checked against them, and the tracking store
    reachable: a clear error before Ray starts, not inside a worker."""
    for uri in filter(None, (cfg.data.shards, cfg.data.val_shards)):
        man = read_manifest(uri)
        if uri == cfg.data.shards:
            check_batch_fits_data(cfg, man.total_samples)
        if warning := short_clips_warning(uri, man.min_seconds, cfg.data):
            log.warning(warning)
    tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking.uri))


def pretrain(cfg: Config, callbacks: Sequence[Any] = ()) -> RunResult:
    """Run (or resume) one pretraining end to end, relative paths taken against the current
    directory; returns where its results are."""
    cfg = with_absolute_paths(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)  # refused inside a job with no server
    check_inputs(cfg)
    if warning := temperature_warning(cfg.loss.temperature):
        log.warning(warning)
    run_name = cfg.run_name()
    run_uri = storage.join(cfg.storage.path, run_name)
    with hold_run_dir(run_uri, "avsa pretrain", cfg.storage.lease_wait_s):
        claim_run_dir(cfg, run_uri)
        if (newest := resume.prepare(run_uri)) is not None:
            if newest[0] >= cfg.train.max_steps and (done := finished_run(cfg, uri)):
                log.info("%s finished before, at step %d: nothing left to train", run_name,
                         newest[0])
                return replace(done, metrics={**done.metrics, "step": newest[0]})
            log.info("resuming from %s (step %d)", newest[1], newest[0])
        ensure_ray(cfg)
        with interrupt.signals_raise(), resources.check_and_watch(cfg, f"pretraining {run_name}"):
            return run(cfg, callbacks=callbacks)


def finished_run(cfg: Config, uri: str) -> RunResult | None:
    """This config's run when the tracking store at `uri` holds it FINISHED with its
    checkpoint: a resubmitted job, or `avsa reproduce` again, reports it instead of starting
    Ray and workers. None otherwise."""
    name = cfg.run_name()
    run_uri = storage.join(cfg.storage.path, name)
    run_id = tracking.find_run(uri, cfg.tracking.experiment, name, run_uri)
    run = tracking.get_run(uri, run_id) if run_id else None
    checkpoint = run.data.tags.get(tracking.CHECKPOINT) if run else None
    if not checkpoint or run.info.status != "FINISHED":
        return None
    return RunResult(run_id, name, run_uri, checkpoint, dict(run.data.metrics))


def hold_run_dir(run_uri: str, what: str, wait_s: float) -> contextlib.AbstractContextManager:
    """The run directory's lease (one writer per directory), for a `with` block."""
    try:
        return lease.hold(run_uri, what, wait_s)
    except StorageError as e:
        raise CheckpointError(run_uri, f"cannot use the run directory ({e.reason})") from None


def _checkpoint_uri(cfg: Config, result) -> str | None:
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    if storage.is_s3(cfg.storage.path) and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


USAGE = ("usage: avsa pretrain [hydra overrides...]   e.g. experiment=demo_local "
         "data.num_viewpoints=2 train.max_steps=500")


def main(argv: list[str]) -> int:
    return interrupt.run_command("pretrain", argv, USAGE, pretrain, print_summary)


def print_summary(res: RunResult, cfg: Config) -> None:
    m = res.metrics
    keys = ("val/avsa_acc", "val/avc_acc", "train/avsa_acc", "train/avc_acc", "train/loss")
    shown = "  ".join(f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), float))
    print(f"[avsa] finished {res.run_name} at step {m.get('step', '?')}: {shown}")
    print(f"[avsa] checkpoints: {res.checkpoint_uri or res.run_uri}")
    print(f"[avsa] MLflow run {res.run_id} in experiment {cfg.tracking.experiment!r} at "
          f"{tracking.redact(tracking.resolve_tracking_uri(cfg.tracking.uri))}")
