"""docs/cluster.md, command by command: what can run without a Kubernetes cluster runs here (the
job commands' runtime-env files exist, `helm install` renders with its flags, every
`kubectl apply -k` builds one job, `avsa submit` prints a RayJob the KubeRay CRD accepts).
The job commands' overrides are checked with every other doc's in tests/test_doc_drift.py;
the single-node steps run for real in tests/test_jobs.py."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from crd import RAYJOB_CRD, needs_crds, validate_spec

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "cluster.md").read_text()
PLACEHOLDERS = {"RUN_ID": "scratch", "$task": "avc_bin", "REGISTRY": "registry.example"}


def commands() -> list[str]:
    """Shell commands of the ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC, re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                for name, value in PLACEHOLDERS.items():
                    line = line.replace(name, value)
                out.append(line)
    return out


def argv_after(cmd: str, marker: str) -> list[str]:
    words = shlex.split(cmd.split(" | ")[0])
    return words[words.index(marker) + 1:]


def test_runtime_env_files_exist():
    submits = [c for c in commands() if "ray job submit" in c and "--runtime-env" in c]
    assert submits
    for cmd in submits:
        assert (REPO / argv_after(cmd, "--runtime-env")[0]).is_file(), cmd


def test_helm_install_renders_with_its_flags():
    (cmd,) = [c for c in commands() if c.startswith("helm install avsa ")]
    words = shlex.split(cmd)
    values: dict = {}
    for flag, value in itertools.pairwise(words):
        if flag == "--set":
            key, _, val = value.partition("=")
            node = values
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = val
    with helm.Chart.load(REPO / "helm" / "avsa") as chart:
        out = chart.render(values, name=words[2], namespace=words[words.index("-n") + 1])
    docs = [d for p, t in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert rc["metadata"]["name"] == "avsa"  # the Secret the token command reads
    token_cmd = next(c for c in commands() if "auth_token" in c)
    assert f"get secret {rc['metadata']['name']} " in token_cmd
    images = {c["image"] for g in rc["spec"]["workerGroupSpecs"]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"registry.example/avsa:0.1.0", "registry.example/avsa:0.1.0-gpu"}
    for preset in re.findall(r"helm/avsa/ci/[\w-]+\.yaml|[\w-]+-values\.yaml", DOC):
        assert (REPO / "helm/avsa/ci" / Path(preset).name).is_file(), preset


def test_every_kubectl_apply_builds_one_job():
    from test_k8s import build

    applied = [argv_after(c, "-k")[0] for c in commands() if "kubectl apply -k" in c]
    assert applied
    for path in applied:
        jobs = [d for d in build(REPO / path) if d["kind"] == "RayJob"]
        assert len(jobs) == 1, path


@needs_crds
def test_avsa_submit_prints_a_valid_rayjob():
    (cmd,) = [c for c in commands() if c.startswith("avsa submit ")]
    res = subprocess.run([sys.executable, "-m", "avsa.cluster", *argv_after(cmd, "submit")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load(res.stdout)
    validate_spec(job, RAYJOB_CRD)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "avsa-env"}} in head["envFrom"]


def test_single_node_steps_are_the_ones_the_job_tests_run():
    cmds = commands()
    assert "ray get-auth-token --generate" in cmds
    assert "ray start --head --num-cpus=2" in cmds
    assert "export RAY_AUTH_MODE=token" in cmds
    tests = (REPO / "tests" / "test_jobs.py").read_text()
    assert '"get-auth-token", "--generate"' in tests and "HEAD_CPUS = 2" in tests


def test_avsa_compare_runs():
    res = subprocess.run([sys.executable, "-m", "avsa.cli", "compare", "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "usage: avsa compare" in res.stdout
