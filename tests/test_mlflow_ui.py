"""The MLflow UI as a user sees it, in headless Chromium, after a tiny sweep and a transfer.

A two-trial sweep (each trial a Ray Train pretraining) and an AVSA-Bin transfer from
`models:/<name>@best` log to a real `mlflow server`; Chromium (Debian's `chromium`, driven by
Playwright over the DevTools protocol: no browser is downloaded) then opens the experiment
and reads the page: it opens on the runs table, whose Dataset and Model columns are filled,
and the compare view of the two trials shows `val/avsa_score` beside the swept parameter.
Both pages are screenshotted into the test's temporary folder; with
`AVSA_SCREENSHOT_DIR=docs` they refresh the README's `docs/mlflow_runs.png` and
`docs/mlflow_compare.png`. Skipped without Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import uuid
from pathlib import Path

import pytest

from avsa import synth
from avsa.config import compose
from avsa.data.shards import write_shards
from avsa.tracking import ui as mlflow_ui

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).exists()),
                None)
TINY = ["experiment=demo_local", "model=tiny", "data.crop_size=32", "data.frames=4",
        "data.n_mels=32", "data.audio_seconds=0.5", "data.num_viewpoints=2",
        "train.num_workers=1", "train.batch_size=2", "train.val_batches=1",
        "train.log_every=2", "train.checkpoint_every=2", "train.max_steps=2",
        "data.decode_cpus=0.5", "tracking.system_metrics_interval_s=1"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def runs(ray_session, mlflow_uri, tmp_path_factory):
    """A two-trial sweep over loss.temperature and a transfer from its best model."""
    from avsa.downstream.run import run_transfer
    from avsa.sweep.driver import run_sweep

    root = tmp_path_factory.mktemp("ui")
    synth.write_dataset(root / "clips", 8, 2.0, 3, width=128, height=64, progress=False)
    for split in ("train", "val"):
        write_shards(str(root / "clips"), str(root / "shards" / split), samples_per_shard=4,
                     split=split, progress=False)
    tag = uuid.uuid4().hex[:6]
    experiment, model = f"ui-{tag}", f"enc-{tag}"
    data = [f"data.shards={root / 'shards' / 'train'}", f"data.val_shards={root / 'shards' / 'val'}",
            f"tracking.uri={mlflow_uri}", f"tracking.model_name={model}"]
    sweep = run_sweep(compose([*TINY, *data, "sweep=viewpoints_temperature",
                               "~sweep.space.data", "sweep.space.loss.temperature=[0.1,0.2]",
                               "sweep.scheduler=fifo", "sweep.report_every=2",
                               "sweep.max_concurrent_trials=1", f"storage.path={root / 'runs'}",
                               f"tracking.experiment={experiment}"]))
    assert sweep.best is not None
    transfer = run_transfer(compose([*TINY, *data, f"downstream.experiment={experiment}-transfer",
                                     "downstream.task=avsa_bin", "downstream.epochs=1",
                                     f"downstream.pretrain=models:/{model}@best"]))
    return {"sweep": sweep, "transfer": transfer, "experiment": experiment, "model": model}


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _experiment_id(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_experiment_by_name(name).experiment_id


@pytest.mark.timeout(1800)
def test_runs_table_opens_with_datasets_models_and_compare_view(runs, page, mlflow_uri,
                                                                tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = runs["sweep"]
    trials = [r for r in sweep.rows if r.get("run_id")]
    assert len(trials) == 2
    client = MlflowClient(mlflow_uri)
    best = client.get_model_version_by_alias(runs["model"], "best")
    assert best.run_id == sweep.best["run_id"]
    assert client.get_run(runs["transfer"].run_id).data.tags["avsa.model_version"] == \
        f"{runs['model']}/{best.version}"

    exp_id = _experiment_id(mlflow_uri, runs["experiment"])
    # The address `avsa demo` prints: the runs table, not the GenAI overview.
    page.goto(mlflow_ui.runs_page(mlflow_uri, runs["experiment"], ui=mlflow_uri))
    page.get_by_text("Run Name").first.wait_for()
    # the trials are nested under their sweep's run: its row's first button expands it
    page.locator("[role=row]", has_text=sweep.name).first.locator("button").first.click()
    page.get_by_text(trials[0]["trial"], exact=False).first.wait_for()
    body = page.inner_text("body")
    assert "Traces" not in body.split("Run Name", 1)[1], body[:3000]
    assert "Dataset" in body and "shards/train" in body, body[:3000]
    assert "Models" in body and "encoders" in body, body[:3000]
    shots = Path(os.environ.get("AVSA_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "mlflow_runs.png"))

    ids = json.dumps([t["run_id"] for t in trials])
    query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp_id])})
    page.goto(f"{mlflow_uri}/#/compare-runs?{query}&{mlflow_ui.WORKFLOW}")
    page.get_by_text("val/avsa_score").first.wait_for()
    text = page.inner_text("body")
    assert "loss.temperature" in text and "val/avsa_score" in text
    assert "0.1" in text and "0.2" in text
    page.screenshot(path=str(shots / "mlflow_compare.png"))
