"""jobs/*.py, the entry points for `ray job submit`: their --help, their one-line errors before
any Ray or MLflow work, and one real submission to a local Ray head started with `ray start`,
tracked in a real MLflow server."""

from __future__ import annotations

import contextlib
import json
import os
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

import pytest
import yaml
from mlflowserver import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
JOBS = ("pretrain", "sweep", "transfer", "submit")
HEAD_START_TIMEOUT_S = 150.0
HEAD_STOP_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 420.0


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
    env: dict[str, str]

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


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def head_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        # `python` in a job's entrypoint is resolved through the PATH the head was started with.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        # A throwaway head bound to loopback: no token, so the test never reads ~/.ray.
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_head(log: Path) -> RayHead:
    """`ray start --head` on free loopback ports with its own temp dir, so neither the
    session's in-process Ray nor any other Ray on the machine is in the way. The temp dir is
    short because Ray puts Unix sockets in it (108-byte limit). Ready means: `ray start` has
    logged that the runtime started, is still alive a moment later, and the job API answers."""
    temp_dir = tempfile.mkdtemp(prefix="avsa-ray-", dir="/tmp")
    port, dash, agent, client = (free_port() for _ in range(4))
    env = head_env()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp_dir,
                                start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", proc, temp_dir, log, env)
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            time.sleep(3.0)  # `--block` reports a subprocess that died during startup here
            if proc.poll() is None and _http_ok(f"{head.dashboard}/api/version") \
                    and _http_ok(f"{head.dashboard}/api/jobs/"):
                return head
            break
        time.sleep(1.0)
    head.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)
    raise RuntimeError(f"ray start --head did not come up:\n{head.log_tail()}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-head")
    try:
        head = start_head(logs / "ray-start-1.log")
    except RuntimeError:  # on a loaded machine the raylet can miss Ray's fixed 30 s; once more
        head = start_head(logs / "ray-start-2.log")
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """Six 2 s synthetic clips at 128x64, sharded as train and val."""
    from avsa.data.shards import write_shards
    from avsa.synth import write_dataset

    root = tmp_path_factory.mktemp("job-data")
    write_dataset(root / "clips", 6, 2.0, seed=0, width=128, height=64, progress=False)
    out = {}
    for split in ("train", "val"):
        out[split] = str(root / "shards" / split)
        write_shards(str(root / "clips"), out[split], samples_per_shard=3, split=split,
                     progress=False)
    return out


def runtime_env(mlflow_uri: str) -> dict:
    """k8s/runtime_env.yaml (the documented one) with the tracking server added; the working
    dir is given to `ray job submit --working-dir`."""
    env = yaml.safe_load((REPO / "k8s" / "runtime_env.yaml").read_text())
    env.pop("working_dir", None)
    env["env_vars"] = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": str(mlflow_uri)}
    return env


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)  # two head starts at most, then the job
def test_ray_job_submit_pretrain_tracked_in_mlflow(ray_head, tiny_shards, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    experiment = f"jobs-{uuid.uuid4().hex[:8]}"
    job_id = f"avsa-test-{uuid.uuid4().hex[:8]}"
    runs_dir = tmp_path / "runs"
    overrides = [
        "experiment=demo_local", "model=tiny",
        f"data.shards={tiny_shards['train']}", f"data.val_shards={tiny_shards['val']}",
        "data.crop_size=32", "data.frames=4", "data.n_mels=32",
        "train.max_steps=4", "train.num_workers=1", "train.batch_size=2", "train.val_every=4",
        "train.val_batches=1", "train.log_every=2", "train.checkpoint_every=2",
        f"storage.path={runs_dir}", f"tracking.experiment={experiment}",
    ]
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
        "--submission-id", job_id, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env(mlflow_uri)),
        "--", "python", "jobs/pretrain.py", *overrides,
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                             cwd=tmp_path, env=ray_head.env)
    except subprocess.TimeoutExpired:
        logs = ""
        with contextlib.suppress(Exception):
            client = JobSubmissionClient(ray_head.dashboard)
            client.stop_job(job_id)
            logs = client.get_job_logs(job_id)[-4000:]
        pytest.fail(f"ray job submit still running after {JOB_TIMEOUT_S:.0f} s:\n{logs}")

    assert ray_head.proc.poll() is None, f"the Ray head died:\n{ray_head.log_tail()}"
    client = JobSubmissionClient(ray_head.dashboard)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    assert res.returncode == 0, (
        f"{res.stderr[-3000:]}\n--- job log ---\n{logs[-4000:]}\n--- head ---\n"
        f"{ray_head.log_tail()}"
    )
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "[avsa] step 2/4" in logs
    assert "[avsa] step 4/4" in logs
    assert "[avsa] finished" in logs

    ml = MlflowClient(str(mlflow_uri))
    exp = ml.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {mlflow_uri}"
    runs = ml.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["avsa.kind"] == "pretrain"
    assert run.data.params["data.num_viewpoints"] == "4"
    loss = ml.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [2, 4]
    assert "val/avsa_acc" in run.data.metrics
    checkpoint = run.data.tags["avsa.checkpoint_uri"]
    assert Path(checkpoint).name == "checkpoint-00000004"
    assert Path(checkpoint).is_relative_to(runs_dir)
    assert any(Path(checkpoint).iterdir())
