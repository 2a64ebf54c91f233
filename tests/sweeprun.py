"""One real 4-trial sweep for the whole session, on the session's local Ray and `mlflow
server`: its driver (a subprocess, `python -m avsa.cli sweep`) is Ctrl-C'd once two trials have
finished and the same command then finishes it in this process. tests/test_sweep.py checks the
interruption, the resume and the tracking; tests/test_mlflow_ui.py browses its runs."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from avsa.config import compose
from avsa.sweep import driver as sweep
from avsa.sweep import space as sweep_space

REPO = Path(__file__).resolve().parent.parent


def sweep_overrides(data: Path, storage: Path, uri: str, experiment: str) -> list[str]:
    """The sweep's command line: 4 trials of a 4-step tiny pretraining, on `data`'s shards."""
    return [
        "model=tiny", "data=synthetic_small", f"data.shards={data / 'train'}",
        f"data.val_shards={data / 'val'}", "data.crop_size=32", "data.frames=4", "data.n_mels=32",
        "data.equirect_height=0", "train.max_steps=4", "train.batch_size=4",
        "train.num_workers=1", "train.val_every=2", "train.val_batches=1", "train.log_every=2",
        "train.checkpoint_every=2", "sweep.space.data.num_viewpoints=[2,4]",
        "sweep.space.loss.temperature=[0.07,0.2]", "sweep.scheduler=fifo",
        f"tracking.uri={uri}", f"tracking.experiment={experiment}", f"storage.path={storage}",
    ]


@pytest.fixture(scope="session")
def sweep_shards(tmp_path_factory) -> Path:
    """8 synthetic clips as `shards/train` (2 shards) and `shards/val` (1 shard)."""
    from avsa.data.shards import write_shards
    from avsa.synth import write_dataset

    root = tmp_path_factory.mktemp("sweepdata")
    write_dataset(root / "clips", 8, 2.0, seed=0, width=128, height=64, progress=False)
    out = root / "shards"
    write_shards(str(root / "clips"), str(out / "train"), samples_per_shard=4, progress=False)
    write_shards(str(root / "clips"), str(out / "val"), samples_per_shard=8, split="val",
                 progress=False)
    return out


def trial_states(exp_dir: Path) -> dict[str, str]:
    """{trial id: status} from the newest Tune experiment state on disk."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # being replaced
    out = {}
    for trial_json, _meta in data["trial_data"]:
        t = json.loads(trial_json)
        out[t["trial_id"]] = t["status"]
    return out


def result_lines(exp_dir: Path, trial_id: str) -> int:
    """Lines of the trial's result.json: one per reported result."""
    (path,) = glob.glob(str(exp_dir / f"*_{trial_id}_*" / "result.json"))
    return len(Path(path).read_text().splitlines())


def trial_runs(client, experiment: str) -> dict[str, object]:
    """{run name: run} of the experiment's trial runs."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`avsa.kind` = 'trial'")
    return {r.info.run_name: r for r in runs}


@pytest.fixture(scope="session")
def interrupted_sweep(ray_session, mlflow_uri, sweep_shards, tmp_path_factory):
    """Start the sweep in a subprocess driver, Ctrl-C it (SIGINT to its process group) once two
    trials are TERMINATED, note what it left, then run the same command here to the end.
    Its best encoders are registered as `model`."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("sweep")
    experiment, model = f"sweep-{tmp.name}", f"sweep-enc-{tmp.name}"
    argv = [*sweep_overrides(sweep_shards, tmp / "store", mlflow_uri, experiment),
            f"tracking.model_name={model}"]
    name = sweep_space.sweep_run_name(sweep.prepare_base(compose(argv)))
    exp_dir = tmp / "store" / "sweeps" / name
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    log_path = tmp / "driver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "avsa.cli", "sweep", *argv], cwd=tmp,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while sum(s == "TERMINATED" for s in trial_states(exp_dir).values()) < 2:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the sweep did not stop on SIGINT:\n{log_path.read_text()[-3000:]}")
    stopped = {"rc": proc.returncode, "log": log_path.read_text(errors="replace"),
               "left": _group_alive(proc.pid)}
    before = trial_states(exp_dir)
    finished = [t for t, s in before.items() if s == "TERMINATED"]
    client = MlflowClient(mlflow_uri)
    runs = trial_runs(client, experiment)
    snapshot = {
        "statuses": {r.info.run_name: r.info.status for r in client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id])},
        "lines": {t: result_lines(exp_dir, t) for t in finished},
        "runs": {n: (r.info.run_id, r.info.end_time,
                     len(client.get_metric_history(r.info.run_id, "train/loss")))
                 for n, r in runs.items() if r.info.status == "FINISHED"},
    }
    time.sleep(2)  # the killed driver's actors go with it
    assert sweep.main(argv) == 0
    return SimpleNamespace(before=before, finished=finished, snapshot=snapshot, client=client,
                           experiment=experiment, exp_dir=exp_dir, name=name, stopped=stopped,
                           model=model, shards=sweep_shards, argv=argv)


def _group_alive(pgid: int) -> list[str]:
    """Processes still in the process group `pgid` a moment after its leader exited."""
    deadline = time.monotonic() + 30
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == pgid:
                    left.append(Path(f"/proc/{pid}/cmdline").read_bytes()[:120].decode(
                        errors="replace"))
            except (OSError, ProcessLookupError):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
