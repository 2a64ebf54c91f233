"""`avsa pretrain`: validate, check services, then run a Ray Train `TorchTrainer`.

Everything that can fail cheaply (config, manifest, tracking server) is checked before a worker
starts. The run name and storage path are deterministic, so a resubmitted job finds its own
checkpoints and its own MLflow run and resumes both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from avsa import lease, resources, storage, tracking
from avsa.config import Config, compose, with_absolute_paths
from avsa.config_checks import check_batch_fits_data, temperature_warning
from avsa.data.manifest import read_manifest
from avsa.errors import AvsaError, CheckpointError, StorageError
from avsa.tracking import outputs as run_outputs
from avsa.train import interrupt, resume

log = logging.getLogger("avsa.train")
VAL_SEED = 12345  # the validation set's windows and viewpoints, the same in every run
RUN_MARKER = "avsa_run.json"  # in every run directory: the digest of the config it belongs to


@dataclass
class PretrainResult:
    run_id: str | None
    run_name: str
    run_uri: str
    checkpoint_uri: str | None
    metrics: dict[str, Any]


# Credentials Ray Tune would copy from the driver's environment into every trial actor's
# runtime_env, which Ray's runtime-env agent then writes to its log in clear text.
_CREDENTIAL_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                             "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying AWS credentials into trial actors' runtime_env (and so into
    Ray's logs and actor table). Workers do not need the copy: a local Ray's processes inherit
    this process's environment, and cluster pods get the credentials from their Secret."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # pragma: no cover - another Ray layout: nothing copied there
        return
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - _CREDENTIAL_ENV


def ensure_ray(cfg: Config) -> None:
    """Join the cluster in `RAY_ADDRESS` (as under `ray job submit`), or start a local Ray
    with enough logical CPUs for the train workers plus decoding tasks."""
    import ray

    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + 2 * cfg.data.decode_cpus
    num_cpus = max(os.cpu_count() or 1, math.ceil(need))
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
            return
        except Exception as e:  # Ray raises a bare Exception when its raylet starts too slowly
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            log.warning("local Ray did not start in time (busy machine?); trying once more")
            ray.shutdown()


def config_digest(cfg: Config) -> str:
    """16 hex digits of sha256 over what shapes a run's checkpoints: the config without where
    it is stored and tracked, the sweep and downstream settings, and `train.fail_at_step`."""
    d = cfg.to_dict()
    for volatile in ("sweep", "downstream", "tracking", "storage"):
        d.pop(volatile)
    d["train"].pop("fail_at_step")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def claim_run_dir(cfg: Config, run_uri: str) -> None:
    """Make `run_uri` this config's run directory, or refuse it.

    The first run in a directory writes `avsa_run.json` with its config digest; a run with
    another config sent to the same directory (the same `storage.run_name` under the same
    `storage.path`) gets a CheckpointError instead of resuming from, and overwriting, the
    other's checkpoints. The same config resubmitted finds its own digest and resumes. This is
    also the run's first write, so an unwritable storage path fails here, before Ray starts.
    It runs under the run directory's lease, so two runs cannot both miss the marker.
    """
    marker = storage.join(run_uri, RUN_MARKER)
    digest = config_digest(cfg)
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
        body = {"config_digest": digest, "run_name": cfg.run_name(), "created": created}
        storage.write_bytes(marker, json.dumps(body, indent=1).encode())
    except StorageError as e:
        raise CheckpointError(run_uri, f"cannot use the run directory ({e.reason})") from None


def project_error(exc: BaseException) -> AvsaError | None:
    """The avsa error behind a Ray Train failure (a worker's CheckpointError, ShardError, ...),
    so the command reports it as one line instead of Ray's multi-line wrapper."""
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


def epochs_needed(cfg: Config, total_samples: int) -> int:
    """Epochs of the streaming dataset that cover `train.max_steps` (with slack for skips)."""
    per_epoch = max(total_samples // cfg.train.batch_size, 1)
    return max(1, math.ceil(cfg.train.max_steps / per_epoch) + 1)


def build_trainer(
    cfg: Config,
    *,
    run_id: str | None,
    tracking_uri: str | None,
    callbacks: list | None = None,
    run_name: str | None = None,
):
    """The `TorchTrainer` for one pretraining run (also what each sweep trial runs)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from avsa.data.pipeline import build_dataset
    from avsa.train.loop import has_validation, train_loop_per_worker

    run_name = run_name or cfg.run_name()
    manifest = read_manifest(cfg.data.shards)
    other_time = cfg.loss.kind == "avts"
    batch = cfg.train.batch_size
    datasets = {"train": build_dataset(
        cfg.data.shards, cfg.data, epochs=epochs_needed(cfg, manifest.total_samples),
        seed=cfg.data.seed, other_time=other_time, batch_size=batch)}
    if has_validation(cfg):  # decoded by Ray Data when rank 0 first validates
        datasets["val"] = build_dataset(
            cfg.data.val_shards, replace(cfg.data, augment=False), epochs=1, seed=VAL_SEED,
            other_time=other_time, shuffle=False, batch_size=batch,
            limit=cfg.train.val_batches * batch)
    fs, path = storage.pyarrow_filesystem(cfg.storage.path)
    loop_config = {
        "cfg": cfg.to_dict(),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "run_uri": storage.join(cfg.storage.path, run_name),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Ray Train replaces each dataset's execution options with these: the bounded ones
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options={k: d.context.execution_options for k, d in datasets.items()}),
    )


def start_tracking(
    cfg: Config, *, kind: str = "pretrain", parent_run_id: str | None = None,
    run_name: str | None = None, extra_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Create (or find again, for a resubmitted job) the MLflow run. Returns (uri, run id)."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    run_name = run_name or cfg.run_name()
    run_uri = storage.join(cfg.storage.path, run_name)
    tags = {tracking.KIND: kind, "avsa.run_uri": run_uri, **(extra_tags or {})}
    existing = tracking.find_run(uri, cfg.tracking.experiment, run_name)
    logger = tracking.RunLogger.start(
        uri, cfg.tracking.experiment, run_name, tags=tags,
        params=None if existing else tracking.flatten_config(cfg.to_dict()),
        parent_run_id=parent_run_id, resume_run_id=existing,
    )
    if existing:
        log.info("resuming MLflow run %s (%s)", existing, run_name)
    else:
        from omegaconf import OmegaConf

        logger.log_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), "config.yaml")
        run_outputs.log_pretraining_inputs(logger, cfg)
    logger.flush()
    return uri, logger.run_id


def pretrain(cfg: Config) -> PretrainResult:
    """Run (or resume) one pretraining run end to end; returns where its results are.
    Relative local paths in cfg are taken against the current directory."""
    cfg = with_absolute_paths(cfg)
    tracking.resolve_tracking_uri(cfg.tracking.uri)  # refused here inside a job with no server
    manifest = read_manifest(cfg.data.shards)  # a clear error now, not inside a worker
    check_batch_fits_data(cfg, manifest.total_samples)
    if cfg.data.val_shards:
        read_manifest(cfg.data.val_shards)
    if warning := temperature_warning(cfg.loss.temperature):
        log.warning(warning)
    run_name = cfg.run_name()
    run_uri = storage.join(cfg.storage.path, run_name)
    with hold_run_dir(run_uri, "avsa pretrain", cfg.storage.lease_wait_s):
        claim_run_dir(cfg, run_uri)
        resume.prepare(run_uri)
        ensure_ray(cfg)
        with interrupt.signals_raise():
            return _run(cfg, run_name, run_uri)


@contextlib.contextmanager
def hold_run_dir(run_uri: str, what: str, wait_s: float) -> Iterator[None]:
    """The run directory's lease (one writer per directory) for the block."""
    try:
        me = lease.acquire(run_uri, what, wait_s)
    except StorageError as e:
        raise CheckpointError(run_uri, f"cannot use the run directory ({e.reason})") from None
    with lease.kept(run_uri, me):
        yield


def _run(cfg: Config, run_name: str, run_uri: str) -> PretrainResult:
    """From the MLflow run's start to its end: every way out ends the run (FINISHED, FAILED,
    or KILLED by a signal)."""
    waiting = resources.check_and_watch(cfg, f"pretraining {run_name}")
    uri, run_id = start_tracking(cfg)
    logger = tracking.RunLogger.start(uri, cfg.tracking.experiment, None, resume_run_id=run_id)
    controller: dict = {}
    try:
        trainer = build_trainer(cfg, run_id=run_id, tracking_uri=uri)
        controller = interrupt.keep_controller(trainer)
        with waiting:
            result = trainer.fit()
        checkpoint_uri = _checkpoint_uri(cfg, result)
        if checkpoint_uri:
            logger.set_tags({tracking.CHECKPOINT: checkpoint_uri})
        run_outputs.finish_pretraining(logger, cfg, checkpoint_uri, register=True,
                                       step=int((result.metrics or {}).get("step", 0)))
    except KeyboardInterrupt as k:  # a signal (see avsa.train.interrupt)
        interrupt.stop_controller(controller)
        e = interrupt.as_interrupted(k)
        raise interrupt.record_killed(logger, uri, run_id, run_uri, e) from None
    except BaseException as e:
        logger.end("FAILED")
        cause = project_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise cause from None
        raise
    logger.end("FINISHED")
    metrics = dict(result.metrics or {})
    return PretrainResult(run_id, run_name, run_uri, checkpoint_uri, metrics)


def _checkpoint_uri(cfg: Config, result) -> str | None:
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    if storage.is_s3(cfg.storage.path) and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: avsa pretrain [hydra overrides...]   e.g. experiment=demo_local "
              "data.num_viewpoints=8 train.max_steps=500")
        return 0
    cfg = compose(argv)
    try:
        res = pretrain(cfg)
    except KeyboardInterrupt as k:
        e = interrupt.as_interrupted(k)
        interrupt.shutdown_ray()
        print(interrupt.resume_line("pretrain", argv, e), file=sys.stderr)
        return e.exit_code
    print_summary(res, cfg)
    return 0


def print_summary(res: PretrainResult, cfg: Config) -> None:
    m = res.metrics
    keys = ("val/avsa_acc", "val/avc_acc", "train/avsa_acc", "train/avc_acc", "train/loss")
    shown = "  ".join(f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), float))
    print(f"[avsa] finished {res.run_name} at step {m.get('step', '?')}: {shown}")
    print(f"[avsa] checkpoints: {res.checkpoint_uri or res.run_uri}")
    print(f"[avsa] MLflow run {res.run_id} in experiment {cfg.tracking.experiment!r} at "
          f"{tracking.redact(tracking.resolve_tracking_uri(cfg.tracking.uri))}")
