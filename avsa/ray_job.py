"""What a driver submitted with `ray job submit` must not do silently.

A submitted job runs in a temporary working directory on the head; a local MLflow store there
(the default `sqlite:///<cwd>/mlruns/mlflow.db`) vanishes with the job, or with the cluster. So
inside such a job an unset tracking URI is refused before anything starts: set
MLFLOW_TRACKING_URI (the Helm chart and k8s/ set it on every Ray pod) or `tracking.uri`, or opt
into a local store explicitly with `tracking.uri=sqlite:////ABSOLUTE/PATH`.
"""

from __future__ import annotations

import os

from avsa.errors import TrackingError

# Set by Ray's job supervisor in the environment of every submitted job's entrypoint.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def refuse_untracked_job() -> None:
    """Raise TrackingError inside a submitted job, where the local default store would be lost."""
    if JOB_ENV in os.environ:
        raise TrackingError(
            "tracking.uri",
            "not set inside a Ray job: runs would go to SQLite in the job's temporary working "
            "directory and vanish with it; set MLFLOW_TRACKING_URI or tracking.uri=http://HOST:PORT "
            "(an MLflow server), or choose a local store explicitly with "
            "tracking.uri=sqlite:////ABSOLUTE/PATH/mlflow.db")
