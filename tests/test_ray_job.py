"""avsa.ray_job: inside a submitted Ray job, an unset tracking URI is refused, not defaulted to a
SQLite file in the job's temporary working directory."""

from __future__ import annotations

import pytest

from avsa import tracking
from avsa.errors import TrackingError
from avsa.ray_job import JOB_ENV


def test_outside_a_job_the_local_default_stays(monkeypatch, tmp_path):
    monkeypatch.delenv(JOB_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_inside_a_job_an_unset_uri_is_refused(monkeypatch):
    monkeypatch.setenv(JOB_ENV, "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError) as info:
        tracking.resolve_tracking_uri(None)
    assert str(info.value).startswith("tracking.uri: not set inside a Ray job")
    assert "MLFLOW_TRACKING_URI" in str(info.value) and "\n" not in str(info.value)


def test_inside_a_job_a_server_or_an_explicit_store_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_ENV, "{}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(None) == "http://mlflow.example:5000"
    explicit = f"sqlite:///{tmp_path}/mlflow.db"  # opted into explicitly
    assert tracking.resolve_tracking_uri(explicit) == explicit
