"""`avsa demo` end to end at toy size: synthesis, shards, 2-worker Ray Train pretraining, and the
pretrained-versus-scratch AVSA-Bin transfer, all tracked by a real MLflow server."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from avsa import demo, media
from avsa.config import compose

OUT = "demo=1,it's[${x}]"


def test_demo_pretrains_then_compares_transfer_with_scratch(ray_session, mlflow_uri, tmp_path,
                                                            capsys, monkeypatch):
    """Run as `make demo` does, with a relative --out: Ray Train moves its workers to their own
    working directories, so this catches a path that only the driver can resolve. The folder's
    name holds what Hydra's grammar and OmegaConf's interpolation would parse."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    name = f"demo-{uuid.uuid4().hex[:8]}"
    rc = demo.main([
        "--out", OUT, "--train-clips", "4", "--val-clips", "2", "--workers", "1",
        "--steps", "2", "--transfer-epochs", "1",
        f"tracking.uri={mlflow_uri}", f"tracking.experiment={name}",
        f"downstream.experiment={name}-transfer", "train.batch_size=2",
        "train.checkpoint_every=2", "train.val_every=2", "downstream.batch_size=2",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    import ray

    assert ray.is_initialized()  # the session's Ray, up before the demo, is left up

    assert re.search(r"\[avsa demo\] val/avsa_acc [01]\.\d{3} against chance 0\.250", out), out
    m = re.search(r"AVSA-Bin test/acc .*: pretrained ([01]\.\d{3}), scratch ([01]\.\d{3})", out)
    assert m, out
    assert (tmp_path / OUT / "shards" / "train" / "manifest.json").is_file()
    assert (tmp_path / OUT / "shards" / "val" / "manifest.json").is_file()
    assert list((tmp_path / OUT / "runs").glob("*/checkpoint-00000002"))
    # clips written at the size and rate the preset reads: more would only cost decoding
    data = compose(["experiment=demo_local"]).data
    video = media.probe(next((tmp_path / OUT / "clips" / "train").glob("*.mp4"))).video
    assert (video.width, video.height) == (2 * data.equirect_height, data.equirect_height)
    assert video.fps == pytest.approx(data.fps)

    client = MlflowClient(mlflow_uri)
    [pre] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert pre.info.status == "FINISHED"
    assert 0.0 <= pre.data.metrics["val/avsa_acc"] <= 1.0
    transfers = client.search_runs([client.get_experiment_by_name(f"{name}-transfer")
                                   .experiment_id])
    assert {r.info.status for r in transfers} == {"FINISHED"}
    by_ref = {r.data.tags["avsa.pretrain_run_id"]: r for r in transfers}
    assert set(by_ref) == {pre.info.run_id, "scratch"}
    shown = {"pretrained": float(m.group(1)), "scratch": float(m.group(2))}
    assert round(by_ref[pre.info.run_id].data.metrics["test/acc"], 3) == shown["pretrained"]
    assert round(by_ref["scratch"].data.metrics["test/acc"], 3) == shown["scratch"]
    exp_id = client.get_experiment_by_name(name).experiment_id
    assert f"\n  open {mlflow_uri}/#/experiments/{exp_id}?workflowType=" in out, out
    assert "--backend-store-uri" not in out  # `mlflow ui` serves local stores, not a server's


def test_a_local_store_is_opened_with_the_mlflow_beside_this_python(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command, page = demo.where_to_look(uri, "nope")
    [mlflow_exe] = re.findall(r"^ +(\S+) ui --backend-store-uri " + re.escape(uri) + "$", command)
    assert Path(mlflow_exe).is_file() or shutil.which(mlflow_exe), mlflow_exe
    assert page == "  then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"


def test_a_bad_override_fails_before_any_clip_is_written(tmp_path):
    from avsa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.fps"):
        demo.main(["--out", str(tmp_path / "demo"), "data.fps=-1"])
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "--steps and --transfer-epochs must be >= 1"),
    (["--train-clips", "0"], "--train-clips, --val-clips"),
    (["--seconds", "-1"], "--seconds must be at least data.audio_seconds (1 s)"),
    (["--seconds", "0.5"], "shorter clips would be padded with silence"),
    (["--train-clips", "4"], "--train-clips must be at least train.batch_size (8)"),
    (["--train-clips", "2", "train.batch_size=4"], "at least train.batch_size (4)"),
])
def test_bad_numbers_fail_before_any_clip_is_written(args, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "demo"), *args])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_checks_the_tracking_server_before_synthesising(tmp_path):
    from mlflowserver import free_port

    from avsa.errors import TrackingError

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"^{down}: MLflow tracking server unreachable"):
        demo.main(["--out", str(tmp_path / "demo"), "--train-clips", "8", "--val-clips", "2",
                   f"tracking.uri={down}"])
    assert not (tmp_path / "demo").exists()
