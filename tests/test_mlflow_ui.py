"""The MLflow UI as a user sees it, in headless Chromium, after a tiny sweep and a transfer.

The session's 4-trial sweep over data.num_viewpoints and loss.temperature (tests/sweeprun.py,
each trial a Ray Train pretraining) and an AVSA-Bin transfer from `models:/<name>@best` log to
a real `mlflow server`; Chromium (Debian's `chromium`, driven by Playwright over the DevTools
protocol: no browser is downloaded) then opens the experiment and reads the page: it opens on
the runs table, whose Dataset and Model columns are filled, and the compare view of two trials
shows `val/avsa_score` beside the swept parameter. Both pages are screenshotted into the
test's temporary folder; with `AVSA_SCREENSHOT_DIR=docs` they refresh the README's
`docs/mlflow_runs.png` and `docs/mlflow_compare.png`. Skipped without Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

from avsa.config import compose
from avsa.tracking import ui as mlflow_ui

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).exists()),
                None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def runs(interrupted_sweep, mlflow_uri):
    """The session's sweep, its trials (two of them, one per temperature, to compare) and a
    transfer from its best model."""
    from mlflow.tracking import MlflowClient

    from avsa.downstream.run import run_transfer

    r = interrupted_sweep
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(r.experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`avsa.kind` = 'sweep'")
    trials = client.search_runs([exp.experiment_id], "tags.`avsa.kind` = 'trial'")
    compared = sorted((t for t in trials if t.data.params["data.num_viewpoints"] == "2"),
                      key=lambda t: float(t.data.params["loss.temperature"]))
    data = [a for a in r.argv if a.startswith(("model=", "data"))]
    transfer = run_transfer(compose([
        *data, "data.num_viewpoints=2", "train.batch_size=2", f"tracking.uri={mlflow_uri}",
        f"downstream.experiment={r.experiment}-transfer", "downstream.task=avsa_bin",
        "downstream.epochs=1", f"downstream.pretrain=models:/{r.model}@best"]))
    return {"parent": parent, "trials": compared, "transfer": transfer,
            "experiment": r.experiment, "model": r.model}


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

    parent, trials = runs["parent"], runs["trials"]
    assert [t.data.params["loss.temperature"] for t in trials] == ["0.07", "0.2"]
    client = MlflowClient(mlflow_uri)
    best = client.get_model_version_by_alias(runs["model"], "best")
    assert best.run_id == parent.data.tags["avsa.best_run_id"]
    assert client.get_run(runs["transfer"].run_id).data.tags["avsa.model_version"] == \
        f"{runs['model']}/{best.version}"

    exp_id = _experiment_id(mlflow_uri, runs["experiment"])
    # The address `avsa demo` prints: the runs table, not the GenAI overview.
    page.goto(mlflow_ui.runs_page(mlflow_uri, runs["experiment"], ui=mlflow_uri))
    page.get_by_text("Run Name").first.wait_for()
    # the trials are nested under their sweep's run: its row's first button expands it
    page.locator("[role=row]", has_text=parent.info.run_name).first.locator("button").first.click()
    page.get_by_text(trials[0].info.run_name, exact=False).first.wait_for()
    body = page.inner_text("body")
    assert "Traces" not in body.split("Run Name", 1)[1], body[:3000]
    assert "Dataset" in body and "shards/train" in body, body[:3000]
    assert "Models" in body and "encoders" in body, body[:3000]
    shots = Path(os.environ.get("AVSA_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "mlflow_runs.png"))

    ids = json.dumps([t.info.run_id for t in trials])
    query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp_id])})
    page.goto(f"{mlflow_uri}/#/compare-runs?{query}&{mlflow_ui.WORKFLOW}")
    page.get_by_text("val/avsa_score").first.wait_for()
    text = page.inner_text("body")
    assert "loss.temperature" in text and "val/avsa_score" in text
    assert "0.07" in text and "0.2" in text
    page.screenshot(path=str(shots / "mlflow_compare.png"))
