"""Storage faults under real I/O: the S3 endpoint stopped and restarted while shards stream
(retries, then the epoch goes on), and checkpoint writes that fail (a file in the way, a full
target via RLIMIT_FSIZE) leaving the previous checkpoint intact.

Already covered elsewhere: tests/test_storage.py (endpoint restart during one read, endpoint
down past the retry budget, atomic local writes); tests/test_reliability_training.py (a
checkpoint target refusing the write inside a real Ray Train run)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from s3server import MotoS3Server

from avsa import storage
from avsa.config import DataConfig
from avsa.data import pipeline
from avsa.data.manifest import Manifest, write_manifest
from avsa.data.shards import RawSample, pack_shard, shard_info, shard_name
from avsa.encode import encode_clip
from avsa.errors import CheckpointError
from avsa.train import checkpoint as ckpt

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
FPS, SR = 8, 8000


@pytest.fixture
def flaky_s3(monkeypatch):
    """A moto S3 endpoint of this test's own (stopping it leaves other tests alone)."""
    server = MotoS3Server().start()
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "20")
    yield server
    server.stop()


def _clip(path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 255, (16, 32, 64, 3), dtype=np.uint8)
    foa = (0.1 * rng.standard_normal((4, 2 * SR))).astype(np.float32)
    encode_clip(path, video, FPS, foa, SR)
    return path.read_bytes()


@pytest.mark.slow
def test_s3_endpoint_restart_while_shards_stream(flaky_s3, tmp_path):
    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=flaky_s3.url).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/set"
    keys = [f"clip-{i}" for i in range(6)]
    infos = []
    for i in range(3):
        blob = pack_shard([RawSample(k, {"mp4": _clip(tmp_path / f"{k}.mp4", j)})
                           for j, k in enumerate(keys[2 * i: 2 * i + 2], start=2 * i)])
        storage.write_bytes(storage.join(uri, shard_name(i)), blob)
        infos.append(shard_info(shard_name(i), blob, 2))
    write_manifest(uri, Manifest("train", infos, 6))
    cfg = DataConfig(num_viewpoints=2, frames=2, fps=FPS, crop_size=16, n_mels=16,
                     shuffle_buffer=0, augment=False)

    batches = pipeline.iter_local(uri, cfg, seed=0, batch_size=1, shuffle=False)
    first = next(batches)  # shard 0 is read; the rest streams after the outage
    flaky_s3.stop()
    stopped = time.monotonic()
    restart = threading.Timer(2.0, flaky_s3.start)
    restart.start()
    try:
        rest = list(batches)
    finally:
        restart.join()
    waited = time.monotonic() - stopped
    got = first["key"] + [k for b in rest for k in b["key"]]
    assert got == keys  # every sample, in order: the epoch went on
    assert sum(int(b["skipped"].sum()) for b in [first, *rest]) == 0
    assert waited >= 1.9  # shards 1 and 2 were read only once the endpoint was back


# ----------------------------------------------------------------------------- checkpoints


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256)


def test_checkpoint_into_a_path_blocked_by_a_file(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be")
    target = blocker / "run" / "checkpoint-00000002"
    with pytest.raises(CheckpointError) as e:
        ckpt.save(target, model=_model(), optimizer=None, step=2, config={"a": 1})
    assert str(e.value).startswith(f"{target}: cannot write checkpoint (")
    assert "\n" not in str(e.value)
    assert blocker.read_text() == "a file where a folder should be"


FULL_DISK = r"""
import resource, signal, sys, torch
from avsa.errors import CheckpointError
from avsa.train import checkpoint as ckpt
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    ckpt.save(sys.argv[1], model=model, optimizer=None, step=4, config={"a": 1})
except CheckpointError as e:
    print(e)
    sys.exit(3)
"""


def test_full_target_keeps_the_previous_checkpoint(tmp_path):
    """The file size limit makes every write past 64 KiB fail as on a full disk: the new
    state is refused with a one-line CheckpointError, the old one stays loadable, and no
    temporary file is left behind."""
    d = tmp_path / "checkpoint"
    ckpt.save(d, model=_model(), optimizer=None, step=2, config={"a": 1})
    before = (d / ckpt.STATE).read_bytes()
    assert len(before) > 64 * 1024
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(d)], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{d}: cannot write checkpoint ("), lines
    assert (d / ckpt.STATE).read_bytes() == before
    assert ckpt.load(d)["step"] == 2
    assert sorted(p.name for p in d.iterdir()) == [ckpt.CONFIG, ckpt.STATE]
