"""Bad overrides on the command line: `avsa pretrain` / `avsa sweep` exit with status 2 and one
stderr line naming the key and what it accepts, before MLflow or Ray is touched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avsa import cli
from avsa.train import driver

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent

# (command, override, text the one error line must hold: the key and the allowed range/type)
CASES = [
    ("pretrain", "data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64], got 0"),
    ("pretrain", "loss.temperature=-0.1", "loss.temperature: must be in (0, 10], got -0.1"),
    ("pretrain", "loss.temperature=0", "loss.temperature: must be in (0, 10], got 0.0"),
    ("pretrain", "data.fov_max_deg=200", "data.fov_max_deg: must be in [25, 180), got 200.0"),
    ("pretrain", "data.fov_min_deg=181", "data.fov_min_deg: must be in (0, 180), got 181.0"),
    ("pretrain", "data.el_max_deg=95", "data.el_max_deg: must be in [-30.6, 90], got 95.0"),
    ("pretrain", "train.batch_size=0", "train.batch_size: must be in [1, 1e+06], got 0"),
    ("pretrain", "loss.kind=avx", "loss.kind: must be one of ('avsa', 'avc', 'avts'), got 'avx'"),
    ("pretrain", "data.num_viewpoints=abc",
     "data.num_viewpoints: Value 'abc' of type 'str' could not be converted to Integer"),
    ("pretrain", "train.max_steps=",
     "train.max_steps: Value '' of type 'str' could not be converted to Integer"),
    ("pretrain", "data.nosuch=1", "data.nosuch: Key 'nosuch' not in 'DataConfig'"),
    ("pretrain", "data=nosuch", "Could not find 'data/nosuch'"),
    ("sweep", "data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64], got 0"),
    ("sweep", "sweep.space.loss.temperature=[0.07,-1]",
     "loss.temperature: must be in (0, 10], got -1"),
    ("sweep", "data.fov_max_deg=180", "data.fov_max_deg: must be in [25, 180), got 180.0"),
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
    monkeypatch.setattr(driver, "ensure_ray", touched)


@pytest.mark.parametrize("command, override, says", CASES,
                         ids=[f"{c}-{o}" for c, o, _ in CASES])
def test_bad_value_is_one_line_naming_key_and_range(command, override, says, no_services,
                                                    capsys):
    rc = cli.main([command, override])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = [ln for ln in err.splitlines() if not RAY_FORWARDED.match(ln)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"avsa {command}: error: ")
    assert says in lines[0]


def test_cli_process_fails_fast_without_starting_ray(tmp_path):
    """The real console path: a fresh interpreter, exit status 2 within seconds, one line,
    no Ray session created (RAY_TMPDIR stays empty) and no MLflow store created."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    for override, says in (("data.num_viewpoints=0", "data.num_viewpoints: must be in [1, 64]"),
                           ("data.fov_max_deg=270", "data.fov_max_deg: must be in [25, 180)")):
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
