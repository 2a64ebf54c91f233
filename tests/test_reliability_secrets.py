"""Secrets stay secret: with AWS credentials and an MLflow token in the environment of every
process, a one-trial sweep and a tiny pretraining (checkpoints on S3) run in a fresh
interpreter with its own local Ray (started by the sweep, as `avsa sweep` does). Then every
log line (the command's output, every file of its Ray session, the MLflow server's log), every
MLflow param, tag, metric key and artifact, every object and file the runs stored, the
rendered Helm chart and an `avsa submit --dry-run` RayJob are searched for the secret values.
None may appear anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from avsa import synth
from avsa.data.shards import write_shards

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "avsa"

SCRIPT = r"""
import hashlib, json, os, sys
import ray
from avsa import cluster
from avsa.sweep import driver as sweep
from avsa.config import compose
from avsa.train.driver import pretrain

args = json.loads(sys.argv[1])
assert sweep.main(args["sweep"]) == 0  # first: the sweep starts this process's Ray
res = pretrain(compose(args["pretrain"]))
print("PRETRAIN_RUN", res.run_id, res.checkpoint_uri, flush=True)

@ray.remote
def seen(names):  # proves the workers had the secrets, without printing them
    return {n: hashlib.sha256(os.environ.get(n, "").encode()).hexdigest() for n in names}

print("WORKER_ENV", json.dumps(ray.get(seen.remote(args["names"]))), flush=True)
cluster.main(["avsa-secrets", "--dry-run", "--s3-secret", "avsa-s3", "--mlflow-uri",
              args["mlflow"], "--", "jobs/pretrain.py", "experiment=demo_local"])
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secretdata")
    synth.write_dataset(root / "clips", 4, 2.0, seed=3, width=128, height=64, progress=False)
    write_shards(str(root / "clips"), str(root / "train"), samples_per_shard=2, progress=False)
    write_shards(str(root / "clips"), str(root / "val"), samples_per_shard=4, split="val",
                 progress=False)
    return root


def _common(shards: Path, uri: str, experiment: str, storage_path: str) -> list[str]:
    return [
        "experiment=demo_local", "model=tiny", f"data.shards={shards / 'train'}",
        f"data.val_shards={shards / 'val'}", "data.crop_size=32", "data.frames=4",
        "data.n_mels=32", "data.equirect_height=0", "data.num_viewpoints=2",
        "train.max_steps=2", "train.batch_size=2", "train.num_workers=1", "train.log_every=1",
        "train.checkpoint_every=2", "train.val_every=2", "train.val_batches=1",
        f"storage.path={storage_path}", f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
    ]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _mlflow_corpus(client: MlflowClient, experiments: list[str], dst: Path) -> dict[str, bytes]:
    """Every param, tag and metric key, and every artifact file, of the experiments' runs."""
    out: dict[str, bytes] = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            out[f"mlflow:{name}:{rid}:params"] = json.dumps(run.data.params).encode()
            out[f"mlflow:{name}:{rid}:tags"] = json.dumps(run.data.tags).encode()
            out[f"mlflow:{name}:{rid}:metrics"] = json.dumps(run.data.metrics).encode()
            local = Path(client.download_artifacts(rid, "", str(dst / rid)))
            for f in _files(local):
                out[f"mlflow:{name}:{rid}:artifact:{f.relative_to(local)}"] = f.read_bytes()
    return out


def _helm_corpus() -> dict[str, bytes]:
    import helm_python as helm

    out = {}
    cases = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
    with helm.Chart.load(CHART) as chart:
        for case in cases:
            values = None if case is None else helm.values_from_yaml(case.read_text())
            rendered = chart.render(values, name="avsa", namespace="ml", is_install=True)
            for path, text in rendered.items():
                out[f"helm:{case and case.name}:{path}"] = text.encode()
    return out


def test_secret_values_appear_nowhere(s3_endpoint, s3_bucket, mlflow_uri, shards, tmp_path,
                                      monkeypatch):
    values = {
        "AWS_SECRET_ACCESS_KEY": "avsaSecretKey" + secrets.token_hex(16),
        "AWS_SESSION_TOKEN": "avsaSessionToken" + secrets.token_hex(24),
        "MLFLOW_TRACKING_TOKEN": "avsaMlflowToken" + secrets.token_hex(16),
    }
    ray_tmp = Path(tempfile.mkdtemp(prefix="avsa-sec-", dir="/tmp"))  # short: Ray's sockets
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(values, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO), RAY_DEDUP_LOGS="0")
    args = {
        "pretrain": _common(shards, mlflow_uri, "rel-secrets", f"{s3_bucket}/runs"),
        "sweep": [*_common(shards, mlflow_uri, "rel-secrets-sweep", str(tmp_path / "sweeps")),
                  "sweep.space.loss.temperature=[0.07]", "sweep.space.data.num_viewpoints=[2]",
                  "sweep.scheduler=fifo"],
        "names": sorted(values),
        "mlflow": str(mlflow_uri),
    }
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], cwd=tmp_path,
                              env=env, capture_output=True, timeout=900)
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"

        # The secrets really were in every process: the Ray workers saw them.
        line = next(ln for ln in out.splitlines() if ln.startswith("WORKER_ENV "))
        assert json.loads(line.split(" ", 1)[1]) == {
            k: hashlib.sha256(v.encode()).hexdigest() for k, v in values.items()}
        run_id, checkpoint_uri = next(ln for ln in out.splitlines()
                                      if ln.startswith("PRETRAIN_RUN ")).split()[1:3]
        assert checkpoint_uri.startswith(f"{s3_bucket}/runs/")  # credentials in use

        corpus: dict[str, bytes] = {"stdout": proc.stdout, "stderr": proc.stderr}
        ray_files = _files(ray_tmp)
        assert any(p.name.startswith("worker-") for p in ray_files)
        corpus |= {f"ray:{p.relative_to(ray_tmp)}": p.read_bytes() for p in ray_files}
        corpus["mlflow-server.log"] = Path(mlflow_uri.log_path).read_bytes()
        mlflow_files = _mlflow_corpus(MlflowClient(mlflow_uri), ["rel-secrets",
                                                                 "rel-secrets-sweep"],
                                      tmp_path / "artifacts")
        assert any(k.endswith("config.yaml") for k in mlflow_files)
        assert any(run_id in k for k in mlflow_files)
        corpus |= mlflow_files
        corpus |= {f"sweep:{p.relative_to(tmp_path)}": p.read_bytes()
                   for p in _files(tmp_path / "sweeps")}
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        bucket = s3_bucket.removeprefix("s3://")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.endswith("state.pt") for k in keys)
        corpus |= {f"s3:{k}": s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        corpus |= _helm_corpus()
        assert "RayJob" in out  # the dry-run manifest is in the output searched

        leaks = [(where, name) for where, blob in corpus.items()
                 for name, value in values.items() if value.encode() in blob]
        assert leaks == [], f"secret values found in: {leaks[:10]}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
