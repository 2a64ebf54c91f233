"""Transfer report files from per-example results (pure: no services)."""

from __future__ import annotations

import csv

import numpy as np

from avsa.downstream import report
from avsa.tracking import code_version


def test_binary_confusion_and_per_class_table(tmp_path):
    ex = {"acc": np.array([1, 0, 1, 1], np.uint8), "target": np.array([0, 0, 1, 1]),
          "pred": np.array([0, 1, 1, 1])}
    paths = report.write_report("avsa_bin", ex, tmp_path)
    assert {p.name for p in paths} == {"confusion_matrix.png", "per_class.csv"}
    rows = list(csv.DictReader((tmp_path / "per_class.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == ["misaligned", "aligned"]
    assert rows[0]["support"] == "2" and rows[0]["recall"] == "0.5" and rows[1]["precision"] == \
        str(round(2 / 3, 4))


def test_segmentation_sums_crop_confusions_and_draws_overlays(tmp_path):
    conf = np.zeros((3, 3, 3), np.int32)
    conf[:, 0, 0], conf[:, 1, 1], conf[0, 2, 1] = 10, 4, 2
    s = 8
    ex = {"confusion": conf, "overlay_image": np.zeros((2, s, s, 3), np.uint8),
          "overlay_pred": np.ones((2, s, s), np.int16), "overlay_mask": np.zeros((2, s, s),
                                                                                np.int16)}
    paths = report.write_report("segmentation", ex, tmp_path, labels=("drum", "bird"))
    assert sorted(p.name for p in paths) == ["confusion_matrix.png", "overlay_0.png",
                                             "overlay_1.png", "per_class.csv"]
    rows = {r["class"]: r for r in csv.DictReader((tmp_path / "per_class.csv").read_text().splitlines())}
    assert rows["background"]["iou"] == "1.0" and rows["bird"]["recall"] == "0.0"
    assert rows["drum"]["support"] == "12"


def test_nothing_to_report_writes_nothing(tmp_path):
    assert report.write_report("action", {"clip_acc": np.ones(3, np.uint8)}, tmp_path) == []


def test_code_version_tags_from_git_and_fallback(monkeypatch):
    tags = code_version.code_version_tags()
    assert len(tags[code_version.GIT_COMMIT]) == 40
    assert tags[code_version.CODE_VERSION].startswith("0.1.0+g" + tags[code_version.GIT_COMMIT][:12])
    monkeypatch.setattr(code_version, "_ROOT", code_version._ROOT / "no-such-checkout")
    monkeypatch.setenv(code_version.COMMIT_ENV, "abc123")
    monkeypatch.setenv(code_version.ENTRY_ENV, "avsa pretrain")
    code_version._git_facts.cache_clear()
    try:
        tags = code_version.code_version_tags()
    finally:
        code_version._git_facts.cache_clear()
    assert tags[code_version.GIT_COMMIT] == "abc123" and tags[code_version.GIT_DIRTY] == "unknown"
    assert tags[code_version.SOURCE_NAME] == "avsa pretrain"
