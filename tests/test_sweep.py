"""avsa.sweep: the driver, the search space and the report.

Unit tests check the space, names, table and plot with known answers. The integration tests
read the session's one real 4-trial sweep (tests/sweeprun.py) on the local Ray and `mlflow
server`: its driver (a subprocess, `python -m avsa.cli sweep`) is killed once two trials have
finished, the same command then finishes it in this process, and the tests check the MLflow
runs, the artifacts and that the finished trials were not run again.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from sweeprun import result_lines, sweep_overrides, trial_runs, trial_states

from avsa.config import compose
from avsa.errors import CheckpointError, ConfigError
from avsa.sweep import driver as sweep
from avsa.sweep import report as sweep_report
from avsa.sweep import space as sweep_space
from avsa.train import driver as train_driver

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- the space


def test_flatten_space_and_grid():
    flat = sweep_space.flatten_space({
        "data": {"num_viewpoints": [2, 4]},
        "loss": {"temperature": {"distribution": "loguniform", "low": 0.01, "high": 0.5}},
    })
    assert flat == {"data.num_viewpoints": [2, 4],
                    "loss.temperature": {"distribution": "loguniform", "low": 0.01, "high": 0.5}}
    grid = sweep_space.tune_space({"data.num_viewpoints": [2, 4, 8]}, "grid")
    assert grid == {"data.num_viewpoints": {"grid_search": [2, 4, 8]}}


def test_random_space_samples_inside_the_bounds():
    import numpy as np

    space = sweep_space.tune_space(
        {"data.num_viewpoints": [2, 4],
         "loss.temperature": {"distribution": "loguniform", "low": 0.01, "high": 0.5}}, "random")
    rng = np.random.default_rng(0)
    temps = [space["loss.temperature"].sample(random_state=rng) for _ in range(200)]
    assert all(0.01 <= t <= 0.5 for t in temps)
    assert sum(t < 0.0707 for t in temps) > 60  # log-uniform: half below the geometric mean
    assert set(space["data.num_viewpoints"].categories) == {2, 4}


@pytest.mark.parametrize("leaf, search, says", [
    ({"distribution": "uniform", "low": 0.1, "high": 0.2}, "grid", "a grid needs a list"),
    ({"distribution": "normal", "low": 0.1, "high": 0.2}, "random", "distribution must be"),
    ({"distribution": "loguniform", "low": 0.0, "high": 0.2}, "random", "low > 0"),
    ([], "grid", "non-empty list"),
    (0.07, "grid", "non-empty list"),
])
def test_bad_leaves_name_their_key(leaf, search, says):
    with pytest.raises(ConfigError, match=rf"^sweep\.space\.loss\.temperature: .*{says}"):
        sweep_space.tune_space({"loss.temperature": leaf}, search)


def test_empty_space_is_refused():
    with pytest.raises(ConfigError, match=r"^sweep\.space: no keys"):
        sweep_space.tune_space({}, "grid")


def test_apply_params_sets_and_validates():
    base = compose(["model=tiny"]).to_dict()
    cfg = sweep_space.apply_params(base, {"data.num_viewpoints": 8, "loss.temperature": 0.2})
    assert (cfg.data.num_viewpoints, cfg.loss.temperature, cfg.model.name) == (8, 0.2, "tiny")
    with pytest.raises(ConfigError, match=r"^sweep\.space\.data\.nope: 'data\.nope' is not"):
        sweep_space.apply_params(base, {"data.nope": 1})
    with pytest.raises(ConfigError, match=r"^sweep\.space\.data: 'data' is not a config value"):
        sweep_space.apply_params(base, {"data": 1})
    with pytest.raises(ConfigError, match=r"^sweep\.space\.data\.num_viewpoints: cannot take"):
        sweep_space.apply_params(base, {"data.num_viewpoints": "many"})
    with pytest.raises(ConfigError, match=r"^data\.num_viewpoints: must be in \[1, 64\], got 0"):
        sweep_space.apply_params(base, {"data.num_viewpoints": 0})


def test_check_space_tries_every_value_before_anything_starts():
    cfg = compose(["sweep.space.data.num_viewpoints=[2,4,99]"])
    with pytest.raises(ConfigError, match=r"^data\.num_viewpoints: .*got 99"):
        sweep_space.check_space(cfg, sweep_space.flatten_space(cfg.sweep.space))
    # the demo's 60 deg separation places 4 viewpoints, not the default grid's 8: the error
    # names the value of the space that brought the 8, not only the keys the check reads
    cfg = compose(["experiment=demo_local"])
    with pytest.raises(ConfigError, match=r"^data\.num_viewpoints, data\.min_separation_deg: 8 "
                                          r"viewpoints .* \(sweep\.space\.data\.num_viewpoints=8\)$"):
        sweep_space.check_space(cfg, sweep_space.flatten_space(cfg.sweep.space))


def test_check_space_refuses_a_distribution_over_an_integer_key():
    # its bounds are whole numbers, but every trial would draw a fraction
    cfg = compose(["sweep.search=random"])
    flat = {"data.num_viewpoints": {"distribution": "uniform", "low": 2, "high": 8}}
    with pytest.raises(ConfigError, match=r"^sweep\.space\.data\.num_viewpoints: a uniform draw "
                                          r"such as 4\.292 fails .* needs a list of values"):
        sweep_space.check_space(cfg, flat)
    lr = {"train.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}
    sweep_space.check_space(cfg, lr)  # a float key takes any value between


def test_command_line_overrides_the_space():
    cfg = compose(["sweep.space.data.num_viewpoints=[2,4]", "sweep.space.loss.temperature=[0.2]"])
    assert sweep_space.flatten_space(cfg.sweep.space) == {
        "data.num_viewpoints": [2, 4], "loss.temperature": [0.2]}
    default = compose([])
    assert sweep_space.flatten_space(default.sweep.space) == {
        "data.num_viewpoints": [2, 4, 8], "loss.temperature": [0.03, 0.07, 0.2]}


def test_accuracy_becomes_the_chance_normalised_score_when_viewpoints_vary():
    assert sweep_space.scheduler_metric("val/avsa_acc", ["data.num_viewpoints"]) == \
        "val/avsa_score"
    assert sweep_space.scheduler_metric("val/avsa_acc", ["loss.temperature"]) == "val/avsa_acc"
    assert sweep_space.scheduler_metric("val/loss", ["data.num_viewpoints"]) == "val/loss"


# ----------------------------------------------------------------------------- names


def test_trial_names_are_deterministic_and_distinct():
    a = sweep_space.trial_run_name("sw", {"loss.temperature": 0.07, "data.num_viewpoints": 4})
    assert a == "sw-num_viewpoints=4_temperature=0.07"
    assert a == sweep_space.trial_run_name("sw", {"data.num_viewpoints": 4,
                                                  "loss.temperature": 0.07})
    assert sweep_space.trial_run_name("sw", {"data.seed": 1, "train.seed": 2}) == \
        "sw-data.seed=1_train.seed=2"
    assert sweep_space.trial_run_name("sw", {"train.lr": 1.234567e-4}, "ab12c_00003") == \
        "sw-lr=0.0001235-ab12c_00003"
    # list values (data.color_jitter) and floats that 4 digits do not name keep distinct names
    jitter = [sweep_space.trial_run_name("sw", {"data.color_jitter": v})
              for v in ([0.12, 0.3], [0.1, 20.3], [0.4, 0.4])]
    assert len(set(jitter)) == 3 and jitter[2] == "sw-color_jitter=0.4x0.4"
    close = [sweep_space.trial_run_name("sw", {"train.lr": v}) for v in (1.00001e-3, 1.00002e-3)]
    assert close[0] != close[1] and close[0].startswith("sw-lr=0.001-")
    long = sweep_space.trial_run_name("sw", {f"data.k{i}": "x" * 20 for i in range(6)})
    assert len(long) <= 3 + 80 and long != sweep_space.trial_run_name(
        "sw", {f"data.k{i}": "y" * 20 for i in range(6)})


def test_sweep_name_follows_the_config_not_the_concurrency():
    base = ["sweep.space.data.num_viewpoints=[2,4]"]
    name = sweep_space.sweep_run_name(compose(base))
    assert name.startswith("viewpoints_temperature-")
    assert name == sweep_space.sweep_run_name(compose(base))
    assert name == sweep_space.sweep_run_name(compose([*base, "sweep.max_concurrent_trials=3"]))
    assert name != sweep_space.sweep_run_name(compose(["sweep.space.data.num_viewpoints=[2]"]))
    assert name != sweep_space.sweep_run_name(compose([*base, "train.lr=0.001"]))
    assert sweep_space.sweep_run_name(compose([*base, "storage.run_name=mine"])) == "mine"


# ----------------------------------------------------------------------------- the driver's pieces


def test_max_concurrent_counts_workers_and_a_decoding_task():
    cfg = compose(["train.num_workers=1", "train.cpus_per_worker=1", "data.decode_cpus=1"])
    assert sweep.max_concurrent(cfg, {"CPU": 4.0}) == 2
    assert sweep.max_concurrent(cfg, {"CPU": 1.0}) == 1
    gpu = compose(["train.num_workers=2", "train.use_gpu=true"])
    assert sweep.max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    fixed = compose(["sweep.max_concurrent_trials=5"])
    assert sweep.max_concurrent(fixed, {"CPU": 1.0}) == 5


def test_prepare_base_makes_paths_absolute_and_reports_on_logged_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["data.shards=rel/train", "data.val_shards=s3://b/val", "storage.path=out",
                   "train.log_every=10", "sweep.report_every=4",
                   f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    base = sweep.prepare_base(cfg)
    assert base.data.shards == str(tmp_path / "rel/train")
    assert base.data.val_shards == "s3://b/val"
    assert base.storage.path == str(tmp_path / "out")
    assert (base.train.val_every, base.train.log_every) == (4, 2)
    assert (cfg.train.val_every, cfg.train.log_every) == (0, 10)  # the input is left alone


def test_a_pinned_name_over_another_sweep_is_refused_before_ray(sweep_shards, mlflow_uri,
                                                               tmp_path):
    """Under a pinned storage.run_name, another sweep would restore the first one's Tune
    experiment and ignore its own space; like `avsa pretrain`, it is refused up front."""
    argv = [*sweep_overrides(sweep_shards, tmp_path, mlflow_uri, "pinned"), "storage.run_name=mine"]
    first = sweep.prepare_base(compose(argv))
    folder = tmp_path / "sweeps" / "mine"
    train_driver.claim_run_dir(first, str(folder), sweep=True)
    train_driver.claim_run_dir(first, str(folder), sweep=True)  # the same sweep: accepted
    other = compose([*argv, "sweep.space.loss.temperature=[0.5,1.0]"])
    with pytest.raises(CheckpointError, match=r"mine: holds the checkpoints of another config"):
        sweep.run_sweep(other)
    assert sorted(p.name for p in folder.iterdir()) == ["avsa_run.json"]  # no Tune state


def test_check_sweep_needs_validation_data():
    with pytest.raises(ConfigError, match=r"^data\.val_shards: a sweep on val/avsa_score"):
        sweep.check_sweep(compose(["data.val_shards=null"]), "val/avsa_score")
    with pytest.raises(ConfigError, match=r"^sweep\.grace_period: "):
        sweep.check_sweep(compose(["data.val_shards=v", "train.max_steps=5",
                                   "sweep.grace_period=6"]), "val/avsa_score")


# ----------------------------------------------------------------------------- the report


def _result(step, scores, error=None, **config):
    frame = pd.DataFrame({"step": list(range(1, len(scores) + 1)), "val/avsa_score": scores})
    return SimpleNamespace(
        metrics={"step": step, "trial_id": "t", "val/avsa_score": scores[-1],
                 "checkpoint_path": "/c"},
        config=config, metrics_dataframe=frame, error=error)


def test_rows_take_the_final_value_and_tell_stops_from_finishes():
    keys = ["data.num_viewpoints"]
    done = sweep_report.trial_row(_result(4, [0.1, 0.3], **{keys[0]: 2}), keys,
                                  name="a", max_steps=4, metric="val/avsa_score")
    assert done["val/avsa_score"] == 0.3 and done["status"] == "done"
    # a trial that diverged is unscored, not ranked by an earlier value of its network
    diverged = sweep_report.trial_row(_result(4, [0.9, float("nan")], **{keys[0]: 2}), keys,
                                      name="n", max_steps=4, metric="val/avsa_score")
    assert math.isnan(diverged["val/avsa_score"])
    assert sweep_report.best_row([done, diverged], "val/avsa_score", "max") is done
    assert done["data.num_viewpoints"] == 2 and done["checkpoint"] == "/c"
    stopped = sweep_report.trial_row(_result(2, [0.5], **{keys[0]: 4}), keys, name="b",
                                     max_steps=4, metric="val/avsa_score")
    assert stopped["status"] == "stopped"
    failed = sweep_report.trial_row(_result(4, [0.5], error=RuntimeError()), keys, name="c",
                                    max_steps=4, metric="val/avsa_score")
    assert failed["status"] == "error"
    # a trial that failed after validating well has no final network to call best
    assert sweep_report.best_row([done, failed], "val/avsa_score", "max") is done


def test_best_row_by_mode_skips_missing_values():
    rows = [{"trial": "a", "m": 0.2}, {"trial": "b", "m": float("nan")},
            {"trial": "c", "m": 0.5}, {"trial": "d", "m": None}]
    assert sweep_report.best_row(rows, "m", "max")["trial"] == "c"
    assert sweep_report.best_row(rows, "m", "min")["trial"] == "a"
    assert sweep_report.best_row(rows[1:2], "m", "max") is None


def _grid_rows():
    return [{"trial": f"t{v}-{t}", "trial_id": None, "status": "done",
             "data.num_viewpoints": v, "loss.temperature": t, "step": 4,
             "val/avsa_score": v * t, "val/avsa_acc": None, "run_id": "r", "checkpoint": None}
            for v in (2, 4, 8) for t in (0.07, 0.2)]


def test_csv_and_markdown(tmp_path):
    rows = _grid_rows()
    keys = ["data.num_viewpoints", "loss.temperature"]
    cols = sweep_report.columns(rows, keys, "val/avsa_score")
    assert cols == ["trial", "trial_id", "status", *keys, "step", "val/avsa_score", "run_id",
                    "checkpoint"]
    sweep_report.write_csv(rows, cols, tmp_path / "r.csv")
    back = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    assert len(back) == 6 and back[-1]["data.num_viewpoints"] == "8"
    assert float(back[-1]["val/avsa_score"]) == pytest.approx(1.6)
    best = sweep_report.best_row(rows, "val/avsa_score", "max")
    table = sweep_report.markdown(rows, cols, best).splitlines()
    assert table[0] == ("|  | trial | status | data.num_viewpoints | loss.temperature | step | "
                        "val/avsa_score |")
    starred = [ln for ln in table if ln.startswith("| * |")]
    assert starred == ["| * | t8-0.2 | done | 8 | 0.2 | 4 | 1.6 |"]


def test_a_list_valued_key_reports_and_plots(tmp_path):
    keys = ["data.color_jitter"]
    rows = [sweep_report.trial_row(_result(4, [0.1, s], **{keys[0]: j}), keys, name=f"t{i}",
                                   max_steps=4, metric="val/avsa_score")
            for i, (j, s) in enumerate((([0.4, 0.4, 0.4, 0.2], 0.3), ([0.0, 0.0, 0.0, 0.0], 0.2)))]
    sweep_report.sort_rows(rows, keys)
    assert [r[keys[0]] for r in rows] == [(0.0, 0.0, 0.0, 0.0), (0.4, 0.4, 0.4, 0.2)]
    sweep_report.plot(rows, keys[0], None, "val/avsa_score", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "| (0.4, 0.4, 0.4, 0.2) |" in sweep_report.markdown(
        rows, sweep_report.columns(rows, keys, "val/avsa_score"))


def test_rows_sort_numbers_numerically():
    rows = [{"trial": n, "data.num_viewpoints": v} for n, v in (("a", 16), ("b", 2), ("c", 4))]
    sweep_report.sort_rows(rows, ["data.num_viewpoints"])
    assert [r["trial"] for r in rows] == ["b", "c", "a"]


def test_plot_axes_prefer_viewpoints_then_temperature():
    assert sweep_report.plot_axes(["loss.temperature", "data.num_viewpoints"]) == \
        ("data.num_viewpoints", "loss.temperature")
    assert sweep_report.plot_axes(["train.lr", "loss.temperature"]) == \
        ("train.lr", "loss.temperature")
    assert sweep_report.plot_axes(["train.lr"]) == ("train.lr", None)


def test_plot_draws_one_line_per_temperature(tmp_path):
    from PIL import Image

    path = tmp_path / "p.png"
    sweep_report.plot(_grid_rows(), "data.num_viewpoints", "loss.temperature", "val/avsa_score",
                      path)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 420)


# ----------------------------------------------------------------------------- integration


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_ends_every_run_of_the_sweep_and_says_how_to_resume(interrupted_sweep):
    stopped = interrupted_sweep.stopped
    assert stopped["rc"] == 130, stopped["log"][-3000:]
    said = [line[line.index("avsa sweep: "):] for line in stopped["log"].splitlines()
            if "avsa sweep: " in line]  # one line, among Ray's progress bars and worker output
    assert len(said) == 1, stopped["log"][-3000:]
    assert said[0].startswith("avsa sweep: stopped by SIGINT"), said
    assert "to resume, run again: avsa sweep " in said[0], said
    statuses = interrupted_sweep.snapshot["statuses"]
    assert statuses[interrupted_sweep.name] == "KILLED"
    assert "RUNNING" not in statuses.values(), statuses
    assert "FINISHED" in statuses.values()  # the trials that had ended kept their end
    assert not stopped["left"], stopped["left"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the shared fixture runs a whole sweep, twice started
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(interrupted_sweep):
    r = interrupted_sweep
    assert len(r.finished) >= 2
    assert len(r.finished) < 4, "the driver was killed only after every trial had finished"
    for trial_id, lines in r.snapshot["lines"].items():
        assert result_lines(r.exp_dir, trial_id) == lines  # Tune did not run it again
    assert len(r.snapshot["runs"]) >= 2
    after = trial_runs(r.client, r.experiment)
    for name, (run_id, end_time, points) in r.snapshot["runs"].items():
        run = after[name]
        assert run.info.run_id == run_id and run.info.end_time == end_time
        assert len(r.client.get_metric_history(run_id, "train/loss")) == points
    assert list(trial_states(r.exp_dir).values()) == ["TERMINATED"] * 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_tracks_parent_children_table_plot_and_best(interrupted_sweep):
    r = interrupted_sweep
    client = r.client
    exp = client.get_experiment_by_name(r.experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`avsa.kind` = 'sweep'")
    assert [p.info.run_name for p in parents] == [r.name]  # the resumed driver reused it
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = trial_runs(client, r.experiment)
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children.values()} == {parent.info.run_id}
    assert {c.info.status for c in children.values()} == {"FINISHED"}
    assert {(c.data.params["data.num_viewpoints"], c.data.params["loss.temperature"])
            for c in children.values()} == {("2", "0.07"), ("2", "0.2"), ("4", "0.07"),
                                            ("4", "0.2")}
    for c in children.values():  # metrics as in pretraining, logged by the train loop
        history = client.get_metric_history(c.info.run_id, "val/avsa_score")
        assert {m.step for m in history} == {2, 4}

    best_id = parent.data.tags["avsa.best_run_id"]
    best = client.get_run(best_id)
    assert parent.data.tags["avsa.best_trial"] == best.info.run_name
    assert best.data.tags["avsa.best"] == "true"
    scores = {c.info.run_id: c.data.metrics["val/avsa_score"] for c in children.values()}
    assert scores[best_id] == max(scores.values())
    assert parent.data.metrics["best/val/avsa_score"] == pytest.approx(scores[best_id])

    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_results.csv", "sweep_plot.png", "config.yaml"} <= names
    local = client.download_artifacts(parent.info.run_id, "sweep_results.csv")
    table = list(csv.DictReader(Path(local).read_text().splitlines()))
    assert sorted(row["trial"] for row in table) == sorted(children)
    for row in table:
        assert row["run_id"] == children[row["trial"]].info.run_id
        assert row["status"] == "done" and row["step"] == "4"
        assert math.isclose(float(row["val/avsa_score"]), scores[row["run_id"]], rel_tol=1e-6)
        assert Path(row["checkpoint"]).is_dir()  # under the sweep's storage path
        assert str(r.exp_dir / "trials") in row["checkpoint"]
    png = Path(client.download_artifacts(parent.info.run_id, "sweep_plot.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (r.exp_dir / "sweep_results.csv").is_file()
