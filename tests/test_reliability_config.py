"""Bad overrides on the command line: `avsa pretrain` / `avsa sweep` exit with status 2 and one
stderr line naming the key and what it accepts, before MLflow or Ray is touched."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from avsa import cli
from avsa.train import driver, ray_setup

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent

# (command, override, text the one error line must hold: the key and the allowed range/type)
CASES = [
    ("pretrain", "data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64], got 0"),
    ("pretrain", "loss.temperature=-0.1", "loss.temperature: must be in (0, 10], got -0.1"),
    ("pretrain", "loss.temperature=0", "loss.temperature: must be in (0, 10], got 0.0"),
    ("pretrain", "data.fov_max_deg=200", "data.fov_max_deg: must be in [25, 179], got 200.0"),
    ("pretrain", "data.fov_min_deg=181", "data.fov_min_deg: must be in [1, 179], got 181.0"),
    ("pretrain", "data.fov_max_deg=179.5", "data.fov_max_deg: must be in [25, 179], got 179.5"),
    ("pretrain", "data.aspect_min=0.01", "data.aspect_min: must be in [0.1, 10], got 0.01"),
    ("pretrain", "data.el_max_deg=95", "data.el_max_deg: must be in [-30.6, 90], got 95.0"),
    ("pretrain", "train.batch_size=0", "train.batch_size: must be in [1, 1e+06], got 0"),
    ("pretrain", "loss.kind=avx", "loss.kind: must be one of ('avsa', 'avc', 'avts'), got 'avx'"),
    ("pretrain", "data.num_viewpoints=abc",
     "data.num_viewpoints: Value 'abc' of type 'str' could not be converted to Integer"),
    ("pretrain", "train.max_steps=",
     "train.max_steps: Value '' of type 'str' could not be converted to Integer"),
    ("pretrain", "data.nosuch=1", "data.nosuch: Key 'nosuch' not in 'DataConfig'"),
    ("pretrain", "data=nosuch", "Could not find 'data/nosuch' — Available options in 'data': "
                                "default, paper, synthetic_small"),
    ("sweep", "data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64], got 0"),
    ("sweep", "sweep.space.loss.temperature=[0.07,-1]",
     "loss.temperature: must be in (0, 10], got -1"),
    ("sweep", "data.fov_max_deg=180", "data.fov_max_deg: must be in [25, 179], got 180.0"),
    ("sweep", "sweep.space.loss.temperature={distribution:loguniform,low:0.01,high:0.1}",
     "sweep.space.loss.temperature: Cannot merge DictConfig with ListConfig; to turn a list "
     "into a distribution or back, drop the key first: '~sweep.space.loss.temperature'"),
    # keys added with + or ++ are checked against the schema like any other
    ("pretrain", "+trian.max_steps=5", "trian: no such key in the config; did you mean train?"),
    ("pretrain", "++train.max_stepz=5",
     "train.max_stepz: no such key in 'train'; did you mean train.max_steps?"),
    ("pretrain", "+data.zzz=1", "data.zzz: no such key in 'data' (a typo? `+`/`++` add keys"),
    # a mistyped key names the nearest one
    ("pretrain", "train.max_step=3",
     "train.max_step: Key 'max_step' not in 'TrainConfig'; did you mean train.max_steps?"),
    ("sweep", "loss.temprature=0.1", "; did you mean loss.temperature?"),
    ("pretrain", "dat.fps=8", "dat: Key 'dat' not in 'Config'; did you mean data?"),
    ("sweep", "+sweep.space.train.lr=[0.1,0.2] ++data.seedz=1",
     "data.seedz: no such key in 'data'; did you mean data.seed?"),
    # the run name is one safe path segment
    ("pretrain", "storage.run_name=../escaped", "storage.run_name: must be one path segment"),
    ("pretrain", "storage.run_name=/abs/name", "storage.run_name: must be one path segment"),
    ("pretrain", "storage.run_name='naïve'", "storage.run_name: must be one path segment"),
    # combinations that cannot work
    ("pretrain", "data.num_viewpoints=8 data.min_separation_deg=170",
     "data.num_viewpoints, data.min_separation_deg: 8 viewpoints 170 deg apart do not fit"),
    ("pretrain", "data.n_fft=48000", "data.n_fft: must be in [16, 24000] (the audio window"),
    ("pretrain", "model.transformer_depth=0",
     "model.transformer_depth: must be >= 1 with model.use_transformer=true"),
    ("pretrain", "data.seed=-1", "data.seed: must be in [0, 2**32), got -1"),
    ("sweep", "train.seed=-3", "train.seed: must be in [0, 2**32), got -3"),
    # command-line options where overrides go
    ("pretrain", "experiment=demo_local --max-steps 5",
     "--max-steps: not an override: give KEY=VALUE overrides"),
]


# Lines the session's shared Ray forwards from other tests' actors, e.g.
# "\x1b[36m(PlacementGroupCleaner pid=10524)\x1b[0m ...": not this command's output.
RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+(, ip=[\d.]+)?\)")


@pytest.fixture
def no_services(monkeypatch):
    """Fail loudly if a command got as far as MLflow or Ray."""

    def touched(*_a, **_k):
        raise AssertionError("a bad override reached MLflow or Ray")

    monkeypatch.setattr(driver, "start_tracking", touched)
    monkeypatch.setattr(driver, "ensure_ray", touched)  # pretrain's
    monkeypatch.setattr(ray_setup, "ensure_ray", touched)  # the sweep's


@pytest.mark.parametrize("command, override, says", CASES,
                         ids=[f"{c}-{o}" for c, o, _ in CASES])
def test_bad_value_is_one_line_naming_key_and_range(command, override, says, no_services,
                                                    capsys):
    rc = cli.main([command, *override.split()])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = [ln for ln in err.splitlines() if not RAY_FORWARDED.match(ln)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"avsa {command}: error: ")
    assert says in lines[0]
    assert ("did you mean" in lines[0]) == ("did you mean" in says)  # no far-fetched guess


@pytest.mark.parametrize("name, says", [("pretrian", "; did you mean pretrain?"),
                                        ("tranfser", "; did you mean transfer?"),
                                        ("zzz", "\n")])
def test_an_unknown_command_names_the_nearest_and_lists_them(name, says, capsys):
    assert cli.main([name, "x=1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"avsa: error: unknown command {name!r}{says}"), err
    assert "\ncommands:\n" in err


@pytest.mark.parametrize("argv", [["pretrain", "experiment=demo_local", "--help"],
                                  ["sweep", "sweep.num_samples=2", "-h"],
                                  ["transfer", "action", "pretrain=scratch", "--help"],
                                  ["config", "data.seed=1", "--help"]])
def test_help_after_overrides_shows_the_usage(argv, no_services, capsys):
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: avsa {argv[0]}") and "error" not in err


@pytest.mark.parametrize("name", ["run\n", "-run", "a" * 129])
def test_run_name_that_is_not_one_safe_segment_is_refused(name):
    from avsa.config import Config
    from avsa.config_checks import validate
    from avsa.errors import ConfigError

    cfg = Config()
    cfg.storage.run_name = name
    with pytest.raises(ConfigError, match=r"storage\.run_name: must be one path segment"):
        validate(cfg)
    cfg.storage.run_name = name.strip("\n-")[:128]  # "run", "a" * 128
    validate(cfg)


def _end(name: str, side: int) -> float:
    """The lowest (side 0) or highest (1) value `DataConfig.<name>`'s interval accepts."""
    from avsa.config import DataConfig
    from avsa.config_checks import INTERVAL

    field = next(f for f in dataclasses.fields(DataConfig) if f.name == name)
    lb, lo, hi, rb = INTERVAL.fullmatch(field.metadata["interval"]).groups()
    return float(hi) - (rb == ")") * 1e-6 if side else float(lo) + (lb == "(") * 1e-6


@pytest.mark.parametrize("path", [
    "/d/a=b,c", "/d/it's", "/d/[x]", "/d/${HOME}", "/d/back\\slash", "/d/end\\",
    "/d/q\\'x", "/d/sp ace", "/d/a\\${b}", "/d/\\\\${x}'\\", "/d/{a}:b", '/d/"dq"', "/d/$x"])
def test_a_path_reaches_the_config_exactly(path):
    """`avsa demo --out` and `avsa reproduce --out` put the folder into overrides; Hydra's
    grammar (=, commas, brackets, quotes) and OmegaConf's interpolation must not touch it, nor
    the config's round trip to the train workers, checkpoints and sweep trials."""
    from avsa.config import compose, from_dict, override
    from avsa.sweep.space import apply_params

    cfg = compose(["experiment=demo_local", override("storage.path", path)])
    assert cfg.storage.path == path
    assert from_dict(cfg.to_dict()).storage.path == path
    assert apply_params(cfg.to_dict(), {"data.shards": path}).storage.path == path
    assert apply_params(cfg.to_dict(), {"data.shards": path}).data.shards == path


def test_the_viewpoint_sampler_takes_every_value_validation_accepts():
    """A value in the config's range must not pass validation and then fail in every data
    worker: the narrowest and widest views, aspects and elevations it accepts all plan."""
    from avsa.config import DataConfig
    from avsa.config_checks import check_fields
    from avsa.data.crops import view_crops
    from avsa.data.transform import plan_sample

    for side, (fov, aspect, el) in enumerate((("fov_min_deg", "aspect_min", "el_min_deg"),
                                              ("fov_max_deg", "aspect_max", "el_max_deg"))):
        fov, aspect, el = (_end(name, side) for name in (fov, aspect, el))
        data = dataclasses.replace(DataConfig(), fov_min_deg=fov, fov_max_deg=fov,
                                   aspect_min=aspect, aspect_max=aspect, el_min_deg=el,
                                   el_max_deg=el)
        check_fields("data", data)
        vp = plan_sample("k", data, seed=0, epoch=0, duration=2.0).vp
        crops = view_crops(np.zeros((data.frames, 32, 64, 3), np.uint8), vp, 16)
        assert crops.shape[:2] == (data.num_viewpoints, 3)


def test_cli_process_fails_fast_without_starting_ray(tmp_path):
    """The real console path: a fresh interpreter, exit status 2 within seconds, one line,
    no Ray session created (RAY_TMPDIR stays empty) and no MLflow store created."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    for override, says in (("data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64]"),
                           ("data.fov_max_deg=270", "data.fov_max_deg: must be in [25, 179]")):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "avsa.cli", "pretrain", override,
                               "train.num_workers=2"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("avsa pretrain: error: "), proc.stderr
        assert says in lines[0]
        assert elapsed < 30, f"took {elapsed:.0f} s"  # imports only: about 5 s on a CI runner
    assert list(ray_tmp.iterdir()) == []
    assert not (tmp_path / "mlruns").exists()


def _manifest(root: Path, samples: int) -> Path:
    from avsa.data.manifest import Manifest, write_manifest
    from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name

    blob = pack_shard([RawSample(f"k{i}", {"mp4": b"x"}) for i in range(samples)])
    (root / shard_name(0)).parent.mkdir(parents=True, exist_ok=True)
    (root / shard_name(0)).write_bytes(blob)
    write_manifest(str(root), Manifest("train", [shard_info(shard_name(0), blob, samples)],
                                       samples))
    return root


COMMANDS = [
    ["pretrain"],
    # a sweep on a training metric needs no validation shards, and is checked the same way
    ["sweep", "data.val_shards=null", "sweep.metric=train/loss", "sweep.mode=min"],
]


@pytest.mark.parametrize("command", COMMANDS)
def test_batch_larger_than_the_data_is_refused_before_ray(command, tmp_path, no_services, capsys):
    shards = _manifest(tmp_path / "shards", 3)
    rc = cli.main([*command, f"data.shards={shards}", "train.batch_size=4",
                   f"storage.path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.batch_size: must be at most the 3 samples in data.shards, got 4" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_dead_tracking_server_is_refused_before_ray(command, tmp_path, no_services, capsys):
    from mlflowserver import free_port

    shards = _manifest(tmp_path / "shards", 3)
    down = f"http://127.0.0.1:{free_port()}"
    rc = cli.main([*command, f"data.shards={shards}", "train.batch_size=2",
                   f"storage.path={tmp_path / 'runs'}", f"tracking.uri={down}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {down}: MLflow tracking server unreachable (" in err
    assert not (tmp_path / "runs").exists()


def test_tiny_temperature_warns_once(tmp_path, no_services, caplog):
    from avsa.config_checks import temperature_warning

    assert temperature_warning(0.07) is None
    assert "logits reach 1e+09" in temperature_warning(1e-9)
    shards = _manifest(tmp_path / "shards", 3)
    with pytest.raises(AssertionError, match="reached MLflow or Ray"):
        driver.pretrain(cli_compose([f"data.shards={shards}", "loss.temperature=1e-9",
                                     "train.batch_size=2", f"storage.path={tmp_path}",
                                     f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]))
    assert caplog.text.count("loss.temperature=1e-09: logits reach 1e+09") == 1


def cli_compose(overrides):
    from avsa.config import compose

    return compose(overrides)


def test_config_masks_credentials_in_uris(capsys):
    rc = cli.main(["config", "tracking.uri=http://alice:s3cr3t@127.0.0.1:5000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "s3cr3t" not in out and "http://***@127.0.0.1:5000" in out


@pytest.mark.slow
def test_tracking_uri_with_credentials_is_accepted(mlflow_uri):
    """`user:password@` in an http URI, as MLflow's client takes it (Basic auth)."""
    from avsa import tracking

    authed = mlflow_uri.replace("http://", "http://alice:s3cr3t@")
    tracking.check_reachable(authed)
