"""What a finished pretraining run (or sweep trial) leaves in MLflow besides its metrics:
its inputs as datasets, its network as a (registered) model, a figure of its predictions.

Called by the driver and the sweep at their ends; every step is best effort (a warning, never
an exception), so tracking trouble cannot fail a run that trained.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from avsa.tracking import models
from avsa.tracking.datasets import log_datasets

if TYPE_CHECKING:
    from avsa.config import Config
    from avsa.tracking.run import RunLogger

log = logging.getLogger("avsa.tracking")


def log_pretraining_inputs(logger: RunLogger, cfg: Config) -> None:
    """The training and validation shard sets as the run's datasets."""
    log_datasets(logger, [(cfg.data.shards, "train"), (cfg.data.val_shards, "val")])


def finish_pretraining(logger: RunLogger, cfg: Config, checkpoint_uri: str | None, *,
                       register: bool, step: int = 0) -> None:
    """Log the final network as the run's model (registered as ``tracking.model_name`` when
    ``register``) and the prediction figure, unless the run already has them (a resumed run
    that had finished)."""
    if not checkpoint_uri:
        return
    if cfg.tracking.log_model and not _has_model(logger):
        models.log_encoders(logger, checkpoint_uri, step=step,
                                   register_as=cfg.tracking.model_name if register else None)
    try:
        from avsa.pretrain_figure import log_figure

        log_figure(logger, cfg, checkpoint_uri)
    except Exception as e:  # a figure is never worth a failed run
        log.warning("no prediction figure for run %s: %s", logger.run_id, e)


def register_best(logger: RunLogger, cfg: Config) -> models.ModelRef | None:
    """Register the best trial's model as a version of ``tracking.model_name`` with the
    alias ``best``."""
    if not cfg.tracking.log_model:
        return None
    return models.register(logger, cfg.tracking.model_name, alias=models.BEST_ALIAS)


def _has_model(logger: RunLogger) -> bool:
    found: list[bool] = []

    def check(client) -> None:
        run = client.get_run(logger.run_id)
        found.append(bool(run.outputs and run.outputs.model_outputs))

    return logger.attempt("the run's models", check) and found[0]
