"""The per-worker training loop that Ray Train runs on every rank.

Rank 0 logs to MLflow and writes checkpoints; every rank calls `ray.train.report` at the same
steps, checkpoints and validations only (it is a barrier). Metrics stay on the device between
log intervals: the only host syncs are at `train.log_every`, validation and checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avsa import lease, storage
from avsa.config import Config, audio_channels, from_dict
from avsa.errors import CheckpointError
from avsa.models import build_model, unwrap
from avsa.models.inputs import to_channels_last, to_device, use_channels_last
from avsa.tracking import system_metrics
from avsa.train import checkpoint as ckpt
from avsa.train import resume
from avsa.train.batches import fetch_first_ahead, local_batches, model_rows
from avsa.train.objective import (
    compute_objective,
    leaves_parameters_unused,
    reset_context_and_heads,
)

log = logging.getLogger("avsa.train")


@dataclass
class Meter:
    """Sums of 0-d device tensors between log intervals (no host sync per step), each metric
    averaged over the steps that reported it (AVSA's only after a curriculum's switch)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{k}": float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def chance_score(acc: float, candidates: int) -> float:
    """Accuracy rescaled so chance (1 / candidates) is 0 and perfect is 1."""
    if candidates <= 1:
        return float("nan")
    chance = 1.0 / candidates
    return (acc - chance) / (1.0 - chance)


def phase_kind(cfg: Config, step: int) -> str:
    """The objective at (1-based) `step`: AVC first when the curriculum is on."""
    if cfg.train.curriculum and step <= cfg.train.curriculum_avc_steps:
        return "avc"
    return cfg.loss.kind


def _gather():
    import torch.distributed as dist

    from avsa.losses import gather_with_grad

    return gather_with_grad if dist.is_available() and dist.is_initialized() else None


def _batches(cfg: Config, world: int, rank: int,
             step: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Fixed-size local batches (batch_size // world real samples) from this worker's dataset
    shard, shuffled through a `data.shuffle_buffer` buffer seeded by (train.seed, rank, the
    step it starts from), and the samples skipped upstream (corrupt clips) counted as their
    rows arrive (see avsa.train.batches). The first is fetched from this call on."""
    import ray.train

    from avsa.data.pipeline import CONSUMER_PREFETCH_BATCHES

    it = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.train.batch_size // world,
        drop_last=False,
        prefetch_batches=CONSUMER_PREFETCH_BATCHES,  # what the read-ahead bound assumes
        # Host tensors: the bookkeeping (int, bool) never syncs the device; batches are drawn
        # into pinned memory on GPU machines, so the loop's `to_device` copy is asynchronous.
        device="cpu",
    )
    seed = np.random.SeedSequence([cfg.train.seed, rank, step]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(seed))
    return fetch_first_ahead(local_batches(it, cfg.train.batch_size // world,
                                           cfg.data.shuffle_buffer, gen,
                                           pin=torch.cuda.is_available()))


def _val_batches(cfg: Config) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set (no augmentation, fixed seed, manifest order): the driver's
    "val" dataset, decoded by Ray Data tasks when first read (not before step 1), kept."""
    import ray.train

    it = ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=cfg.train.batch_size, drop_last=False, device="cpu")
    batches = (model_rows(b) for b in itertools.islice(it, cfg.train.val_batches))
    return [b for b in batches if len(b["video"])]


def has_validation(cfg: Config) -> bool:
    return bool(cfg.data.val_shards) and cfg.train.val_batches > 0


def _objective(model, batch, cfg: Config, device: torch.device, kind: str, gather=None,
               channels_last: bool | None = None):
    """(loss, metrics) of `kind` on a host batch: copied to `device`, run under bf16 autocast
    on CUDA when `train.bf16`."""
    bf16 = cfg.train.bf16 and device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        return compute_objective(model, to_device(batch, device), kind=kind,
                                 temperature=cfg.loss.temperature,
                                 easy_negatives=cfg.loss.easy_negatives, gather=gather,
                                 channels_last=channels_last)


def train_step(model, optimizer, batch: dict[str, torch.Tensor], cfg: Config,
               device: torch.device, *, kind: str, gather=None,
               channels_last: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on a host batch (see `avsa.train.objective` for its keys and shapes).

    gather: the cross-rank gather of embeddings (None: this rank's only); channels_last: the
    video layout (None: on CUDA). Returns the loss and metrics as 0-d device tensors: nothing
    here waits for the device.
    """
    loss, metrics = _objective(model, batch, cfg, device, kind, gather, channels_last)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, metrics


@torch.no_grad()
def validate(model, batches, cfg: Config, device) -> dict[str, float]:
    if not batches:
        return {}
    model.eval()
    meter = Meter()
    kind = cfg.loss.kind
    for batch in batches:
        loss, metrics = _objective(model, batch, cfg, device, kind)
        meter.add({"loss": loss, **metrics})
    model.train()
    out = meter.mean("val")
    v, n = cfg.data.num_viewpoints, cfg.train.batch_size
    if kind == "avsa" and v > 1:
        out["val/avsa_score"] = chance_score(out["val/avsa_acc"], v)
    else:
        out["val/avsa_score"] = chance_score(out.get("val/avc_acc", float("nan")), n)
    return out


STAGING_PREFIX = "avsa-ckpt-"  # + "<pid>-": a worker's checkpoint on its way to storage.path


def remove_dead_staging(tmp: str | os.PathLike | None = None) -> None:
    """Remove the staging folders of workers that died inside `_report` (a killed process runs
    no cleanup, and each folder holds a whole checkpoint) from `tmp` (default: the temp dir)."""
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = d.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not lease.pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _report(metrics: dict[str, float], run_uri: str, step: int, state_fn=None) -> None:
    import ray.train

    if state_fn is None:
        ray.train.report(metrics)
        return
    name = f"checkpoint-{step:08d}"
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as d:
        state_fn(d)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=name)
        except OSError as e:  # the upload to storage.path: read-only, full, a file in the way
            reason = " ".join(str(e.strerror or e).split())[:300]
            raise CheckpointError(storage.join(run_uri, name),
                                  f"cannot write checkpoint ({reason})") from None
    resume.commit(storage.join(run_uri, name), step)  # the upload has returned: complete


def _resume_state(run_uri: str) -> tuple[int, dict[str, Any] | None]:
    """(step, state) of the newest complete checkpoint: on storage, or Ray's if newer (a
    restart inside this run whose commit marker is not written yet)."""
    import ray.train

    found = resume.newest_loadable(run_uri, set_aside=False)
    step, state = (found[0], found[2]) if found else (0, None)
    theirs = ray.train.get_checkpoint()
    if theirs is not None:
        m = re.search(r"checkpoint-(\d+)$", theirs.path.rstrip("/"))
        if m is None or int(m.group(1)) > step:
            with theirs.as_directory() as d:
                state = ckpt.load(d)
            step = int(state["step"])
    return step, state


def _logged_through(logger) -> int:
    """The last step already in the MLflow run (an earlier attempt logged it): 0 if none."""
    from avsa.tracking import last_logged_step

    try:
        return last_logged_step(logger.uri, logger.run_id)
    except Exception as e:  # tracking never fails training: log everything then
        log.warning("cannot read the steps already logged (%s); logging every step", e)
        return 0


def quiet_report_lines() -> None:
    """Drop Ray Train's INFO line for each `ray.train.report` (every metric, from every rank,
    repeating the step lines). Its logger is named by its module's file, out of the reach of
    `RunConfig(logging_config=...)`; on a Ray without that module this does nothing."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: `loop_config` = {"cfg": Config.to_dict(), "logger": the run's
    `tracking.RunLogger` (rank 0 logs through its copy; None: no tracking), "run_uri"}."""
    import ray.train
    import ray.train.torch

    quiet_report_lines()
    remove_dead_staging()  # left by this node's workers that Ctrl-C or a failure killed
    cfg: Config = from_dict(loop_config["cfg"])
    tracker, run_uri = loop_config["logger"], loop_config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(cfg.model, audio_channels(cfg.data))
    if use_channels_last(device):
        to_channels_last(model)  # before DDP: its gradient buckets follow the weights' layout
    step, state = _resume_state(run_uri)
    batches = _batches(cfg, world, rank, step)  # the data's start overlaps what follows
    if state is not None:
        model.load_state_dict(state["model"])
    elif cfg.model.init_from:
        tracking_uri = tracker.uri if tracker is not None else None
        init_state, _ = ckpt.resolve_init(cfg.model.init_from, tracking_uri)
        model.load_encoders(init_state["model"])
    find_unused = leaves_parameters_unused(cfg.loss.kind, cfg.model.use_transformer,
                                           cfg.train.curriculum)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    if cfg.train.compile:
        model = torch.compile(model)
    raw_model = unwrap(model)

    def adam() -> torch.optim.Adam:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                weight_decay=cfg.train.weight_decay)

    optimizer = adam()
    if state is not None:
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        log.info("rank %d resumed from step %d", rank, step)

    logger = tracker if rank == 0 else None
    logged_through = _logged_through(logger) if logger is not None else 0
    validating = has_validation(cfg)  # every rank reports at validation steps; rank 0 validates
    val = None  # read at the first validation
    monitor = system_metrics.start(logger, cfg.tracking)  # None unless rank 0 logs
    gather = _gather()
    # Samples skipped upstream: this worker's since it started, and the run's (all ranks, all
    # attempts) as of the last log or checkpoint, which a checkpoint carries over a restart.
    meter, skipped = Meter(), 0
    skipped_total = ckpt.skipped_samples(state) if state is not None else 0
    skipped_before = skipped_total
    t_last, clips_since, t_start, step_start = time.perf_counter(), 0, time.perf_counter(), step
    model.train()

    def save_fn(d):
        ckpt.save(d, model=raw_model, optimizer=optimizer, step=step, config=loop_config["cfg"],
                  skipped_samples=skipped_total)

    for batch, skipped_here in batches:
        if step >= cfg.train.max_steps:
            break
        step += 1
        kind = phase_kind(cfg, step)
        if cfg.train.curriculum and step == cfg.train.curriculum_avc_steps + 1:
            reset_context_and_heads(raw_model, cfg.train.seed + step)
            optimizer = adam()
            log.info("curriculum: AVC -> %s at step %d (fresh transformers and heads)", kind, step)
        skipped += skipped_here
        loss, metrics = train_step(model, optimizer, batch, cfg, device, kind=kind, gather=gather)
        meter.add({"loss": loss, **metrics})
        clips_since += cfg.train.batch_size // world * world

        last = step >= cfg.train.max_steps
        do_log = step % cfg.train.log_every == 0 or last
        val_step = validating and (
            last or (cfg.train.val_every > 0 and step % cfg.train.val_every == 0))
        do_ckpt = step % cfg.train.checkpoint_every == 0 or last
        if not (do_log or do_ckpt):
            continue
        metrics_out: dict[str, float] = {"step": step}
        skipped_total = skipped_before + _all_reduce_sum(skipped, device)  # every rank is here
        if do_log:
            now = time.perf_counter()
            metrics_out.update(meter.mean("train"))
            metrics_out["throughput/clips_per_s"] = clips_since / max(now - t_last, 1e-9)
            metrics_out["data/skipped_samples"] = skipped_total
            rate = (step - step_start) / max(now - t_start, 1e-9)
            eta = (cfg.train.max_steps - step) / max(rate, 1e-9)
            t_last, clips_since = now, 0
        if rank == 0 and val_step:
            # The unwrapped module: only rank 0 validates, and a DDP forward would wait for
            # the other ranks in its buffer broadcast (a deadlock with num_workers > 1).
            val = _val_batches(cfg) if val is None else val
            metrics_out.update(validate(raw_model, val, cfg, device))
        if rank == 0 and do_log:
            _progress(step, cfg.train.max_steps, metrics_out, eta)
            if logger is not None and step > logged_through:  # never one step twice
                logger.log_metrics({k: v for k, v in metrics_out.items() if k != "step"}, step)
        # Ray Train's controller takes one report per worker every 2 s (its health-check
        # interval) and holds the step that reports again sooner: only checkpoints and
        # validations (what Tune schedules on) go to Ray; every log step goes to MLflow.
        if do_ckpt or val_step:
            _report(metrics_out, run_uri, step, save_fn if (do_ckpt and rank == 0) else None)
    if step < cfg.train.max_steps and step % cfg.train.checkpoint_every != 0:
        skipped_total = skipped_before + _all_reduce_sum(skipped, device)
        _report({"step": step}, run_uri, step, save_fn if rank == 0 else None)
    if monitor is not None:
        monitor.stop()
    if logger is not None:
        logger.drain()  # what the server missed while down, before this process exits
    if step < cfg.train.max_steps:
        log.warning("rank %d: the data ran out at step %d of %d (train.max_steps); the run "
                    "ends here", rank, step, cfg.train.max_steps)


def _all_reduce_sum(x: float, device: torch.device) -> float:
    import torch.distributed as dist

    y = torch.tensor(float(x), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(y)
    return float(y)


def _progress(step: int, total: int, m: dict[str, float], eta_s: float) -> None:
    parts = [f"step {step}/{total}"]
    for key in ("train/loss", "train/avsa_acc", "train/avc_acc", "val/avsa_acc", "val/avc_acc"):
        if key in m and not math.isnan(m[key]):
            parts.append(f"{key.split('/')[0][0]}:{key.split('/')[1]} {m[key]:.3f}")
    parts.append(f"clips/s {m.get('throughput/clips_per_s', 0):.1f}")
    parts.append(f"eta {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")
    # Not print(): Ray Train patches it in workers to tee into the logger, which doubles the line.
    sys.stdout.write("[avsa] " + "  ".join(parts) + "\n")
    sys.stdout.flush()
