"""`avsa sweep`: a Ray Tune search over config keys (see avsa.sweep.space); every trial runs
the run driver. Layout under `storage.path` (local or s3://):
  sweeps/<sweep>/                 the Tune experiment (its state, one folder per trial)
  sweeps/<sweep>/trials/<trial>/  each trial's Ray Train run and checkpoints
  sweeps/<sweep>/sweep_results.csv, sweep_plot.png
MLflow: a parent run named <sweep> (avsa.kind=sweep), a child per trial (avsa.kind=trial).
Sweep and trial names are deterministic, so the same command restores the Tune experiment
(finished trials kept, the others resumed from their checkpoints) and finds the same runs.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avsa import resources, storage, tracking
from avsa.config import Config, with_absolute_paths
from avsa.config_checks import temperature_warning
from avsa.errors import ConfigError
from avsa.sweep import report as sweep_report
from avsa.sweep.space import (
    apply_params,
    check_space,
    flatten_space,
    scheduler_metric,
    sweep_run_name,
    trial_run_name,
    tune_space,
)
from avsa.tracking import models
from avsa.train import driver as train_driver
from avsa.train import interrupt, ray_setup, resume

log = logging.getLogger("avsa.sweep")

# The trainable only launches a TorchTrainer, whose workers reserve their own CPUs/GPUs.
TRIAL_DRIVER_CPU = 0.01
# Restarts of a trial whose driver died (its Train run resumes from its last checkpoint);
# worker failures inside a trial are Ray Train's (train.max_failures).
TRIAL_RETRIES = 1
USAGE = ("usage: avsa sweep [hydra overrides...]   e.g. experiment=demo_local "
         "'sweep.space.data.num_viewpoints=[2,4]' sweep.max_concurrent_trials=2")


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled values (shipped to the trial actors)."""

    base: dict[str, Any]  # Config.to_dict() of the sweep's base config
    sweep_name: str
    parent_run_id: str
    trials_uri: str  # each trial's Train run lives at <trials_uri>/<trial run name>
    metric: str
    keyed_by_id: bool  # the same values can repeat: names carry the Tune trial id


@dataclass
class SweepResult:
    name: str
    uri: str
    parent_run_id: str
    metric: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    table: str


# ----------------------------------------------------------------------------- a trial


def _validation_report(metric: str):
    """A TuneReportCallback passing on only the reports that carry `metric` (validation
    steps): Tune and its searchers require it in every result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReport()


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune trainable: the run driver with the trial's values, under the sweep's run."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(spec.sweep_name, config, trial_id if spec.keyed_by_id else None)
    cfg = apply_params(spec.base, config)
    cfg.storage.path, cfg.storage.run_name = spec.trials_uri, name
    train_driver.run(cfg, [_validation_report(spec.metric)], parent_run_id=spec.parent_run_id,
                     trial_tags={"avsa.sweep": spec.sweep_name, "avsa.trial_id": trial_id})


# ----------------------------------------------------------------------------- the sweep


def prepare_base(cfg: Config) -> Config:
    """The config every trial starts from: local paths absolute (trials run in their own
    folders), the tracking URI resolved, validation every `sweep.report_every` steps."""
    base = with_absolute_paths(cfg)
    base.tracking.uri = tracking.resolve_tracking_uri(base.tracking.uri)
    t = base.train
    if cfg.sweep.report_every:
        t.val_every = cfg.sweep.report_every
    if t.val_every and t.val_every % t.log_every:
        t.log_every = math.gcd(t.log_every, t.val_every)  # validation runs on logged steps
    if cfg.sweep.scheduler == "asha" and not t.val_every:
        log.warning("train.val_every=0: ASHA sees only each trial's final validation; "
                    "set sweep.report_every to stop poor trials early")
    return base


def check_sweep(cfg: Config, metric: str) -> None:
    s = cfg.sweep
    if not 1 <= s.grace_period <= cfg.train.max_steps:
        raise ConfigError("sweep.grace_period", f"must be in [1, train.max_steps="
                          f"{cfg.train.max_steps}] (steps), got {s.grace_period}")
    if s.reduction_factor < 2:
        raise ConfigError("sweep.reduction_factor", f"must be >= 2, got {s.reduction_factor}")
    if metric.startswith("val/") and not (cfg.data.val_shards and cfg.train.val_batches):
        raise ConfigError("data.val_shards", f"a sweep on {metric} needs validation shards and "
                          f"train.val_batches > 0")


def max_concurrent(cfg: Config, cluster: Mapping[str, float]) -> int:
    """`sweep.max_concurrent_trials`, or as many trials as the cluster's CPUs (and GPUs) hold:
    each needs its train workers plus one decoding task."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    t = cfg.train
    fits = [cluster.get("CPU", 0.0) // (t.num_workers * t.cpus_per_worker + cfg.data.decode_cpus)]
    if t.use_gpu:
        fits.append(cluster.get("GPU", 0.0) // t.num_workers)
    return max(1, int(min(fits)))


def make_tuner(cfg: Config, space: dict[str, Any], spec: TrialSpec):
    """A new Tuner, or the one restored from `<storage.path>/sweeps/<sweep>` if it exists."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = cfg.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                                    {"CPU": TRIAL_DRIVER_CPU})
    fs, root = storage.pyarrow_filesystem(storage.join(cfg.storage.path, "sweeps"))
    path = posixpath.join(root, spec.sweep_name)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("restoring sweep %s from %s (finished trials are kept)", spec.sweep_name, path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=fs)
    scheduler = (ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps,
                               grace_period=s.grace_period, reduction_factor=s.reduction_factor)
                 if s.scheduler == "asha" else FIFOScheduler())
    concurrent = max_concurrent(cfg, ray.cluster_resources())
    log.info("sweep %s: up to %d trials at a time", spec.sweep_name, concurrent)
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=cfg.train.seed), concurrent
    else:  # the variant generator limits itself; Tune ignores max_concurrent_trials for it
        search_alg = BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.train.seed)
        limit = None
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=s.mode, scheduler=scheduler, search_alg=search_alg,
            num_samples=s.num_samples, max_concurrent_trials=limit,
        ),
        run_config=tune.RunConfig(
            name=spec.sweep_name, storage_path=root, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
        ),
    )


def _finish_children(uri: str, cfg: Config, rows: list[dict[str, Any]],
                     best: Mapping[str, Any] | None, trials_uri: str, keys: list[str]) -> None:
    """Find each trial's MLflow run (into row["run_id"]); close the runs that stopped or killed
    trials left open, tag early stops and the best trial (`best`: one of `rows`, or None), and
    register the best trial's model as a version of `tracking.model_name`, aliased `best`.

    A trial the scheduler stops (ASHA at a rung, or at its max_t: the last step) ends with its
    actor, before its driver tags the checkpoint and logs the model: both are done here."""
    for row in rows:
        trial_uri = storage.join(trials_uri, row["trial"])
        row["run_id"] = run_id = tracking.find_run(uri, cfg.tracking.experiment, row["trial"],
                                                   trial_uri)
        if run_id is None:
            continue
        status = "FAILED" if row["status"] == "error" else "FINISHED"
        tags = {"avsa.early_stopped": "true"} if row["status"] == "stopped" else {}
        if row is best:
            tags["avsa.best"] = "true"
        register = row is best and cfg.tracking.log_model
        run = tracking.get_run(uri, run_id)
        step, checkpoint = 0, None  # set for a trial ended before its driver tagged it
        if not run.data.tags.get(tracking.CHECKPOINT):
            step, checkpoint = (resume.checkpoints(trial_uri) or [(0, None)])[0]
        if checkpoint:
            tags[tracking.CHECKPOINT] = checkpoint
        if (not register and run.info.status == status
                and all(run.data.tags.get(k) == v for k, v in tags.items())):
            continue
        child = tracking.RunLogger(uri, run_id, run.info.experiment_id)
        child.set_tags(tags)
        if register:
            if checkpoint:  # what the trial's driver would have logged at its end
                trial_cfg = apply_params(cfg.to_dict(), {k: row[k] for k in keys})
                models.log_final(child, trial_cfg, checkpoint, register=False, step=step)
            models.register(child, cfg.tracking.model_name, alias=models.BEST_ALIAS)
        if run.info.status != status:
            child.end(status)
        else:
            child.flush()


def plan_sweep(cfg: Config) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(flat space, Tune's param_space, the metric Tune acts on) of `cfg.sweep`, every key and
    value checked against the config; no I/O. Raises ConfigError."""
    flat = flatten_space(cfg.sweep.space)
    space = tune_space(flat, cfg.sweep.search)
    check_space(cfg, flat)
    metric = scheduler_metric(cfg.sweep.metric, flat)
    check_sweep(cfg, metric)
    return flat, space, metric


def run_sweep(cfg: Config) -> SweepResult:
    """Run (or resume) the sweep `cfg.sweep` end to end; returns its table and best trial."""
    flat, space, metric = plan_sweep(cfg)
    train_driver.check_inputs(cfg)
    base = prepare_base(cfg)
    name = sweep_run_name(base)
    sweep_uri = storage.join(base.storage.path, "sweeps", name)
    if warning := temperature_warning(base.loss.temperature):
        log.warning(warning)
    with train_driver.hold_run_dir(sweep_uri, "avsa sweep", base.storage.lease_wait_s):
        # a pinned storage.run_name must not restore another sweep's Tune experiment
        train_driver.claim_run_dir(base, sweep_uri, sweep=True)
        ray_setup.ensure_ray(base, need_state_api=True)
        with interrupt.signals_raise():
            return _sweep(base, space, flat, metric, name, sweep_uri)


def _sweep(base: Config, space: dict[str, Any], flat: dict[str, Any], metric: str, name: str,
           sweep_uri: str) -> SweepResult:
    """From the parent MLflow run's start to its end (FINISHED, FAILED, or KILLED by a signal,
    its RUNNING trials with it)."""
    s = base.sweep
    waiting = resources.check_and_watch(base, f"one trial of sweep {name}", TRIAL_DRIVER_CPU)
    parent = train_driver.start_tracking(
        base, kind="sweep", run_name=name, run_uri=sweep_uri,
        extra_tags={"avsa.sweep": s.name, "avsa.metric": metric},
    )
    with parent:  # FAILED on an error, KILLED by a signal; _report ends it otherwise
        try:
            spec = TrialSpec(base.to_dict(), name, parent.run_id, storage.join(sweep_uri, "trials"),
                             metric, keyed_by_id=s.search != "grid" or s.num_samples > 1)
            tuner = make_tuner(base, space, spec)
            with waiting:
                grid = tuner.fit()
            return _report(base, grid, spec, list(flat), parent, sweep_uri)
        except KeyboardInterrupt as k:  # a signal (see avsa.train.interrupt)
            e = interrupt.as_interrupted(k)
            interrupt.shutdown_ray()  # the trials' actors and their Train runs end with it
            interrupt.kill_children(parent.uri, base.tracking.experiment, parent.run_id, e.name)
            parent.set_tags({interrupt.STOPPED_BY: e.name})
            raise


def _report(base: Config, grid: Any, spec: TrialSpec, keys: list[str],
            parent: tracking.RunLogger, sweep_uri: str) -> SweepResult:
    """The sweep's table, plot and best trial, recorded on the parent run, which it ends."""
    name, metric = spec.sweep_name, spec.metric
    rows = []
    for result in grid:
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") if spec.keyed_by_id else None
        run_name = trial_run_name(name, {k: config.get(k) for k in keys}, trial_id)
        rows.append(sweep_report.trial_row(result, keys, name=run_name, metric=metric,
                                           max_steps=base.train.max_steps))
    sweep_report.sort_rows(rows, keys)
    best = sweep_report.best_row(rows, metric, base.sweep.mode)
    _finish_children(parent.uri, base, rows, best, spec.trials_uri, keys)
    cols = sweep_report.columns(rows, keys, metric)
    table = sweep_report.markdown(rows, cols, best)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, png_path = Path(tmp, "sweep_results.csv"), Path(tmp, "sweep_plot.png")
        sweep_report.write_csv(rows, cols, csv_path)
        x_key, line_key = sweep_report.plot_axes(keys)
        sweep_report.plot(rows, x_key, line_key, metric, png_path, title=name)
        for p in (csv_path, png_path):
            parent.log_artifact(p)
            storage.write_bytes(storage.join(sweep_uri, p.name), p.read_bytes())
    if best is not None:
        parent.set_tags({"avsa.best_trial": best["trial"], "avsa.best_trial_id": best["trial_id"],
                         tracking.BEST_RUN: best["run_id"],
                         "avsa.best_params": json.dumps({k: best[k] for k in keys})})
        parent.log_metrics({f"best/{metric}": best[metric]}, step=int(best["step"] or 0))
    parent.end("FINISHED" if best is not None else "FAILED")
    return SweepResult(name, sweep_uri, parent.run_id, metric, rows, best and dict(best), table)


def main(argv: list[str]) -> int:
    return interrupt.run_command("sweep", argv, USAGE, run_sweep, print_summary)


def print_summary(res: SweepResult, cfg: Config) -> int:
    """The sweep's table and best trial; the exit status (1 when every trial failed)."""
    counts = {k: sum(r["status"] == k for r in res.rows) for k in ("done", "stopped", "error")}
    print(f"[avsa] sweep {res.name}: {len(res.rows)} trials ({counts['done']} done, "
          f"{counts['stopped']} stopped early, {counts['error']} failed)")
    print(res.table)
    if res.best is not None:
        print(f"[avsa] best: {res.best['trial']}  {res.metric} {res.best[res.metric]:.4f}  "
              f"(MLflow run {res.best['run_id']})")
    print(f"[avsa] results: {storage.join(res.uri, 'sweep_results.csv')}, "
          f"{storage.join(res.uri, 'sweep_plot.png')}")
    print(f"[avsa] MLflow parent run {res.parent_run_id} in experiment "
          f"{cfg.tracking.experiment!r}")
    return 0 if res.best is not None else 1

