"""Checkpoint contents: model, optimizer, step, RNG state, the run's count of skipped samples
and the resolved config.

A checkpoint is a directory holding `state.pt` and `config.yaml`; Ray Train persists it under
`<storage.path>/<run name>/checkpoint-<step>/`. `resolve_init` turns an MLflow run id or a
checkpoint URI into local weights for `model.init_from` and for transfer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from avsa import storage
from avsa.errors import AvsaError, CheckpointError
from avsa.train.resume import checkpoints

log = logging.getLogger("avsa.train")
STATE = "state.pt"
CONFIG = "config.yaml"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, *, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, step: int, config: dict[str, Any],
         skipped_samples: int = 0) -> Path:
    """Write `state.pt` (atomically) and `config.yaml` into `directory`. skipped_samples: the
    samples the run has skipped upstream through `step`, all ranks together (the metric
    `data/skipped_samples`), so a resumed run goes on counting from there."""
    from omegaconf import OmegaConf

    directory = Path(directory)
    tmp = directory / f".{STATE}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "step": step,
            "skipped_samples": int(skipped_samples),
            "rng": rng_state(),
            "config": config,
        }
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE)
        (directory / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        hint = "" if isinstance(e, OSError) else "; is the disk full?"
        raise CheckpointError(directory, f"cannot write checkpoint ({reason[:200]}{hint})") from None
    return directory


def load(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory written by `save` (a path, `file://` or `s3://` URI) onto
    the CPU."""
    uri = storage.join(directory, STATE)
    s3 = storage.is_s3(uri)
    if not s3 and not storage.local_path(uri).is_file():
        raise CheckpointError(directory, f"no {STATE} in checkpoint directory")
    try:
        source = io.BytesIO(storage.read_bytes(uri)) if s3 else storage.local_path(uri)
        return torch.load(source, map_location="cpu", weights_only=False)
    except AvsaError as e:
        raise CheckpointError(uri, f"unreadable checkpoint ({e})") from None
    except Exception as e:  # torch's unpickler on damaged bytes raises many kinds
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(uri, f"unreadable checkpoint ({reason})") from None


def skipped_samples(state: dict[str, Any]) -> int:
    """The run's skipped samples through the checkpoint's step (0 in a checkpoint from before
    the count was kept)."""
    return int(state.get("skipped_samples", 0))


def run_id_of(ref: str) -> str | None:
    """The MLflow run id that `ref` names: a bare id, or MLflow's `runs:/ID/PATH`; else None."""
    head = ref.removeprefix("runs:/").split("/")[0] if ref.startswith("runs:/") else ref
    return head if _RUN_ID.fullmatch(head) else None


def resolve_init(ref: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], str]:
    """Load the state behind `ref`: a registered model (`models:/NAME/VERSION`, `.../latest`,
    `models:/NAME@ALIAS`), an MLflow run id or `runs:/ID/...` (its `avsa.checkpoint_uri` tag; a
    sweep's: its best trial's; for a run still going, stopped or failed, the newest complete
    checkpoint in its run directory), a checkpoint directory URI, a run directory (newest
    checkpoint inside) or a `state.pt` URI.

    Returns (state dict, the checkpoint URI it came from).
    """
    if ref.startswith("models:/"):  # a registered version: its weights and config
        from avsa import tracking
        from avsa.tracking import models

        state, version = models.load_state(ref, tracking.resolve_tracking_uri(tracking_uri))
        return state, version.uri
    uri = ref
    if run_id := run_id_of(ref):
        from avsa import tracking

        run = tracking.get_run(tracking.resolve_tracking_uri(tracking_uri), run_id)
        best = run.data.tags.get(tracking.BEST_RUN)
        if best and not run.data.tags.get(tracking.CHECKPOINT):
            log.info("MLflow run %s is a sweep: using its best trial's run %s", run_id, best)
            return resolve_init(best, tracking_uri)
        uri = run.data.tags.get(tracking.CHECKPOINT) or _unfinished_runs_checkpoint(run)
    directory = uri.removesuffix(STATE).rstrip("/")
    try:
        if not storage.exists(storage.join(directory, STATE)):
            # a run directory: its newest checkpoint, complete or not (a copy may lack markers)
            nested = checkpoints(directory, complete=False)
            if not nested and not storage.exists(directory):
                raise CheckpointError(directory, "nothing there (expected a run or checkpoint "
                                                 "directory, a state.pt, an MLflow run id of 32 "
                                                 "hex digits, runs:/ID or models:/NAME/VERSION)")
            if not nested:
                raise CheckpointError(directory, "no checkpoint found (expected state.pt or "
                                                 "checkpoint-*/)")
            directory = nested[0][1]
        return load(directory), uri
    except CheckpointError:
        raise
    except AvsaError as e:
        raise CheckpointError(uri, f"cannot read checkpoint: {e}") from None


def _unfinished_runs_checkpoint(run: Any) -> str:
    """The newest complete checkpoint in the run directory (tag `avsa.run_uri`) of an MLflow
    run that has not tagged a final one: a run still going, stopped or failed."""
    from avsa import tracking

    run_id, status = run.info.run_id, run.info.status
    run_uri = run.data.tags.get(tracking.RUN_URI)
    found = checkpoints(run_uri) if run_uri else []
    if not found:
        where = f" in {run_uri}" if run_uri else " (no avsa.run_uri tag)"
        raise CheckpointError(run_id, f"MLflow run ({status}) has no avsa.checkpoint_uri tag and "
                                      f"no complete checkpoint{where}")
    step, uri = found[0]
    log.warning("MLflow run %s is %s, not FINISHED: using its newest complete checkpoint, "
                "step %d (%s)", run_id, status, step, uri)
    return uri
