"""MLflow tracking, kept small by using MLflow's own retries and batching.

- :mod:`~avsa.tracking.client`: tracking URIs, the MlflowClient and MLflow's HTTP settings,
  the reachability check.
- :mod:`~avsa.tracking.store`: the tags linking runs, finding and reading runs.
- :mod:`~avsa.tracking.params`: configs flattened into params, secrets left out.
- :mod:`~avsa.tracking.run`: :class:`RunLogger`, one run from start to end (a ``with`` block).
- :mod:`~avsa.tracking.buffer`: what a run logged while the server was away.
- :mod:`~avsa.tracking.code_version`, :mod:`~avsa.tracking.datasets`,
  :mod:`~avsa.tracking.models`, :mod:`~avsa.tracking.system_metrics`,
  :mod:`~avsa.tracking.outputs`, :mod:`~avsa.tracking.ui`: the code version, input shard
  sets, the model registry, system metrics, what a finished run leaves, UI addresses.

Importing this package imports no MLflow; each function imports it when called.
"""

from avsa.tracking.buffer import BufferPolicy
from avsa.tracking.client import (
    check_reachable,
    default_tracking_uri,
    redact,
    resolve_tracking_uri,
)
from avsa.tracking.params import MAX_PARAM_VALUE, flatten_config
from avsa.tracking.run import RunLogger
from avsa.tracking.store import (
    CHECKPOINT,
    KIND,
    PARENT,
    PRETRAIN_RUN,
    TASK,
    find_run,
    get_run,
    last_logged_step,
    running_children,
)

RetryPolicy = BufferPolicy  # the name avsa/sweep.py still uses

__all__ = [
    "CHECKPOINT", "KIND", "MAX_PARAM_VALUE", "PARENT", "PRETRAIN_RUN", "TASK",
    "BufferPolicy", "RetryPolicy", "RunLogger", "check_reachable", "default_tracking_uri",
    "find_run", "flatten_config", "get_run", "last_logged_step", "redact",
    "resolve_tracking_uri", "running_children",
]
