"""A transfer run's figures and tables, from its per-example test results.

`write_report` turns the `examples` a task filled (test targets and predictions, or per-crop
confusion matrices, and for segmentation a few test crops) into files for the run's
artifacts: `confusion_matrix.png`, `per_class.csv` and, for segmentation, `overlays/*.png`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avsa.downstream import stats

OVERLAY_KEYS = ("overlay_image", "overlay_pred", "overlay_mask")
BINARY_CLASSES = ("misaligned", "aligned")


def per_class_rows(conf: np.ndarray, names: Sequence[str]) -> list[dict[str, object]]:
    """Support, precision, recall and IoU of each class of a confusion matrix."""
    rows = []
    for i, name in enumerate(names):
        tp = int(conf[i, i])
        true, predicted = int(conf[i].sum()), int(conf[:, i].sum())
        union = true + predicted - tp
        rows.append({"class": name, "support": true,
                     "precision": round(tp / predicted, 4) if predicted else "",
                     "recall": round(tp / true, 4) if true else "",
                     "iou": round(tp / union, 4) if union else ""})
    return rows


def class_names(task: str, classes: int, labels: Sequence[str] = ()) -> list[str]:
    if task in ("avc_bin", "avsa_bin"):
        return list(BINARY_CLASSES)
    names = ["background", *labels] if task == "segmentation" else list(labels)
    return names[:classes] + [str(i) for i in range(len(names), classes)]


def _plot_confusion(conf: np.ndarray, names: Sequence[str], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    n = len(names)
    size = min(3 + 0.35 * n, 12)
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.subplots()
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _overlay_png(image: np.ndarray, pred: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """Crop | prediction over it | ground truth over it, classes in a fixed palette."""
    from PIL import Image

    palette = np.array([[0, 0, 0]] + [[int(c) for c in np.random.default_rng(k).integers(
        64, 256, 3)] for k in range(1, 64)], dtype=np.uint8)

    def over(m: np.ndarray) -> np.ndarray:
        colour = palette[np.clip(m, 0, len(palette) - 1)].astype(np.float32)
        alpha = np.where(m > 0, 0.55, 0.0)[..., None]
        return (image * (1 - alpha) + colour * alpha).astype(np.uint8)

    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([image, gap, over(pred), gap, over(mask)], axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2),
                                  Image.NEAREST).save(path)


def write_report(task: str, examples: dict[str, np.ndarray], out: Path, *,
                 labels: Sequence[str] = ()) -> list[Path]:
    """Write the report files for `examples` into `out`, classes named by `labels` (the
    source's, without background); returns their paths (none when the task left nothing to
    report)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "confusion" in examples:
        conf = examples["confusion"].sum(0)
    elif "target" in examples and "pred" in examples:
        k = max(len(labels), int(examples["target"].max(initial=0)) + 1,
                int(examples["pred"].max(initial=0)) + 1)
        conf = stats.confusions(examples["target"][None], examples["pred"][None],
                                2 if task.endswith("_bin") else k)[0]
    else:
        conf = None
    if conf is not None:
        names = class_names(task, len(conf), labels)
        _plot_confusion(conf, names, f"{task}: test confusion ({int(conf.sum())} "
                        f"{'pixels' if task == 'segmentation' else 'examples'})",
                        out / "confusion_matrix.png")
        with open(out / "per_class.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["class", "support", "precision", "recall", "iou"])
            w.writeheader()
            w.writerows(per_class_rows(conf, names))
        written += [out / "confusion_matrix.png", out / "per_class.csv"]
    if all(k in examples for k in OVERLAY_KEYS):
        (out / "overlays").mkdir(exist_ok=True)
        for i, (img, pred, mask) in enumerate(zip(*(examples[k] for k in OVERLAY_KEYS))):
            path = out / "overlays" / f"overlay_{i}.png"
            _overlay_png(img, pred, mask, path)
            written.append(path)
    return written
