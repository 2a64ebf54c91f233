"""avsa.tracking against a real ``mlflow server`` process (the session's, restarted once)."""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflowserver import free_port

from avsa import tracking
from avsa.errors import TrackingError
from avsa.tracking import BufferPolicy, RunLogger, flatten_config
from avsa.tracking.client import HTTP_DEFAULTS, connect

pytestmark = pytest.mark.slow

FAST = BufferPolicy(retry_interval_s=0.0, end_timeout_s=5.0)


@pytest.fixture
def server(mlflow_uri):
    """The session's server (tests/conftest.py): a str URI with .stop() and .start()."""
    if not mlflow_uri.running:
        mlflow_uri.start()
    return mlflow_uri


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """A local SQLite store, shared because creating its schema takes seconds."""
    db = tmp_path_factory.mktemp("local") / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}", db


@pytest.fixture
def client(server):
    return MlflowClient(tracking_uri=server)


def _steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# ----------------------------------------------------------------------------- config


class Mode(enum.Enum):
    FOA = "foa"


@dataclasses.dataclass
class _Data:
    num_viewpoints: int = 4
    color_jitter: tuple = (0.4, 0.4, 0.4, 0.2)
    val_shards: str | None = None
    audio_mode: Mode = Mode.FOA


@dataclasses.dataclass
class _Storage:
    endpoint: str = "http://minio:9000"
    aws_access_key_id: str = "AKIAEXAMPLE"
    aws_secret_access_key: str = "hunter2"


@dataclasses.dataclass
class _Config:
    data: _Data = dataclasses.field(default_factory=_Data)
    storage: _Storage = dataclasses.field(default_factory=_Storage)
    lr: float = 0.001
    extra: dict = dataclasses.field(default_factory=lambda: {"a": {"b": 1}, "flag": True})


def test_flatten_config_nested_dataclasses():
    flat = flatten_config(_Config())
    assert flat == {
        "data.num_viewpoints": "4",
        "data.color_jitter": "[0.4, 0.4, 0.4, 0.2]",
        "data.val_shards": "None",
        "data.audio_mode": "foa",
        "storage.endpoint": "http://minio:9000",
        "lr": "0.001",
        "extra.a.b": "1",
        "extra.flag": "True",
    }
    assert flatten_config({"cfg": {"data": _Data()}})["cfg.data.num_viewpoints"] == "4"


def test_flatten_config_drops_secret_keys_and_masks_uri_credentials():
    cfg = {
        "Password": "p",
        "db": {"user": "u", "PASSWORD_file": "/x"},
        "api_Token": "t",
        "aws_access_key_id": "a",
        "s3": {"Access_Key": "b", "key_id": "c", "bucket": "data"},
        "credentials": {"secret": {"value": "v"}},
        "uri": "http://alice:s3cr3t@mlflow:5000/x",
        "long": "y" * 10_000,
        "list_of_dicts": [{"name": "n", "token": "t"}],
    }
    flat = flatten_config(cfg)
    assert flat == {
        "db.user": "u",
        "s3.bucket": "data",
        "uri": "http://***@mlflow:5000/x",
        "long": "y" * tracking.MAX_PARAM_VALUE,
        "list_of_dicts.0.name": "n",
    }
    assert not any("s3cr3t" in v or v in ("p", "t", "a", "b", "c") for v in flat.values())


def test_flatten_config_drops_secret_subtree():
    flat = flatten_config({"client_secret": {"id": "1", "value": "2"}, "keep": 3})
    assert flat == {"keep": "3"}


# ----------------------------------------------------------------------------- URIs


def test_default_tracking_uri_is_absolute_sqlite_under_mlruns(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking.resolve_tracking_uri(None) == tracking.default_tracking_uri()
    assert tracking.resolve_tracking_uri("sqlite:///a/b.db") == f"sqlite:///{tmp_path}/a/b.db"
    assert tracking.resolve_tracking_uri("http://h:5000") == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.default_tracking_uri() == "http://mlflow:5000"


def test_mlflow_http_settings_default_but_yield_to_the_environment(monkeypatch):
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    connect(f"http://127.0.0.1:{free_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"


def test_check_reachable_closed_port_fails_fast_naming_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as info:
        tracking.check_reachable(uri, timeout_s=3)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert msg.startswith(f"{uri}: MLflow tracking server unreachable (")
    assert "\n" not in msg
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"^{uri}: starting run 'r' failed"):
        RunLogger.start(uri, "e", "r", tags={}, params={}, policy=FAST)
    assert time.monotonic() - t0 < 5


RACE = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # imported before the start line
from avsa.tracking import check_reachable
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
check_reachable(sys.argv[1])
"""


def test_commands_starting_together_on_a_new_sqlite_store_all_get_it(tmp_path):
    """Parallel `avsa transfer` commands into a fresh local store raced to create its tables,
    and all but one failed ('MLflow store unusable (... table ... already exists)')."""
    uri, go = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", tmp_path / "go"
    repo = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(go)], cwd=repo,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(8)  # every one imported and waiting
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-600:] for e in errors)
    MlflowClient(uri).create_experiment("usable")
    lock = tmp_path / "mlruns" / "mlflow.db.lock"  # where no lock can be taken (a read-only
    lock.unlink()                                  # folder, say) the store is still read
    lock.mkdir()
    tracking.check_reachable(uri)


def test_a_signal_while_a_run_starts_ends_it_killed(mlflow_uri, monkeypatch, tmp_path):
    """Between creating the MLflow run and handing it over, a signal (or an error) ends the run
    instead of leaving it RUNNING."""
    from avsa.config import compose
    from avsa.train import driver

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "log_datasets", interrupted)
    cfg = compose([f"tracking.uri={mlflow_uri}", "tracking.experiment=starting",
                   f"storage.path={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        driver.start_tracking(cfg)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("starting")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED"


def test_check_reachable_redacts_credentials():
    uri = f"http://bob:pw@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as info:
        tracking.check_reachable(uri, timeout_s=3)
    assert "pw" not in str(info.value) and "***@127.0.0.1" in str(info.value)


@pytest.mark.parametrize("secret", ["pw", "p@ss", "eyJ" + "x" * 700])
def test_redact_hides_any_password_urllib_would_send(secret):
    """Long tokens (a JWT as the password) and a raw "@" in it, anywhere in a text, and in
    the tracking.uri param; a "@" after the authority is not a password."""
    from urllib.parse import urlsplit

    from avsa.config import Config
    from avsa.tracking.params import flatten_config

    uri = f"https://bot:{secret}@mlflow.example.com/path?to=a@b"
    assert urlsplit(uri).password == secret
    assert tracking.redact(f"unreachable at {uri} (twice: {uri})") == \
        "unreachable at https://***@mlflow.example.com/path?to=a@b (twice: " \
        "https://***@mlflow.example.com/path?to=a@b)"
    cfg = Config()
    cfg.tracking.uri = uri
    assert secret not in flatten_config(cfg)["tracking.uri"]
    assert tracking.redact("https://mlflow.example.com/?user=a@b") == \
        "https://mlflow.example.com/?user=a@b"


def test_check_reachable_ok_for_server_and_sqlite(server, local_store):
    tracking.check_reachable(server)
    uri, db = local_store
    assert not db.parent.exists()
    tracking.check_reachable(uri)  # creates the folder and the database
    assert db.exists()


def test_server_helper_pickles_as_plain_uri(server):
    copy = pickle.loads(pickle.dumps(server))
    assert copy == server and type(copy) is str
    assert copy == f"http://127.0.0.1:{server.port}"


def test_check_reachable_rejects_file_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match=r"file store.*sqlite:///mlruns/mlflow.db"):
        tracking.check_reachable(str(tmp_path / "mlruns"))


# ----------------------------------------------------------------------------- runs


def test_run_roundtrip(server, client, tmp_path):
    params = flatten_config(_Config())
    run = RunLogger.start(
        server,
        "roundtrip",
        "pretrain-demo",
        tags={tracking.KIND: "pretrain"},
        params=_Config(),
        policy=FAST,
    )
    for step in range(5):
        run.log_metrics({"loss": 1.0 / (step + 1), "train/acc": step / 10}, step=step)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    assert run.log_artifact(tmp_path / "notes.txt", "reports")
    assert run.log_artifact(tmp_path / "plots", "reports/plots")
    with pytest.raises(TrackingError, match="no such file"):
        run.log_artifact(tmp_path / "missing.txt")
    assert run.log_text("abc", "text/a.txt")
    run.set_tags({tracking.CHECKPOINT: "s3://bucket/ckpt/3"})
    run.end()

    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "pretrain-demo"
    assert got.data.params == params
    assert "storage.aws_secret_access_key" not in got.data.params
    assert got.data.tags[tracking.KIND] == "pretrain"
    assert got.data.tags[tracking.CHECKPOINT] == "s3://bucket/ckpt/3"
    assert _steps(client, run.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "train/acc")] == [0, 1, 2, 3, 4]
    top = {f.path for f in client.list_artifacts(run.run_id)}
    assert top == {"reports", "text"}
    reports = [f.path for f in client.list_artifacts(run.run_id, "reports")]
    assert sorted(reports) == ["reports/notes.txt", "reports/plots"]
    assert [f.path for f in client.list_artifacts(run.run_id, "reports/plots")] == [
        "reports/plots/a.png"
    ]
    assert client.get_experiment_by_name("roundtrip").experiment_id == run.experiment_id


def test_log_params_sends_more_than_one_batch(server, client):
    params = {f"p{i:03d}": i for i in range(250)}
    with RunLogger.start(server, "batches", "many", tags={}, params=params, policy=FAST) as run:
        pass
    got = client.get_run(run.run_id)
    assert got.data.params == {k: str(v) for k, v in params.items()}
    assert got.info.status == "FINISHED"


def test_long_params_split_under_the_request_size_limit(server, client):
    params = {f"p{i:03d}": f"{i}" + "v" * 5000 for i in range(90)}  # ~450 kB of text
    tags = {f"t{i:03d}": "w" * 7000 for i in range(90)}  # ~630 kB
    with RunLogger.start(server, "batches", "long", tags={}, params={}, policy=FAST) as run:
        run.set_tags(tags)
        run.log_params(params)
    got = client.get_run(run.run_id)
    assert got.data.params == params
    assert {k: v for k, v in got.data.tags.items() if k in tags} == tags


def test_context_manager_marks_failed(server, client):
    with (
        pytest.raises(RuntimeError),
        RunLogger.start(server, "ctx", "boom", tags={}, params={}) as run,
    ):
        raise RuntimeError("x")
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_bad_metric_key_or_value_raises(server):
    run = RunLogger.start(server, "bad", "bad", tags={}, params={}, policy=FAST)
    with pytest.raises(TrackingError, match="not a number"):
        run.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(TrackingError, match="invalid MLflow key"):
        run.log_metrics({"a|b": 1.0}, step=0)
    with pytest.raises(TrackingError, match="run status"):
        run.end("DONE")
    run.end()


def test_parent_child_linkage(server, client):
    parent = RunLogger.start(server, "sweep", "sweep-1", tags={tracking.KIND: "sweep"}, params={})
    child = RunLogger.start(
        server,
        "sweep",
        "trial-0",
        tags={tracking.KIND: "trial"},
        params={"lr": 0.1},
        parent_run_id=parent.run_id,
    )
    child.end()
    parent.end()
    assert client.get_run(child.run_id).data.tags[tracking.PARENT] == parent.run_id
    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert [r.info.run_id for r in children] == [child.run_id]


def test_resume_continues_the_same_run(server, client, caplog):
    first = RunLogger.start(server, "resume", "pretrain-abc", tags={}, params={"lr": 0.1})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"

    run_id = tracking.find_run(server, "resume", "pretrain-abc")
    assert run_id == first.run_id
    assert tracking.find_run(server, "resume", "other") is None
    assert tracking.find_run(server, "no-such-experiment", "pretrain-abc") is None

    with caplog.at_level(logging.WARNING, logger="avsa.tracking"):
        again = RunLogger.start(
            server,
            "resume",
            "pretrain-abc",
            tags={"attempt": "2"},
            params={"lr": 0.2, "epochs": 3},
            resume_run_id=run_id,
        )
    assert again.run_id == first.run_id
    assert any("'lr' already '0.1'" in r.getMessage() for r in caplog.records)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 1.0}, step=2)
    again.end()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"lr": "0.1", "epochs": "3"}
    assert got.data.tags["attempt"] == "2"
    assert _steps(client, run_id, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]


def test_get_run(server):
    run = RunLogger.start(server, "resolve", "r", tags={tracking.CHECKPOINT: "s3://b/c"}, params={})
    run.end()
    got = tracking.get_run(server, run.run_id)
    assert got.info.run_name == "r" and got.data.tags[tracking.CHECKPOINT] == "s3://b/c"
    with pytest.raises(TrackingError, match=f"^{server}: no run 0123456789abcdef"):
        tracking.get_run(server, "0123456789abcdef")


def test_pickled_logger_writes_to_the_same_run(server, client):
    run = RunLogger.start(server, "pickle", "p", tags={}, params={}, policy=FAST)
    copy = pickle.loads(pickle.dumps(run))
    copy.log_metrics({"x": 1.0}, step=7)
    run.end()
    assert _steps(client, run.run_id, "x") == [(7, 1.0)]


def test_local_sqlite_store(local_store):
    uri, db = local_store
    run = RunLogger.start(uri, "local", "l", tags={}, params={"a": 1})
    run.log_metrics({"m": 0.5}, step=1)
    run.log_text("t", "a.txt")
    run.end()
    assert (db.parent / "artifacts" / run.run_id / "artifacts" / "a.txt").read_text() == "t"
    assert tracking.find_run(uri, "local", "l") == run.run_id
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.data.params == {"a": "1"} and got.data.metrics == {"m": 0.5}


def test_end_with_server_gone_warns_and_returns(caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    run = RunLogger(dead, "feedc0de", "0", BufferPolicy(end_timeout_s=0.5))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="avsa.tracking"):
        run.log_metrics({"loss": 1.0, "acc": 0.5}, step=0)
        run.log_metrics({"loss": 0.5}, step=1)
        assert run.log_text("x", "x.txt") is False
        run.end("FAILED")
    assert time.monotonic() - t0 < 10
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert any("3 metrics (and 0 params/tags) could not be delivered" in m for m in messages)


def test_buffer_is_bounded():
    dead = f"http://127.0.0.1:{free_port()}"
    policy = BufferPolicy(retry_interval_s=3600, max_buffer=10, end_timeout_s=0)
    run = RunLogger(dead, "feedc0de", "0", policy)
    for step in range(25):
        run.log_metrics({"loss": float(step)}, step=step)
    assert run._buffer.pending == 10
    assert [m.step for m in run._buffer.metrics] == list(range(15, 25))


# ----------------------------------------------------------------------------- outage


def _log_during_outage(server, run, lazy, caplog) -> dict[int, tuple[int, int]]:
    """Log while the server is stopped; returns {step: (ms before, ms after) the call}."""
    windows = {}
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="avsa.tracking"):
        for step in (1, 2, 3):
            before = int(time.time() * 1000)
            run.log_metrics({"loss": float(step)}, step=step)
            windows[step] = (before, int(time.time() * 1000))
            time.sleep(0.01)
        lazy.log_metrics({"acc": 0.5}, step=10)
        lazy.log_metrics({"acc": 0.6}, step=11)
        assert run.log_text("lost", "lost.txt") is False
    assert time.monotonic() - t0 < 10, "logging must not block while the server is down"
    unreachable = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 2, unreachable  # once per logger, not once per call
    assert unreachable[0].startswith(f"MLflow unreachable at {server}; buffering 1 metrics")
    assert run._buffer.pending == 3 and lazy._buffer.pending == 2
    return windows


def test_outage_buffers_then_delivers_with_original_steps(server, client, caplog):
    """Stop the server mid-run, keep logging, restart it on the same port."""
    run = RunLogger.start(server, "outage", "o", tags={}, params={}, policy=FAST)
    slow_retry = dataclasses.replace(FAST, retry_interval_s=3600)
    lazy = RunLogger.start(server, "outage", "lazy", tags={}, params={}, policy=slow_retry)
    run.log_metrics({"loss": 0.0}, step=0)
    server.stop()
    try:
        windows = _log_during_outage(server, run, lazy, caplog)
    finally:
        server.start()  # the session's other tests need it back

    run.log_metrics({"loss": 4.0}, step=4)  # the next call delivers the backlog first
    assert run._buffer.pending == 0
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(5)]
    for m in history:
        if m.step in windows:
            lo, hi = windows[m.step]
            assert lo <= m.timestamp <= hi
    assert lazy._buffer.pending == 2  # its retry interval has not elapsed: nothing sent yet
    lazy.end()  # end() delivers regardless
    assert _steps(client, lazy.run_id, "acc") == [(10, 0.5), (11, 0.6)]
    assert client.get_run(lazy.run_id).info.status == "FINISHED"
    run.end()
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_system_metrics_of_a_resumed_run_continue_their_steps(server, client):
    """Each attempt samples on from the last one's step; training steps ignore the samples."""
    from avsa.config import TrackingConfig
    from avsa.tracking import system_metrics

    cfg = TrackingConfig(system_metrics=True, system_metrics_interval_s=0.2)
    run = RunLogger.start(server, "sysmetrics", "resumed", tags={}, params={})
    run.log_metrics({"train/loss": 1.0}, step=3)
    for _attempt in range(2):
        with system_metrics.sampling(run, cfg):
            time.sleep(0.7)
        run.flush()
    key = next(k for k in client.get_run(run.run_id).data.metrics if k.startswith("system/"))
    steps = [s for s, _ in _steps(client, run.run_id, key)]
    assert len(steps) >= 4 and steps == list(range(1, len(steps) + 1)), steps
    assert tracking.last_logged_step(server, run.run_id) == 3
    run.end()


def test_the_same_config_at_another_storage_path_is_another_run(server, client, tmp_path):
    """A run is found again by its name and its run directory: the same config under a new
    storage.path starts afresh, its own checkpoints, steps and model, not the old run's."""
    import uuid

    from avsa.config import compose, override
    from avsa.train.driver import start_tracking

    exp = f"identity-{uuid.uuid4().hex[:8]}"

    def start(path):
        cfg = compose(["experiment=demo_local", f"tracking.uri={server}",
                       f"tracking.experiment={exp}", override("storage.path", tmp_path / path),
                       f"data.shards={tmp_path / 'none'}", f"data.val_shards={tmp_path / 'none'}"])
        with start_tracking(cfg) as logger:
            pass
        return logger.run_id, cfg.run_name()

    first, name = start("a")
    again, _ = start("a")
    other, other_name = start("b")
    assert again == first and other != first and other_name == name
    tags = client.get_run(other).data.tags
    assert tags[tracking.RUN_URI] == str(tmp_path / "b" / name)
    assert tracking.find_run(server, exp, name) == other  # the newest, without a directory
    assert tracking.find_run(server, exp, name, str(tmp_path / "a" / name)) == first
    assert tracking.find_run(server, exp, name, str(tmp_path / "c" / name)) is None
    quoted, _ = start("it's \"q\"")  # no filter string can quote this directory
    assert quoted not in (first, other) and start("it's \"q\"")[0] == quoted
