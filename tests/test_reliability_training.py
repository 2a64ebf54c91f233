"""Faults injected into real pretraining runs (Ray Train on the session's local Ray, a real
`mlflow server`): train workers that die (a test callback's `os._exit`, then a SIGKILL from
outside, in one run), the tracking server going away mid-run, a checkpoint target that refuses the write,
an unwritable storage path, and two runs sharing one storage path.

Each run is tiny (tiny model, 32 px crops, 6-12 steps of batch 2 on one or two workers) and
reads a shard set holding one corrupt sample, so every run also shows the skip counted in
MLflow.
Already covered elsewhere: tests/test_tracking.py (buffering through an outage, unit level),
tests/test_storage.py (S3 endpoint restart during a read)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from faults import CountReports, LastRankExits
from mlflow.tracking import MlflowClient
from mlflowserver import MlflowServer

from avsa import storage, synth
from avsa.config import compose, config_digest, from_dict
from avsa.data.manifest import Manifest, write_manifest
from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name, write_shards
from avsa.errors import CheckpointError
from avsa.train import checkpoint as ckpt
from avsa.train import driver

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

RUN_TIMEOUT_S = 540
FAULT_MARKER = "worker_exit.done"  # in the run directory once the first worker has exited


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 synthetic clips + 1 corrupt sample in 3 train shards; the 8 clips as validation."""
    root = tmp_path_factory.mktemp("reldata")
    synth.write_dataset(root / "clips", 8, 2.0, seed=0, width=128, height=64, progress=False)
    keys = sorted(p.stem for p in (root / "clips").glob("*.mp4"))
    samples = [RawSample(k, {ext: (root / "clips" / f"{k}.{ext}").read_bytes()
                             for ext in ("mp4", "json")}) for k in keys]
    samples.insert(1, RawSample("corrupt", {"mp4": b"\x00not an mp4" * 40}))
    infos = []
    for i in range(3):
        blob = pack_shard(samples[3 * i: 3 * i + 3])
        storage.write_bytes(str(root / "train" / shard_name(i)), blob)
        infos.append(shard_info(shard_name(i), blob, 3))
    write_manifest(str(root / "train"), Manifest("train", infos, 9))
    write_shards(str(root / "clips"), str(root / "val"), samples_per_shard=8, split="val",
                 progress=False)
    return root


def overrides(data: Path, store: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    return [
        "experiment=demo_local", "model=tiny", f"data.shards={data / 'train'}",
        f"data.val_shards={data / 'val'}", "data.crop_size=32", "data.frames=4",
        "data.n_mels=32", "data.equirect_height=0", "data.num_viewpoints=2",
        "train.max_steps=6", "train.batch_size=2", "train.num_workers=2", "train.log_every=2",
        "train.checkpoint_every=2", "train.val_every=0", "train.val_batches=1",
        f"storage.path={store}", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
        *extra,
    ]


def _run_in_thread(cfg, callbacks=()) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = driver.pretrain(cfg, callbacks)
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _finish(thread: threading.Thread, box: dict):
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive(), "pretraining did not finish in time"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _wait_for(path: Path, thread: threading.Thread, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert thread.is_alive(), f"the run ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _checkpoint_steps(run_dir: Path, cfg) -> list[int]:
    """Steps of every checkpoint-* directory; each must load and belong to `cfg`'s run."""
    steps = []
    for d in sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir()):
        state = ckpt.load(d)
        assert state["step"] == int(d.name.split("-")[1]), d
        assert config_digest(from_dict(state["config"])) == config_digest(cfg), \
            f"{d} holds another run's checkpoint"
        steps.append(state["step"])
    return steps


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _train_workers(raylet_pid: int) -> list[int]:
    """PIDs of Ray Train worker processes started by this session's raylet (never another
    engineer's Ray on the same machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError, ValueError):
            continue
        if ppid == raylet_pid and title.startswith(b"ray::RayTrainWorker"):
            pids.append(int(proc.name))
    return sorted(pids)


def _raylet_pid() -> int:
    import ray._private.worker as worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def _ray_logs() -> str:
    import ray._private.worker as worker

    logs = Path(worker._global_node.get_logs_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """One storage path for the worker-death run and the refused-checkpoint run."""
    return tmp_path_factory.mktemp("store")


# ----------------------------------------------------------------------------- worker death


@pytest.fixture(scope="module")
def death_run(ray_session, mlflow_uri, data, shared_store):
    """One run on 2 workers that loses a worker twice: a callback makes the last rank
    `os._exit(1)` once (after its step-4 report, the second: so checkpoint 2 is registered), and
    once the restarted group has written checkpoint 8 one of its processes gets a SIGKILL from
    outside. Returns (cfg, result, killed pid)."""
    cfg = compose(overrides(data, shared_store, mlflow_uri, "rel-death", "train.max_steps=12"))
    run_dir = shared_store / cfg.run_name()
    raylet = _raylet_pid()
    exits = LastRankExits(after_report=2, marker=run_dir / FAULT_MARKER)  # log_every=2
    thread, box = _run_in_thread(cfg, [exits])
    _wait_for(run_dir / FAULT_MARKER, thread)
    _wait_for(run_dir / "checkpoint-00000008", thread)
    victims = _train_workers(raylet)
    assert len(victims) == 2, victims
    assert thread.is_alive()
    os.kill(victims[-1], signal.SIGKILL)
    return cfg, _finish(thread, box), victims[-1]


def test_worker_deaths_mid_epoch_resume_from_checkpoints(death_run, mlflow_uri, shared_store):
    """After both deaths the run resumes from its last registered checkpoint, ends at
    train.max_steps, and every kept checkpoint loads with its own step and config."""
    cfg, res, victim = death_run
    run_dir = shared_store / cfg.run_name()
    assert (run_dir / FAULT_MARKER).is_file()  # the first fault fired
    assert not _alive(victim)  # and so did the second
    assert res.metrics["step"] == 12
    assert res.checkpoint_uri == str(run_dir / "checkpoint-00000012")
    # num_to_keep=3 among the checkpoints Ray tracks; ones from before a restart can remain
    # (docs/reliability.md, known limits)
    assert _checkpoint_steps(run_dir, cfg)[-3:] == [8, 10, 12]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(res.run_id).info.status == "FINISHED"
    steps = _history(client, res.run_id, "train/loss")
    assert set(steps) == {2, 4, 6, 8, 10, 12}
    assert steps.count(2) == 1, "a restart began from scratch, not from a checkpoint"
    # The run's count, carried over both restarts: the last value holds the corrupt sample.
    skips = sorted(client.get_metric_history(res.run_id, "data/skipped_samples"),
                   key=lambda m: m.step)
    assert skips[-1].step == 12 and skips[-1].value >= 1, [(m.step, m.value) for m in skips]


def test_same_run_name_for_another_config_is_refused(death_run, mlflow_uri, data, shared_store):
    """`storage.run_name` pins the directory; another config there would resume from (and
    overwrite) the first run's checkpoints, so it is refused before its MLflow run or Ray."""
    cfg, _, _ = death_run
    before = sorted(p.name for p in (shared_store / cfg.run_name()).iterdir())
    other = compose(overrides(data, shared_store, mlflow_uri, "rel-clash",
                              f"storage.run_name={cfg.run_name()}", "loss.temperature=0.2"))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"^{shared_store / cfg.run_name()}: holds the "
                                              r"checkpoints of another config \(digest [0-9a-f]{16}, "
                                              r"this config [0-9a-f]{16}\)"):
        driver.pretrain(other)
    assert time.monotonic() - start < 30
    assert sorted(p.name for p in (shared_store / cfg.run_name()).iterdir()) == before
    assert MlflowClient(mlflow_uri).get_experiment_by_name("rel-clash") is None
    # The same config under its pinned name is accepted (resubmission resumes).
    same = compose(overrides(data, shared_store, mlflow_uri, "rel-death", "train.max_steps=12",
                             f"storage.run_name={cfg.run_name()}"))
    driver.claim_run_dir(same, str(shared_store / cfg.run_name()))


# ----------------------------------------------------------------------------- tracking outage


def test_mlflow_outage_mid_run_and_only_checkpoints_reported_to_ray(ray_session, data,
                                                                    tmp_path):
    """The tracking server dies after checkpoint 3 and comes back after checkpoint 6: training
    goes on, a warning says metrics are buffered, and every step (logged at each one) arrives
    once. Ray Train's controller takes one report per worker every 2 s and holds a worker that
    reports sooner (a report at every log step held each step up to 2 s), so Ray gets the
    checkpoints (steps 3, 6 and 9) and nothing else."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        cfg = compose(overrides(data, tmp_path / "store", server, "rel-outage",
                                "train.max_steps=9", "train.num_workers=1",
                                "train.log_every=1", "train.checkpoint_every=3"))
        run_dir = tmp_path / "store" / cfg.run_name()
        reports = tmp_path / "reports.txt"
        raylet = _raylet_pid()
        thread, box = _run_in_thread(cfg, [CountReports(reports)])
        _wait_for(run_dir / "checkpoint-00000003", thread)
        # Hold the worker still while the server goes down, so that the outage certainly
        # spans a logging step however fast or slow this machine is.
        (worker,) = _train_workers(raylet)
        os.kill(worker, signal.SIGSTOP)
        try:
            server.stop()
        finally:
            os.kill(worker, signal.SIGCONT)
        _wait_for(run_dir / "checkpoint-00000006", thread)
        server.start()  # steps 4 to 6 were logged while the server was down
        res = _finish(thread, box)
        client = MlflowClient(server)
        assert res.metrics["step"] == 9 and "val/avsa_acc" in res.metrics
        assert client.get_run(res.run_id).info.status == "FINISHED"
        assert _history(client, res.run_id, "train/loss") == list(range(1, 10))
        assert sum(m.value for m in client.get_metric_history(res.run_id,
                                                              "data/skipped_samples")) >= 1
        assert "MLflow unreachable at " in _ray_logs()
        assert reports.read_text().count("report") == 3
        assert _checkpoint_steps(run_dir, cfg) == [3, 6, 9]
    finally:
        server.stop()


# ----------------------------------------------------------------------------- checkpoint writes


def test_checkpoint_target_refusing_the_write_keeps_the_last_checkpoint(mlflow_uri, data,
                                                                       shared_store, death_run):
    """The storage target refuses checkpoint 4 (a file sits where its directory must go, which
    fails for root too): one-line CheckpointError naming it, checkpoint 2 intact. It shares the
    storage path with the worker-death run, whose checkpoints stay untouched and its own."""
    cfg = compose(overrides(data, shared_store, mlflow_uri, "rel-ckpt",
                            "train.max_failures=0", "train.num_workers=1"))
    run_dir = shared_store / cfg.run_name()
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint-00000004").write_text("in the way")
    with pytest.raises(CheckpointError) as e:
        driver.pretrain(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{run_dir / 'checkpoint-00000004'}: cannot write checkpoint (")
    assert ckpt.load(run_dir / "checkpoint-00000002")["step"] == 2
    assert (run_dir / "checkpoint-00000004").read_text() == "in the way"
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rel-ckpt").experiment_id])
    assert run.info.status == "FAILED"
    assert _history(client, run.info.run_id, "train/loss") == [2, 4]  # logged, then refused
    # Two configs on one storage path: separate run directories, neither touched the other's.
    death_cfg, _, _ = death_run
    assert death_cfg.run_name() != cfg.run_name()
    assert _checkpoint_steps(shared_store / death_cfg.run_name(), death_cfg)[-3:] == [8, 10, 12]
    assert _checkpoint_steps(run_dir, cfg) == [2]


def test_unwritable_storage_path_fails_before_ray(mlflow_uri, data, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the storage folder should be")
    cfg = compose(overrides(data, blocker / "runs", mlflow_uri, "rel-unwritable"))

    def touched(*_a, **_k):
        raise AssertionError("reached Ray")

    monkeypatch.setattr(driver, "ensure_ray", touched)
    with pytest.raises(CheckpointError, match=rf"^{blocker / 'runs' / cfg.run_name()}: cannot "
                                              r"use the run directory \(.+\)$"):
        driver.pretrain(cfg)
    assert MlflowClient(mlflow_uri).get_experiment_by_name("rel-unwritable") is None


def test_a_failure_between_the_runs_start_and_fit_ends_it_failed(ray_session, mlflow_uri, data,
                                                                 tmp_path, monkeypatch):
    """Once the MLflow run has started, an error before training (here: building the trainer)
    ends it FAILED and gives the run directory back."""
    cfg = compose(overrides(data, tmp_path / "runs", mlflow_uri, "rel-before-fit"))

    def broken(*_a, **_k):
        raise RuntimeError("the trainer could not be built")

    monkeypatch.setattr(driver, "build_trainer", broken)
    with pytest.raises(RuntimeError, match="could not be built"):
        driver.pretrain(cfg)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("rel-before-fit").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "runs" / cfg.run_name() / "avsa_lease.json").exists()
