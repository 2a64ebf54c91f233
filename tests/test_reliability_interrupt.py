"""A user's commonest faults, injected for real into `avsa pretrain` processes (each starts
its own local Ray, as a user's command does) that track to a real `mlflow server`:

1. SIGINT once checkpoint 4 is complete: exit 130, one line saying how to resume, the MLflow
   run KILLED with the step reached, no process of that Ray left behind. Before that, the same
   command started again is refused at once, naming the holder.
2. The newest checkpoint's `state.pt` truncated, then the command run again: one message, the
   checkpoint set aside, the run resumes from the one before; SIGTERM once it has committed a
   newer checkpoint: exit 143.
3. The command run a third time resumes from the newest complete checkpoint and finishes:
   the MLflow run FINISHED, every metric key with exactly one value per step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from avsa import synth
from avsa.data.shards import write_shards
from avsa.train.resume import COMMITTED

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STEPS = 16  # room for the stops below to land before the end on a slow machine


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("intdata")
    synth.write_dataset(root / "clips", 6, 2.0, seed=0, width=128, height=64, progress=False)
    write_shards(str(root / "clips"), str(root / "train"), samples_per_shard=3, progress=False)
    return root / "train"


def _command(shards: Path, store: Path, uri: str) -> list[str]:
    return ["pretrain", "experiment=demo_local", "model=tiny", f"data.shards={shards}",
            "data.val_shards=null", "data.crop_size=32", "data.frames=4", "data.n_mels=32",
            "data.num_viewpoints=2",
            f"train.max_steps={STEPS}", "train.batch_size=2", "train.num_workers=1",
            "train.log_every=1", "train.checkpoint_every=2", "train.val_batches=0",
            "data.decode_cpus=0.5", f"storage.path={store}", f"tracking.uri={uri}",
            "tracking.experiment=interrupts", "storage.run_name=int-run"]


def _start(args: list[str], ray_tmp: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "avsa.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture
def start():
    """_start, and on the way out (a failed assertion included) whatever a started command
    left running is killed: its process group, then any process naming its Ray temp dir."""
    started: list[tuple[subprocess.Popen, str]] = []

    def run(args: list[str], ray_tmp: str) -> subprocess.Popen:
        started.append((_start(args, ray_tmp), ray_tmp))
        return started[-1][0]

    yield run
    for proc, ray_tmp in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for line in _leftovers(ray_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _out, err = proc.communicate()
            pytest.fail(f"{path.name} never appeared (rc {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.2)


def _leftovers(ray_tmp: str) -> list[str]:
    """Processes whose command line names this command's Ray temp dir."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if ray_tmp in cmd:
                found.append(f"{pid}: {cmd[:120]}")
    return found


def _no_leftovers(ray_tmp: str) -> None:
    deadline = time.monotonic() + 30
    while (left := _leftovers(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def _ckpt(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step:08d}"


def test_interrupt_damage_and_resume(shards, tmp_path, mlflow_uri, start):
    store = tmp_path / "runs"
    run = store / "int-run"
    args = _command(shards, store, mlflow_uri)
    client = MlflowClient(mlflow_uri)
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/ri")  # short: Ray's socket paths live in it

    # 1. A second identical command while the first holds the run directory; SIGINT to the
    # first once checkpoint 4 is complete.
    first = start(args, ray_tmp)
    _wait_for(run / "avsa_lease.json", first)
    # a Ray address ray.init refuses at once: had the second reached Ray before the lease, it
    # would fail on that instead of the refusal below
    second = subprocess.run([sys.executable, "-m", "avsa.cli", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "RAY_ADDRESS": "no-ray-here"},
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert f"{run}: in use by another avsa pretrain (host " in line, line
    assert f"pid {first.pid}, started " in line
    _wait_for(_ckpt(run, 4) / COMMITTED, first)
    os.kill(first.pid, signal.SIGINT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("avsa pretrain: stopped by SIGINT at step "), last
    assert "; to resume, run again: avsa pretrain experiment=demo_local" in last
    (exp,) = [e for e in client.search_experiments() if e.name == "interrupts"]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "KILLED"
    assert int(r.data.tags["avsa.stopped_at_step"]) >= 4
    assert r.data.tags["avsa.stopped_by"] == "SIGINT"
    _no_leftovers(ray_tmp)
    assert not (run / "avsa_lease.json").exists()

    # 2. The newest complete checkpoint damaged; the rerun falls back, then gets SIGTERM.
    newest = max(p for p in run.glob("checkpoint-*") if (p / COMMITTED).exists())
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rerun = start(args, ray_tmp)
    step = int(newest.name.split("-")[1])
    _wait_for(_ckpt(run, step + 2) / COMMITTED, rerun)
    os.kill(rerun.pid, signal.SIGTERM)
    _, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 143, err[-3000:]
    assert err.count(f"damaged checkpoint {newest.name}") == 1, err[-3000:]
    assert (run / f"damaged-{newest.name}" / "state.pt").exists()
    assert err.strip().splitlines()[-1].startswith("avsa pretrain: stopped by SIGTERM")
    assert client.get_run(r.info.run_id).info.status == "KILLED"
    _no_leftovers(ray_tmp)

    # 3. Run to the end: the same MLflow run, FINISHED, one value per step for every key.
    final = start(args, ray_tmp)
    _out, err = final.communicate(timeout=400)
    assert final.returncode == 0, err[-3000:]
    assert "Failed to query Ray Train Controller actor state" not in err  # state API served
    done = client.get_run(r.info.run_id)
    assert done.info.status == "FINISHED"
    for key in done.data.metrics:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    loss_steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss"))
    assert loss_steps == list(range(1, STEPS + 1))
    _no_leftovers(ray_tmp)

    # 4. The same command once more: the run is reported as it is, without Ray (an address
    # ray.init would refuse) and without a second model version.
    versions = len(client.search_model_versions(f"run_id = '{r.info.run_id}'"))
    again = subprocess.run([sys.executable, "-m", "avsa.cli", *args], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO),
                                "RAY_ADDRESS": "no-ray-here"},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"int-run finished before, at step {STEPS}: nothing left" in again.stderr
    assert f"[avsa] finished int-run at step {STEPS}: " in again.stdout
    assert f"MLflow run {r.info.run_id}" in again.stdout
    assert client.get_run(r.info.run_id).info.status == "FINISHED"
    assert len(client.search_model_versions(f"run_id = '{r.info.run_id}'")) == versions
