"""A driver submitted with `ray job submit` runs in a temporary working directory on the head,
where the default MLflow store (`sqlite:///<cwd>/mlruns/mlflow.db`) would vanish with the job:
there an unset tracking URI is refused (the Helm chart and k8s/ set MLFLOW_TRACKING_URI).
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
