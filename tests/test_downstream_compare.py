"""`avsa compare`: the table from MLflow runs (seeds pooled per cell, with bootstrap intervals),
its files, and the bench script's arguments."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflowserver import free_port

from avsa import cli, tracking
from avsa.downstream import compare
from avsa.errors import ConfigError, TrackingError
from avsa.tracking.client import HTTP_DEFAULTS

REPO = Path(__file__).resolve().parent.parent


def rec(pretext, task, metrics, t, context=None, seed=None, examples=None, mode=None):
    return compare.RunRecord(f"{pretext}{task}{t}", pretext, task, context, t, metrics, seed,
                             examples, mode=mode)


def mean(table, pretext, label):
    c = table.cells[pretext][label]
    return None if c is None else c.mean


def interval(table, pretext, label):
    c = table.cells[pretext][label]
    return None if c.lo is None else (c.lo, c.hi)


def test_table_takes_the_latest_run_per_cell_and_orders_pretexts():
    table = compare.build_table([
        rec("avsa", "avc_bin", {"test/acc": 0.7}, 1),
        rec("avsa", "avc_bin", {"test/acc": 0.8}, 3),
        rec("avsa", "avc_bin", {"test/acc": 0.1}, 2),
        rec("scratch", "segmentation", {"test/miou": 0.2}, 1, "audio"),
        rec("scratch", "segmentation", {"test/miou": 0.3}, 1, "context"),
        rec("my_pretext", "action", {"test/clip_acc": 0.5, "test/video_acc": 0.75}, 1),
        rec("avc", "avsa_bin", {"test/acc": float("nan")}, 1),
        rec("avts", "avsa_bin", {"test/acc": 0.6, "test/clip_acc": 0.9}, 1),
    ])
    assert table.rows == ["scratch", "avc", "avts", "avsa", "my_pretext"]
    assert mean(table, "avsa", "AVC-Bin acc") == 0.8
    assert mean(table, "scratch", "Seg mIoU (+audio)") == 0.2
    assert mean(table, "scratch", "Seg mIoU (+context)") == 0.3
    assert mean(table, "scratch", "Seg mIoU (video)") is None
    assert mean(table, "my_pretext", "Action video@1") == 0.75
    assert mean(table, "avc", "AVSA-Bin acc") is None
    assert mean(table, "avts", "AVSA-Bin clip acc") == 0.9
    assert mean(table, "avts", "AVSA-Bin acc") == 0.6
    md = table.to_markdown().splitlines()
    assert md[0].startswith("| pretext | AVC-Bin acc | AVSA-Bin acc | AVC-Bin clip acc | "
                            "AVSA-Bin clip acc | Action clip@1 |")
    assert md[5] == "| avsa | 80.0 | – | – | – | – | – | – | – | – | – | – | – |"


def test_seeds_pool_into_one_cell_with_a_bootstrap_interval():
    hits = [np.array([1, 1, 0, 1] * 25), np.array([1, 0, 0, 1] * 25)]
    table = compare.build_table([
        rec("avsa", "avsa_bin", {"test/acc": 0.75}, 1, seed="0", examples={"acc": hits[0]}),
        rec("avsa", "avsa_bin", {"test/acc": 0.1}, 2, seed="1", examples={"acc": hits[1]}),
        rec("avsa", "avsa_bin", {"test/acc": 0.5}, 3, seed="1", examples={"acc": hits[1]}),
        rec("avc", "avsa_bin", {"test/acc": 0.6}, 1, seed="0"),  # no per-example results
    ])
    assert mean(table, "avsa", "AVSA-Bin acc") == pytest.approx(0.625)  # seed 1's rerun wins
    assert table.cells["avsa"]["AVSA-Bin acc"].n_runs == 2
    lo, hi = interval(table, "avsa", "AVSA-Bin acc")
    assert lo < 0.625 < hi
    assert interval(table, "avc", "AVSA-Bin acc") is None and mean(table, "avc", "AVSA-Bin acc") == 0.6
    md = table.to_markdown()
    assert f"| avsa | – | 62.5 [{100 * lo:.1f}, {100 * hi:.1f}] |" in md
    assert "| avc | – | 60.0 |" in md
    rows = {r["pretext"]: r for r in csv.DictReader(io.StringIO(table.to_csv()))}
    assert float(rows["avsa"]["AVSA-Bin acc lo"]) == pytest.approx(lo, abs=1e-6)
    assert rows["avsa"]["AVSA-Bin acc n_runs"] == "2" and rows["avc"]["AVSA-Bin acc hi"] == ""


def test_segmentation_intervals_resample_per_crop_confusions():
    confs = np.stack([np.array([[8, 1], [1, 2]]), np.array([[9, 0], [2, 1]])] * 20)
    table = compare.build_table([rec("scratch", "segmentation", {"test/miou": 0.6,
                                     "test/miou_fg": 0.4}, 1, "video", "0",
                                     {"confusion": confs})])
    lo, hi = interval(table, "scratch", "Seg mIoU-fg (video)")
    assert 0 <= lo < hi <= 1
    assert interval(table, "scratch", "Seg mIoU (video)") is not None


def test_action_modes_get_a_column_each_and_never_pool():
    runs = [rec("avsa", "action", {"test/clip_acc": 0.4}, 1, seed="0", mode="linear"),
            rec("avsa", "action", {"test/clip_acc": 0.8}, 2, seed="0", mode="finetune"),
            rec("avc", "action", {"test/clip_acc": 0.5}, 3, seed="0", mode="linear")]
    table = compare.build_table(runs)
    # a finetune run of seed 0 is no rerun of the linear one
    assert mean(table, "avsa", "Action clip@1 (linear)") == 0.4
    assert mean(table, "avsa", "Action clip@1 (finetune)") == 0.8
    assert mean(table, "avc", "Action clip@1 (finetune)") is None
    assert "Action clip@1" not in table.cells["avsa"]
    one = compare.build_table(runs[:1] + runs[2:])
    assert mean(one, "avsa", "Action clip@1") == 0.4  # one mode: the column keeps its name
    assert [c.label for c in one.columns] == [c.label for c in compare.COLUMNS]


def test_intervals_resample_a_videos_windows_together():
    # 40 videos of 5 windows, each video's windows all hit or all missed
    hits = np.repeat(np.array([1, 0, 1, 1] * 10), 5)
    unit = np.repeat(np.arange(40), 5)
    width = {}
    for name, examples in (("rows", {"clip_acc": hits}),
                           ("videos", {"clip_acc": hits, "clip_acc_unit": unit})):
        table = compare.build_table([rec("avsa", "action", {"test/clip_acc": 0.75}, 1,
                                         seed="0", examples=examples, mode="linear")])
        lo, hi = interval(table, "avsa", "Action clip@1")
        width[name] = hi - lo
    assert width["videos"] / width["rows"] == pytest.approx(5 ** 0.5, rel=0.2)


def _log(uri, experiment, pretext, task, metrics, *, context="", kind="transfer",
         status="FINISHED", seed=None, examples=None, tmp=None, tags=(), params=None):
    tags = {tracking.KIND: kind, tracking.TASK: task, tracking.PRETRAIN_RUN: "x",
            "avsa.pretext": pretext, "avsa.context": context, **dict(tags)}
    if seed is not None:
        tags["avsa.seed"] = seed
    logger = tracking.RunLogger.start(uri, experiment, f"{task}-{pretext}", tags=tags,
                                      params=params)
    logger.log_metrics(metrics, step=1)
    if examples is not None:
        path = Path(tmp) / f"{uuid.uuid4().hex}" / "test_examples.npz"
        path.parent.mkdir()
        np.savez_compressed(path, **examples)
        logger.log_artifact(path)
    logger.end(status)
    time.sleep(0.02)  # distinct start times


def test_compare_command_reads_mlflow_and_writes_the_table(mlflow_uri, tmp_path, capsys,
                                                           monkeypatch):
    exp = f"compare-{uuid.uuid4().hex[:8]}"
    _log(mlflow_uri, exp, "scratch", "avc_bin", {"test/acc": 0.5})
    _log(mlflow_uri, exp, "scratch", "avc_bin", {"test/acc": 0.625})
    _log(mlflow_uri, exp, "scratch", "avc_bin", {"test/acc": 0.99}, status="FAILED")
    _log(mlflow_uri, exp, "avsa_cur", "action", {"test/clip_acc": 0.4, "test/video_acc": 0.5})
    _log(mlflow_uri, exp, "avc", "segmentation", {"test/miou": 0.25}, context="video")
    _log(mlflow_uri, exp, "avc", "segmentation", {"test/miou": 0.375}, context="context")
    _log(mlflow_uri, exp, "avts", "avc_bin", {"test/acc": 0.9}, kind="pretrain")
    for seed, acc in (("0", 0.7), ("1", 0.8)):
        _log(mlflow_uri, exp, "avsa", "avsa_bin", {"test/acc": acc}, seed=seed, tmp=tmp_path,
             examples={"acc": (np.arange(100) < 100 * acc).astype(np.uint8)})

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    assert cli.main(["compare", "--experiment", exp, "--tracking-uri", mlflow_uri,
                     "--out", str(tmp_path)]) == 0
    printed, err = capsys.readouterr()
    assert "Downloading artifacts" not in err  # MLflow's bar for each run's examples
    md = (tmp_path / "comparison.md").read_text()
    assert md in printed
    assert "| scratch | 62.5 | – |" in md
    assert "| avsa_cur | – | – | – | – | 40.0 | 50.0 | – | – | – | – | – | – |" in md
    assert "| avc | – | – | – | – | – | – | 25.0 | – | 37.5 | – | – | – |" in md
    assert "avts" not in md  # a pretraining run is not a transfer
    rows = {r["pretext"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert list(rows) == ["scratch", "avc", "avsa", "avsa_cur"]
    assert float(rows["scratch"]["AVC-Bin acc"]) == 0.625
    assert rows["avc"]["Seg mIoU (+audio)"] == ""
    avsa = rows["avsa"]  # two seeds, each with its per-example hits stored
    assert float(avsa["AVSA-Bin acc"]) == pytest.approx(0.75) and avsa["AVSA-Bin acc n_runs"] == "2"
    assert float(avsa["AVSA-Bin acc lo"]) < 0.75 < float(avsa["AVSA-Bin acc hi"])
    assert "| avsa | – | 75.0 [" in md
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_reads_each_action_runs_mode(mlflow_uri):
    exp = f"compare-{uuid.uuid4().hex[:8]}"
    _log(mlflow_uri, exp, "avsa", "action", {"test/clip_acc": 0.4}, seed="0",
         tags={"avsa.mode": "linear"})
    _log(mlflow_uri, exp, "avsa", "action", {"test/clip_acc": 0.8}, seed="0",
         tags={"avsa.mode": "finetune"})
    _log(mlflow_uri, exp, "avc", "action", {"test/clip_acc": 0.3}, seed="0",
         params={"downstream.mode": "frozen"})  # logged without the tag: the param counts
    _log(mlflow_uri, exp, "avc", "avc_bin", {"test/acc": 0.6}, seed="0",
         tags={"avsa.mode": ""}, params={"downstream.mode": "linear"})
    records = compare.fetch_records(mlflow_uri, exp, with_examples=False)
    assert sorted((r.pretext, r.task, r.mode) for r in records) == [
        ("avc", "action", "frozen"), ("avc", "avc_bin", None),
        ("avsa", "action", "finetune"), ("avsa", "action", "linear")]
    table = compare.build_table(records)
    assert mean(table, "avsa", "Action clip@1 (linear)") == 0.4
    assert mean(table, "avsa", "Action clip@1 (finetune)") == 0.8
    assert mean(table, "avc", "Action clip@1 (frozen)") == 0.3


@pytest.mark.timeout(60)  # MLflow's own HTTP defaults retry a dead server for minutes
def test_compare_fails_at_once_on_a_dead_server_and_creates_no_store(tmp_path, monkeypatch):
    for name in HTTP_DEFAULTS:  # as in a fresh `avsa compare` process
        monkeypatch.delenv(name, raising=False)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"^{down}: MLflow tracking server unreachable"):
        compare.main(["--tracking-uri", down, "--out", str(tmp_path / "out")])
    db = tmp_path / "mlruns" / "mlflow.db"
    with pytest.raises(TrackingError, match=f"^sqlite:///{db}: no MLflow store here"):
        compare.main(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")])
    assert not db.parent.exists()


def test_reproduce_checks_the_tracking_server_before_making_data(tmp_path):
    from avsa import reproduce

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"^{down}: MLflow tracking server unreachable"):
        reproduce.main(["--out", str(tmp_path), "--tracking-uri", down, "--clips", "8",
                        "--test-clips", "2", "--action-clips", "8", "--seconds", "2"])
    assert list(tmp_path.iterdir()) == []


def test_reproduce_reads_its_tables_where_a_tracking_uri_override_sends_its_runs(tmp_path):
    """`tracking.uri=` sends every pretraining and cell there: the tables must be read there
    too (they were read from --out's store, and the command failed after all its work)."""
    from avsa import reproduce

    down = f"http://127.0.0.1:{free_port()}"
    small = ["--out", str(tmp_path), "--clips", "8", "--test-clips", "2", "--action-clips", "8"]
    with pytest.raises(ConfigError, match=r"tracking\.uri: .* differs from --tracking-uri"):
        reproduce.main([*small, "--tracking-uri", f"{down}0", f"tracking.uri={down}"])
    with pytest.raises(TrackingError, match=f"^{down}: MLflow tracking server unreachable"):
        reproduce.main([*small, f"tracking.uri={down}"])
    assert list(tmp_path.iterdir()) == []


def test_compare_names_a_missing_experiment(mlflow_uri, tmp_path):
    with pytest.raises(TrackingError, match="no experiment 'nope-"):
        compare.main(["--experiment", f"nope-{uuid.uuid4().hex[:6]}", "--tracking-uri",
                      mlflow_uri, "--out", str(tmp_path)])


def test_reproduce_plans_every_table_with_equal_pairs_per_step():
    from avsa import reproduce

    args = reproduce.parse_args(["--clips", "16", "--steps", "50", "--out", "/tmp/x",
                                 "--viewpoints", "1,4,8", "train.lr=1e-3"])
    assert (args.clips, args.steps, args.out, args.overrides) == (16, 50, Path("/tmp/x"),
                                                                  ["train.lr=1e-3"])
    tables = {t.name: t for t in reproduce.plan(args, batch=8, v=4)}
    assert list(tables) == ["pretext", "viewpoints", "audio"]
    rows = {("scratch" if v is None else v.row): v for v in tables["pretext"].rows}
    assert list(rows) == ["scratch", "avc", "avts", "avsa", "avsa_cur"]
    for base in ("avc", "avts"):  # one viewpoint, 4 x the clips: the same pairs per step
        assert {"data.num_viewpoints=1", "train.batch_size=32"} <= set(rows[base].overrides)
    assert "train.curriculum_avc_steps=25" in rows["avsa_cur"].overrides
    assert sum(task == "segmentation" for task, _ in tables["pretext"].transfers) == 3
    assert [v.row for v in tables["viewpoints"].rows] == ["avsa-v1", "avsa", "avsa-v8"]
    audio = [(v.row, v.data) for v in tables["audio"].rows]
    assert audio == [("logmel", "dry"), ("intensity", "dry"), ("intensity-rt60", "wet")]
    few = reproduce.plan(reproduce.parse_args(["--tables", "pretext", "--pretexts", "avsa,avc",
                                               "--binary-only"]), batch=8, v=4)
    assert [None if v is None else v.row for v in few[0].rows] == [None, "avc", "avsa"]
    assert sorted(task for task, _ in few[0].transfers) == ["avc_bin", "avsa_bin"]
    assert few[0].columns == reproduce.BIN_COLUMNS
    act = reproduce.plan(reproduce.parse_args(["--tables", "pretext", "--tasks", "action"]),
                         batch=8, v=4)[0]
    assert act.transfers == [("action", ["downstream.mode=linear"])]
    assert {c.task for c in act.columns} == {"action"} and len(act.rows) == 5
    for bad in (["--clips", "3"], ["--tables", "pretext,nope"], ["--viewpoints", "0,2"],
                ["--pretrain-seeds", "0"], ["--pretexts", "avsa,mae"], ["--tasks", "seg"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)


def test_reproduce_pools_head_seeds_over_pretraining_seeds():
    from avsa import reproduce

    table = reproduce.Table("t", (), [("avsa_bin", []), ("segmentation", ["x=1"])],
                            [None, reproduce.Variant("avsa")])
    one = reproduce.cell_jobs(table, 2, 1, {"avsa": ["run0"]})
    # one pretraining: the seeds are the head seeds, as cells logged before the flag are keyed
    assert [(r, t, s, p) for r, t, _, s, p, _ in one] == [
        ("scratch", "avsa_bin", 0, "scratch"), ("scratch", "avsa_bin", 1, "scratch"),
        ("scratch", "segmentation", 0, "scratch"), ("scratch", "segmentation", 1, "scratch"),
        ("avsa", "avsa_bin", 0, "run0"), ("avsa", "avsa_bin", 1, "run0"),
        ("avsa", "segmentation", 0, "run0"), ("avsa", "segmentation", 1, "run0")]
    two = reproduce.cell_jobs(table, 2, 2, {"avsa": ["run0", "run1"]})
    avsa_bin = [(s, p) for r, t, _, s, p, _ in two if (r, t) == ("avsa", "avsa_bin")]
    assert avsa_bin == [(0, "run0"), (1, "run0"), (2, "run1"), (3, "run1")]
    assert len(two) == 16
    wet = reproduce.Table("w", (), [("action", []), ("avc_bin", [])],
                          [None, reproduce.Variant("r", (), "wet")])
    assert [(r, t, d) for r, t, _, s, _, d in reproduce.cell_jobs(wet, 1, 1, {"r": ["x"]})] == [
        ("scratch", "action", "action"), ("scratch", "avc_bin", "dry"),
        ("r", "action", "action"), ("r", "avc_bin", "wet")]

    args = reproduce.parse_args(["--pretrain-seeds", "2", "--tables", "pretext,audio"])
    tables = reproduce.plan(args, batch=8, v=4)
    configs = reproduce.pretrain_configs(args, tables, {"dry": ("d/tr", "d/te"),
                                                        "wet": ("w/tr", "w/te")}, "sqlite:///x")
    names = {}
    for row, cfg in configs:
        names.setdefault(row, []).append(cfg.storage.run_name)
    assert [cfg.train.seed for row, cfg in configs if row == "avsa"] == [0, 1]
    assert all(len(set(n)) == 2 for n in names.values())  # each seed its own run
    assert names["intensity"] == names["avsa"]  # the preset's input: the same two runs
    assert len({n for ns in names.values() for n in ns}) == 2 * (len(names) - 1)
    assert {cfg.train.num_workers for _, cfg in configs} == {1}  # --train-workers' default
    mine = reproduce.parse_args(["--tables", "viewpoints", "train.num_workers=2"])
    (row, cfg), *_ = reproduce.pretrain_configs(mine, reproduce.plan(mine, batch=8, v=4),
                                                {"dry": ("d/tr", "d/te")}, "sqlite:///x")
    assert cfg.train.num_workers == 2  # an override for every run wins


def test_reproduce_synthesises_clips_at_the_size_and_rate_the_preset_reads(tmp_path):
    """384x192 at 16 fps would only cost decoding: the pipeline resizes to the preset's
    equirect size and picks frames at its rate. --classes-per-clip reaches the scenes, not the
    single-class action clips."""
    from avsa import media, reproduce
    from avsa.config import compose

    args = reproduce.parse_args(["--out", str(tmp_path), "--clips", "8", "--test-clips", "2",
                                 "--action-clips", "8", "--seconds", "1", "--workers", "1",
                                 "--tables", "pretext", "--binary-only", "--classes-per-clip", "2"])
    data = compose([reproduce.PRESET]).data
    sets = reproduce.make_data(args, reproduce.plan(args, batch=8, v=4), data)
    assert sorted(sets) == ["action", "dry"]  # no reverberant rows asked for
    for name in sets:
        (clip, *_) = sorted((tmp_path / "data" / name / "clips" / "test").glob("*.mp4"))
        video = media.probe(clip).video
        assert (video.width, video.height) == (2 * data.equirect_height, data.equirect_height)
        assert video.fps == pytest.approx(data.fps)
        kinds = {len(json.loads(p.read_text())["classes"])
                 for p in (tmp_path / "data" / name / "clips" / "train").glob("*.json")}
        assert kinds == ({2} if name == "dry" else {1}), (name, kinds)


def test_reproduce_skips_exactly_the_cells_mlflow_holds(mlflow_uri):
    """A cell is done when a finished run has its whole transfer config: the pretraining, the
    seeds and every override. Scratch cells carry no pretraining to tell invocations apart."""
    from avsa import reproduce
    from avsa.config import config_digest

    def digests(*argv):
        args = reproduce.parse_args(["--tables", "pretext", "--binary-only", "--seeds", "1",
                                     "--pretexts", "avsa", *argv])
        (table,) = reproduce.plan(args, batch=8, v=4)
        return [config_digest(cfg, transfer=True) for _, cfg in reproduce.transfer_configs(
            args, table, {"dry": ("d/tr", "d/te")}, {"avsa": ["run0"]}, mlflow_uri)
            if cfg.downstream.pretrain in ("scratch", "run0")]

    base = digests()
    assert len(base) == len(set(base)) == 2 * 2  # (scratch, avsa) x 2 tasks
    assert digests() == base  # the same invocation, the same cells
    for other in (["downstream.epochs=7"], ["--seed", "1"]):
        assert not set(digests(*other)) & set(base), other
    # training settings reach a cell only through its pretraining's reference
    assert digests("--train-workers", "2") == base

    exp = f"reproduce-{uuid.uuid4().hex[:8]}"
    for i, status in enumerate(("FINISHED", "FAILED")):
        tags = {tracking.KIND: "transfer", tracking.TASK: "avc_bin", "avsa.config": base[i]}
        logger = tracking.RunLogger.start(mlflow_uri, exp, "avc_bin", tags=tags)
        logger.end(status)
    assert reproduce.done_configs(mlflow_uri, exp) == {base[0]}  # a failed run is no cell
    assert reproduce.done_configs(mlflow_uri, f"{exp}-none") == set()


def test_reproduce_takes_a_finished_pretraining_from_mlflow_without_running_it(mlflow_uri):
    from avsa.config import compose
    from avsa.train.driver import finished_run

    exp = f"reproduce-pretrain-{uuid.uuid4().hex[:8]}"
    cfg = compose(["experiment=demo_local", f"tracking.experiment={exp}",
                   "storage.path=/runs", "storage.run_name=reproduce-avsa-x"])
    assert finished_run(cfg, mlflow_uri) is None  # no such experiment yet
    here = {tracking.RUN_URI: "/runs/reproduce-avsa-x"}
    for status, tags in (("KILLED", {tracking.CHECKPOINT: "/runs/a/checkpoint-1", **here}),
                         ("FINISHED", here),  # interrupted; ended without a checkpoint
                         ("FINISHED", {tracking.CHECKPOINT: "/old/reproduce-avsa-x/c",
                                       tracking.RUN_URI: "/old/reproduce-avsa-x"})):  # elsewhere
        logger = tracking.RunLogger.start(mlflow_uri, exp, "reproduce-avsa-x", tags=tags)
        logger.end(status)
        time.sleep(0.02)
        assert finished_run(cfg, mlflow_uri) is None
    logger = tracking.RunLogger.start(mlflow_uri, exp, "reproduce-avsa-x",
                                      tags={tracking.CHECKPOINT: "/runs/b/checkpoint-300", **here})
    logger.log_metrics({"val/avsa_acc": 0.75}, step=300)
    logger.end("FINISHED")
    res = finished_run(cfg, mlflow_uri)
    assert (res.run_id, res.checkpoint_uri) == (logger.run_id, "/runs/b/checkpoint-300")
    assert res.run_uri == "/runs/reproduce-avsa-x" and res.metrics["val/avsa_acc"] == 0.75
