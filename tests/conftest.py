"""Session-wide real services on loopback: one S3 endpoint (moto server), one MLflow server,
one local Ray. Tests that need them take the fixtures; nothing is patched."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sweeprun import interrupted_sweep, sweep_shards  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parent.parent
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end each
# wait for a poll; tiny test runs spend much of their time there. Every Ray the suite starts
# (the session's, a command's own, a `ray start` head) inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Modules that start Ray (in this process or in a command they run). Under `make test`'s
# pytest-xdist they all go to one worker, one after another: a local Ray's dashboard agent
# takes a fixed port, so two at once on one machine would not each get one. The other modules
# run beside them on the second worker, each whole, so its module fixtures start once.
RAY_MODULES = {
    "test_demo", "test_jobs", "test_local_ray", "test_mlflow_ui", "test_pipeline",
    "test_reliability_config", "test_reliability_interrupt", "test_reliability_training",
    "test_resources", "test_sweep",
}
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`make test`'s `-n 2`): each module whole on one worker, so its module
    fixtures start once, and all of RAY_MODULES on the same one (above)."""
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::", 1)[0]).stem
            return "ray" if module in RAY_MODULES else module

    return RayModulesTogether(config, log)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback; the process env points boto3/pyarrow (and Ray
    workers started later) at it."""
    from s3server import s3_endpoint as start

    with start() as url, pytest.MonkeyPatch.context() as mp:
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": url}.items():
            mp.setenv(k, v)
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test: `s3://<name>`."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real `mlflow server` process (SQLite backend, local artifacts) on loopback."""
    from mlflowserver import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, tmp_path_factory):
    """One local Ray for the whole session, started after the S3 env is in place so its
    workers inherit it."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield ray
    ray.shutdown()
