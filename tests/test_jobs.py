"""jobs/*.py, the entry points for `ray job submit`: their --help, their one-line errors before
any Ray or MLflow work, and real submissions of pretrain, sweep and transfer, with the working
directory uploaded, to a 2-CPU local head started with `ray start` as docs/cluster.md shows:
Ray's token auth on (a token in ~/.ray, as any earlier `ray.init()` leaves), shards and
checkpoints on a loopback S3 endpoint (moto), metrics in a real MLflow server.

Secrets stay secret: the head and every `ray job submit` run with AWS credentials and an MLflow
token set to random values, so every process of these jobs holds them. After the jobs, every
log line (the submit commands' output, every file of the head's Ray session, the MLflow
server's log), every MLflow param, tag, metric key and artifact of the runs, every object the
runs stored, the rendered Helm chart and an `avsa submit --dry-run` RayJob are searched for
the values. None may appear anywhere."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflowserver import free_port

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "avsa"
VENV_BIN = Path(sys.executable).parent
JOBS = ("pretrain", "sweep", "transfer", "submit")
HEAD_START_TIMEOUT_S = 150.0
HEAD_STOP_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 420.0
HEAD_CPUS = 2  # the machine this runs on, and the head of the issue that hung


def run_job_script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{name}.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


@pytest.mark.parametrize("name", JOBS)
def test_help(name):
    res = run_job_script(name, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")
    assert name in res.stdout.splitlines()[0]


def unreachable_env() -> dict[str, str]:
    """Ray and MLflow addresses where nothing listens: a script that reached either would
    fail differently (or hang) instead of printing the config error."""
    dead = f"127.0.0.1:{free_port()}"
    return {**os.environ, "RAY_ADDRESS": dead, "MLFLOW_TRACKING_URI": f"http://{dead}"}


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.num_viewpoints=0", "data.num_viewpoints"), ("train.max_step=3", "train.max_step")],
)
def test_bad_override_is_one_line_before_ray(override, key):
    start = time.monotonic()
    res = run_job_script("pretrain", override, env=unreachable_env(), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("avsa pretrain: error: ")
    assert key in lines[0]
    assert res.stdout == ""
    assert time.monotonic() - start < 60


def test_a_job_without_a_tracking_server_is_refused_before_ray():
    """Inside a submitted job (Ray's job env var set) an unset tracking URI would mean SQLite in
    a temporary directory: refused with one line, before any Ray work."""
    env = {k: v for k, v in unreachable_env().items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = "{}"
    res = run_job_script("pretrain", "experiment=demo_local", env=env, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avsa pretrain: error: tracking.uri: not set "
                                                   "inside a Ray job"), res.stderr


def test_transfer_unknown_task_names_the_key():
    res = run_job_script("transfer", "no_such_task", env=unreachable_env(), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("avsa transfer: error: downstream.task")


# ----------------------------------------------------------------------------- a real Ray head


@dataclass
class RayHead:
    """A `ray start --head --block` process in its own session (process group)."""

    dashboard: str  # http://127.0.0.1:PORT, the job API
    proc: subprocess.Popen
    temp_dir: str
    log: Path
    env: dict[str, str]  # a client's environment: RAY_AUTH_MODE=token, the token in HOME/.ray

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM the `ray start` process (it shuts its node down), then SIGKILL whatever
        of its process group is left; only processes this fixture started are touched."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(HEAD_STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _http_status(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def head_env(home: Path, secret_values: dict[str, str]) -> dict[str, str]:
    """The environment of the head and of its clients. HOME is the test's own, so the token
    file is the test's; RAY_AUTH_MODE is left unset on the head, so Ray's default applies:
    token auth turns on because ~/.ray/auth_token exists. The S3 settings (moto, which takes
    any key) and `secret_values` are inherited by every Ray worker, as pods get them from the
    chart's ConfigMap and Secret."""
    env = {**os.environ, **secret_values}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(
        # `python` in a job's entrypoint is resolved through the PATH the head was started with.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        # On SIGTERM a node first drains for up to 30 s, for Serve proxies to finish their
        # requests; this head serves none, so it stops at once.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    return env


def start_head(log: Path, env: dict[str, str], num_cpus: int) -> RayHead:
    """Ready means: `ray start` has logged that the runtime started, is still alive a moment
    later, and the job API answers an authenticated request and refuses an anonymous one."""
    temp_dir = tempfile.mkdtemp(prefix="avsa-ray-", dir="/tmp")  # short: Unix sockets live there
    port, dash, agent, client = (free_port() for _ in range(4))
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp_dir,
                                start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", proc, temp_dir, log,
                   {**env, "RAY_AUTH_MODE": "token"})
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            time.sleep(3.0)  # `--block` reports a subprocess that died during startup here
            if proc.poll() is None and _http_status(f"{head.dashboard}/api/jobs/",
                                                    headers=_auth_header(head)) == 200:
                return head
            break
        time.sleep(1.0)
    head.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)
    raise RuntimeError(f"ray start --head did not come up:\n{head.log_tail()}")


@pytest.fixture(scope="module")
def secret_values() -> dict[str, str]:
    """Credentials no log, run or stored object may show, fresh per module."""
    return {
        "AWS_SECRET_ACCESS_KEY": "avsaSecretKey" + secrets.token_hex(16),
        "AWS_SESSION_TOKEN": "avsaSessionToken" + secrets.token_hex(24),
        "MLFLOW_TRACKING_TOKEN": "avsaMlflowToken" + secrets.token_hex(16),
    }


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint, secret_values):
    """The single-node steps of docs/cluster.md: `ray get-auth-token --generate` (what any
    earlier `ray.init()`, e.g. `make demo`, leaves behind), then `ray start --head` on 2 CPUs."""
    logs = tmp_path_factory.mktemp("ray-head")
    home = tmp_path_factory.mktemp("home")
    env = head_env(home, secret_values)
    res = subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and (home / ".ray" / "auth_token").is_file(), res.stderr
    try:
        head = start_head(logs / "ray-start-1.log", env, HEAD_CPUS)
    except RuntimeError:  # on a loaded machine the raylet can miss Ray's fixed 30 s; once more
        head = start_head(logs / "ray-start-2.log", env, HEAD_CPUS)
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_shards(s3_endpoint, tmp_path_factory):
    """Six 2 s synthetic clips at 128x64, sharded as train and val into a fresh bucket with
    `avsa shard` (the docs' command); returns (bucket URI, {split: shards URI})."""
    import boto3

    from avsa.synth import write_dataset

    root = tmp_path_factory.mktemp("job-data")
    write_dataset(root / "clips", 6, 2.0, seed=0, width=128, height=64, progress=False)
    bucket = f"avsa-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    out = {split: f"s3://{bucket}/shards/{split}" for split in ("train", "val")}
    procs = [subprocess.Popen([str(VENV_BIN / "avsa"), "shard", str(root / "clips"), uri,
                               "--samples-per-shard", "3", "--split", split],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for split, uri in out.items()]  # side by side: each is mostly interpreter start
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return f"s3://{bucket}", out


def submit_command(head: RayHead, entrypoint: tuple[str, ...], mlflow_uri: str | None,
                   *options: str) -> tuple[str, list[str]]:
    """(job id, `ray job submit` argv with k8s/runtime_env.yaml and the tracking URI)."""
    job_id = f"avsa-test-{uuid.uuid4().hex[:8]}"
    runtime_env = yaml.safe_load((REPO / "k8s" / "runtime_env.yaml").read_text())
    runtime_env.pop("working_dir")
    if mlflow_uri:
        runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = str(mlflow_uri)
    return job_id, [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard,
                    "--submission-id", job_id, "--working-dir", str(REPO), *options,
                    "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]


def submit(head: RayHead, cwd: Path, *entrypoint: str, mlflow_uri: str | None,
           env: dict[str, str] | None = None, timeout: float = JOB_TIMEOUT_S):
    """`ray job submit --working-dir REPO --runtime-env k8s/runtime_env.yaml` as documented,
    plus the tracking URI; returns (completed process, job id, job log)."""
    from ray.job_submission import JobSubmissionClient

    job_id, cmd = submit_command(head, entrypoint, mlflow_uri)
    client_env = env or head.env
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                             env=client_env)
    except subprocess.TimeoutExpired:
        logs = ""
        with contextlib.suppress(Exception):
            os.environ.update(RAY_AUTH_MODE="token")
            client = JobSubmissionClient(head.dashboard, headers=_auth_header(head))
            client.stop_job(job_id)
            logs = client.get_job_logs(job_id)[-4000:]
        pytest.fail(f"ray job submit still running after {timeout:.0f} s:\n{logs}")
    assert head.proc.poll() is None, f"the Ray head died:\n{head.log_tail()}"
    logs = _job_logs(head, job_id)
    (cwd / f"{job_id}.log").write_text(logs)
    return res, job_id, logs


def _auth_header(head: RayHead) -> dict[str, str]:
    token = (Path(head.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _job_logs(head: RayHead, job_id: str) -> str:
    req = urllib.request.Request(f"{head.dashboard}/api/jobs/{job_id}/logs",
                                 headers=_auth_header(head))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["logs"]


def _explain(res, logs: str, head: RayHead) -> str:
    return (f"{res.stderr[-3000:]}\n--- job log ---\n{logs[-5000:]}\n--- head ---\n"
            f"{head.log_tail()}")


TINY = ["experiment=demo_local", "model=tiny", "data.crop_size=32", "data.frames=4",
        "data.n_mels=32", "train.num_workers=1", "train.batch_size=2", "train.val_batches=1",
        "train.log_every=2", "train.checkpoint_every=2"]


@pytest.mark.slow
@pytest.mark.cluster
def test_the_head_refuses_clients_without_the_token(ray_head):
    assert _http_status(f"{ray_head.dashboard}/api/jobs/") == 401
    anonymous = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    res = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head.dashboard],
                         capture_output=True, text=True, timeout=120, env=anonymous)
    assert res.returncode != 0 and "Authentication required" in res.stdout + res.stderr
    res = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head.dashboard],
                         capture_output=True, text=True, timeout=120, env=ray_head.env)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.fixture(scope="module")
def pretrained(ray_head, s3_shards, mlflow_uri, tmp_path_factory):
    """`ray job submit ... python jobs/pretrain.py` with S3 shards and S3 checkpoints."""
    bucket, shards = s3_shards
    tmp = tmp_path_factory.mktemp("pretrain-job")
    experiment = f"jobs-{uuid.uuid4().hex[:8]}"
    res, job_id, logs = submit(
        ray_head, tmp, "python", "jobs/pretrain.py", *TINY,
        f"data.shards={shards['train']}", f"data.val_shards={shards['val']}",
        "train.max_steps=4", "train.val_every=4", f"storage.path={bucket}/runs",
        f"tracking.experiment={experiment}", mlflow_uri=mlflow_uri)
    return SimpleNamespace(res=res, job_id=job_id, logs=logs, experiment=experiment,
                           bucket=bucket, shards=shards)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_ray_job_submit_pretrain_on_s3_tracked_in_mlflow(pretrained, ray_head, mlflow_uri):
    import boto3
    from mlflow.tracking import MlflowClient

    p = pretrained
    assert p.res.returncode == 0, _explain(p.res, p.logs, ray_head)
    assert "[avsa] step 4/4" in p.logs and "[avsa] finished" in p.logs
    # the job's log is no terminal: Ray Data's bars would be a line per redraw there
    assert "Progress bars disabled" in p.logs and "row/s" not in p.logs
    assert "Reporting training result" not in p.logs  # the step lines say it, shorter
    ml = MlflowClient(str(mlflow_uri))
    (run,) = ml.search_runs([ml.get_experiment_by_name(p.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["avsa.kind"] == "pretrain"
    assert sorted(m.step for m in ml.get_metric_history(run.info.run_id, "train/loss")) == [2, 4]
    checkpoint = run.data.tags["avsa.checkpoint_uri"]
    assert checkpoint.startswith(f"{p.bucket}/runs/") and checkpoint.endswith("checkpoint-00000004")
    bucket, _, prefix = checkpoint.removeprefix("s3://").partition("/")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert listed.get("KeyCount", 0) > 0


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_ray_job_submit_transfer_from_the_pretrained_run(pretrained, ray_head, mlflow_uri,
                                                        tmp_path):
    from mlflow.tracking import MlflowClient

    assert pretrained.res.returncode == 0, "pretraining failed: see the test above"
    ml = MlflowClient(str(mlflow_uri))
    (run,) = ml.search_runs([ml.get_experiment_by_name(pretrained.experiment).experiment_id])
    shards = pretrained.shards
    res, _, logs = submit(
        ray_head, tmp_path, "python", "jobs/transfer.py", "avsa_bin",
        f"pretrain={run.info.run_id}", *TINY[1:], f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}", "downstream.epochs=1", "downstream.batch_size=2",
        f"downstream.experiment={pretrained.experiment}-transfer", mlflow_uri=mlflow_uri)
    assert res.returncode == 0, _explain(res, logs, ray_head)
    exp = ml.get_experiment_by_name(f"{pretrained.experiment}-transfer")
    (transfer,) = ml.search_runs([exp.experiment_id])
    assert transfer.info.status == "FINISHED"
    assert transfer.data.tags["avsa.pretrain_run_id"] == run.info.run_id


def _runs_with_steps(ml, experiment: str) -> list:
    exp = ml.get_experiment_by_name(experiment)
    runs = ml.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if "train/loss" in r.data.metrics]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_ray_job_stop_ends_the_pretraining_run_killed(ray_head, s3_shards, mlflow_uri, tmp_path):
    """`ray job stop` sends the driver SIGTERM and kills it RAY_JOB_STOP_WAIT_TIME_S later (3 s
    by default; k8s/runtime_env.yaml sets 60): time to stop the workers and end the MLflow run
    KILLED instead of leaving it RUNNING."""
    from mlflow.tracking import MlflowClient

    bucket, shards = s3_shards
    experiment = f"jobs-stop-{uuid.uuid4().hex[:8]}"
    job_id, cmd = submit_command(
        ray_head, ("python", "jobs/pretrain.py", *TINY, f"data.shards={shards['train']}",
                   f"data.val_shards={shards['val']}", "train.max_steps=100000",
                   "train.log_every=1", "train.val_every=0", f"storage.path={bucket}/stop",
                   f"tracking.experiment={experiment}"), mlflow_uri, "--no-wait")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=ray_head.env)
    assert res.returncode == 0, res.stderr[-3000:]
    ml = MlflowClient(str(mlflow_uri))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (runs := _runs_with_steps(ml, experiment)):
        assert time.monotonic() < deadline, f"no training step logged:\n{_job_logs(ray_head, job_id)}"
        time.sleep(1)
    stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", ray_head.dashboard,
                           job_id], capture_output=True, text=True, timeout=180, env=ray_head.env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = _job_logs(ray_head, job_id)
    assert "avsa pretrain: stopped by SIGTERM at step " in logs, logs[-3000:]
    run = ml.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED", logs[-3000:]
    assert run.data.tags["avsa.stopped_by"] == "SIGTERM"


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_ray_job_submit_sweep_too_big_for_the_head_fails_within_a_minute(ray_head, s3_shards,
                                                                        tmp_path, mlflow_uri):
    """One trial of one worker needs its worker's CPU, a decoding CPU and the trial driver's
    0.01: more than a 2-CPU head. It used to sit at 0 rows for 8 minutes in silence."""
    bucket, shards = s3_shards
    start = time.monotonic()
    res, _, logs = submit(
        ray_head, tmp_path, "python", "jobs/sweep.py", *TINY, "sweep=temperature_random",
        "sweep.num_samples=1", f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}", "train.max_steps=2", "sweep.report_every=2",
        f"storage.path={bucket}/sweeps-too-big", f"tracking.experiment=big-{uuid.uuid4().hex[:6]}",
        mlflow_uri=mlflow_uri, timeout=300)
    assert time.monotonic() - start < 120, "the refusal took too long"
    assert res.returncode != 0
    line = next(ln for ln in logs.splitlines() if "error:" in ln)
    assert "one trial of sweep" in line and "needs 2.01 CPU" in line, logs[-3000:]
    assert "the cluster has 2 CPU, 0 GPU" in line


@pytest.fixture(scope="module")
def fitted_sweep(ray_head, s3_shards, mlflow_uri, tmp_path_factory):
    """`ray job submit ... python jobs/sweep.py`: one trial that fits the head, on S3."""
    bucket, shards = s3_shards
    tmp = tmp_path_factory.mktemp("sweep-job")
    experiment = f"jobs-sweep-{uuid.uuid4().hex[:8]}"
    res, _, logs = submit(
        ray_head, tmp, "python", "jobs/sweep.py", *TINY, "sweep=temperature_random",
        "sweep.num_samples=1", "data.decode_cpus=0.5", f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}", "train.max_steps=2", "sweep.report_every=2",
        "sweep.scheduler=fifo", f"storage.path={bucket}/sweeps",
        f"tracking.experiment={experiment}", mlflow_uri=mlflow_uri)
    return SimpleNamespace(res=res, logs=logs, experiment=experiment, bucket=bucket)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_ray_job_submit_sweep_sized_to_fit_runs_one_trial(fitted_sweep, ray_head, mlflow_uri):
    from mlflow.tracking import MlflowClient

    res, logs, bucket = fitted_sweep.res, fitted_sweep.logs, fitted_sweep.bucket
    assert res.returncode == 0, _explain(res, logs, ray_head)
    assert "[avsa] best: " in logs
    ml = MlflowClient(str(mlflow_uri))
    runs = ml.search_runs([ml.get_experiment_by_name(fitted_sweep.experiment).experiment_id])
    kinds = sorted(r.data.tags["avsa.kind"] for r in runs)
    assert kinds == ["sweep", "trial"]
    trial = next(r for r in runs if r.data.tags["avsa.kind"] == "trial")
    assert trial.data.tags["avsa.checkpoint_uri"].startswith(f"{bucket}/sweeps/")


# ----------------------------------------------------------------------------- secrets

SEEN = """
import hashlib, json, os, sys
import ray

@ray.remote
def seen(names):  # proves the workers had the secrets, without printing them
    return {n: hashlib.sha256(os.environ.get(n, "").encode()).hexdigest() for n in names}

print("WORKER_ENV", json.dumps(ray.get(seen.remote(sys.argv[1:]))), flush=True)
"""


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _mlflow_corpus(client, experiments: list[str], dst: Path) -> dict[str, bytes]:
    """Every param, tag and metric key, and every artifact file, of the experiments' runs."""
    out: dict[str, bytes] = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            out[f"mlflow:{name}:{rid}:params"] = json.dumps(run.data.params).encode()
            out[f"mlflow:{name}:{rid}:tags"] = json.dumps(run.data.tags).encode()
            out[f"mlflow:{name}:{rid}:metrics"] = json.dumps(run.data.metrics).encode()
            local = Path(client.download_artifacts(rid, "", str(dst / rid)))
            for f in _files(local):
                out[f"mlflow:{name}:{rid}:artifact:{f.relative_to(local)}"] = f.read_bytes()
    return out


def _helm_corpus() -> dict[str, bytes]:
    import helm_python as helm

    out = {}
    cases = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
    with helm.Chart.load(CHART) as chart:
        for case in cases:
            values = None if case is None else helm.values_from_yaml(case.read_text())
            rendered = chart.render(values, name="avsa", namespace="ml", is_install=True)
            for path, text in rendered.items():
                out[f"helm:{case and case.name}:{path}"] = text.encode()
    return out


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.reliability
@pytest.mark.timeout(900)
def test_secret_values_appear_nowhere(pretrained, fitted_sweep, ray_head, secret_values,
                                      mlflow_uri, s3_endpoint, tmp_path, monkeypatch):
    """Runs last in this module, so the transfer and the refused sweep are searched too."""
    import boto3
    from mlflow.tracking import MlflowClient

    from avsa import cluster

    for job in (pretrained, fitted_sweep):  # a secret-free failure would prove nothing
        assert job.res.returncode == 0, _explain(job.res, job.logs, ray_head)
    # The secrets really were in every process: a job's Ray worker saw them.
    names = sorted(secret_values)
    res, _, logs = submit(ray_head, tmp_path, "python", "-c", SEEN, *names, mlflow_uri=None)
    assert res.returncode == 0, _explain(res, logs, ray_head)
    line = next(ln for ln in logs.splitlines() if ln.startswith("WORKER_ENV "))
    assert json.loads(line.split(" ", 1)[1]) == {
        k: hashlib.sha256(v.encode()).hexdigest() for k, v in secret_values.items()}

    corpus: dict[str, bytes] = {}
    for i, job in enumerate((pretrained, fitted_sweep)):
        corpus[f"submit{i}:stdout"] = job.res.stdout.encode()
        corpus[f"submit{i}:stderr"] = job.res.stderr.encode()
    ray_tmp = Path(ray_head.temp_dir)
    ray_files = _files(ray_tmp)
    assert any(p.name.startswith("worker-") for p in ray_files)
    assert any(p.name.startswith("job-driver-") for p in ray_files)
    corpus |= {f"ray:{p.relative_to(ray_tmp)}": p.read_bytes() for p in ray_files}
    corpus["ray-start.log"] = ray_head.log.read_bytes()
    corpus["mlflow-server.log"] = Path(mlflow_uri.log_path).read_bytes()
    client = MlflowClient(mlflow_uri)
    experiments = [pretrained.experiment, fitted_sweep.experiment]
    if client.get_experiment_by_name(f"{pretrained.experiment}-transfer") is not None:
        experiments.append(f"{pretrained.experiment}-transfer")
    mlflow_files = _mlflow_corpus(client, experiments, tmp_path / "artifacts")
    assert any(k.endswith("config.yaml") for k in mlflow_files)
    (pre,) = client.search_runs(
        [client.get_experiment_by_name(pretrained.experiment).experiment_id])
    assert any(pre.info.run_id in k for k in mlflow_files)
    corpus |= mlflow_files
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = pretrained.bucket.removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("runs/") and k.endswith("state.pt") for k in keys)
    assert any(k.startswith("sweeps/") and k.endswith("state.pt") for k in keys)
    corpus |= {f"s3:{k}": s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    for name, value in secret_values.items():
        monkeypatch.setenv(name, value)
    corpus |= _helm_corpus()
    dry_run = io.StringIO()
    assert cluster.main(["avsa-secrets", "--dry-run", "--s3-secret", "avsa-s3", "--mlflow-uri",
                         str(mlflow_uri), "--", "jobs/pretrain.py", "experiment=demo_local"],
                        out=dry_run) == 0
    assert "RayJob" in dry_run.getvalue()
    corpus["avsa submit --dry-run"] = dry_run.getvalue().encode()

    leaks = [(where, name) for where, blob in corpus.items()
             for name, value in secret_values.items() if value.encode() in blob]
    assert leaks == [], f"secret values found in: {leaks[:10]}"
