"""MLflow tracking, kept small by using MLflow's own retries and batching: the connection
(client), runs and their tags (store), params, one run's lifecycle (run: RunLogger, a ``with``
block) and its outage buffer, and the extras (code_version, datasets, models, system_metrics,
ui). Importing it imports no MLflow; each function imports it when called.
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
    BEST_RUN,
    CHECKPOINT,
    KIND,
    PARENT,
    PRETRAIN_RUN,
    RUN_URI,
    TASK,
    find_run,
    get_run,
    last_logged_step,
    running_children,
)

__all__ = [
    "BEST_RUN", "CHECKPOINT", "KIND", "MAX_PARAM_VALUE", "PARENT", "PRETRAIN_RUN", "RUN_URI", "TASK",
    "BufferPolicy", "RunLogger", "check_reachable", "default_tracking_uri",
    "find_run", "flatten_config", "get_run", "last_logged_step", "redact",
    "resolve_tracking_uri", "running_children",
]
