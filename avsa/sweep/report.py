"""A finished sweep as rows (from objects like `ray.tune.Result`), a CSV table, a Markdown
table and a plot. A row: "trial", "trial_id", "status" (done | stopped | error), one column per
searched key, "step", the last value of each reported metric, "run_id", "checkpoint".
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REPORTED = ("val/avsa_score", "val/avsa_acc", "val/avc_acc", "val/loss", "train/loss")
VIEWPOINTS_KEY = "data.num_viewpoints"
TEMPERATURE_KEY = "loss.temperature"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def last_values(frame: Any, fallback: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The last non-NaN value of each metric in `names` over a trial's reports (a pandas
    DataFrame, one row per report; None if the trial never reported), else `fallback[name]`."""
    out: dict[str, Any] = {}
    for name in names:
        value = fallback.get(name)
        if name in getattr(frame, "columns", ()) and frame[name].notna().any():
            value = frame[name].dropna().iloc[-1]
        out[name] = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    return out


def trial_row(result: Any, keys: Sequence[str], *, name: str, max_steps: int,
              metric: str) -> dict[str, Any]:
    """One row for a Tune result. `max_steps` tells a finished trial from one the scheduler
    stopped early."""
    metrics = dict(result.metrics or {})
    config = dict(result.config or {})
    frame = getattr(result, "metrics_dataframe", None)
    values = last_values(frame, metrics, dict.fromkeys((metric, *REPORTED)))
    if isinstance(final := metrics.get(metric), (int, float)):
        values[metric] = float(final)  # every report has it: NaN when the trial diverged
    step = metrics.get("step")
    if not finite(step):
        step = last_values(frame, {}, ["step"])["step"]
    if result.error is not None:
        status = "error"
    elif finite(step) and step >= config.get("train.max_steps", max_steps):
        status = "done"
    else:
        status = "stopped"
    return {
        "trial": name,
        "trial_id": metrics.get("trial_id"),
        "status": status,
        **{k: _plain(config.get(k)) for k in keys},
        "step": int(step) if finite(step) else None,
        **values,
        "run_id": None,
        "checkpoint": metrics.get("checkpoint_path"),
    }


def _plain(value: Any) -> Any:
    """A searched value as a table cell and a plot key: a list becomes a tuple."""
    return tuple(map(_plain, value)) if isinstance(value, list) else value


def best_row(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> Mapping | None:
    """The row with the best finite `metric` (mode "max" or "min") among trials that did not
    fail; None if no row has one."""
    scored = [r for r in rows if finite(r.get(metric)) and r.get("status") != "error"]
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric], default=None)


def columns(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str) -> list[str]:
    """Table columns: identity, the searched keys, step, metrics some row has, then links."""
    metric_cols = [m for m in dict.fromkeys((metric, *REPORTED))
                   if any(r.get(m) is not None for r in rows)]
    return ["trial", "trial_id", "status", *keys, "step", *metric_cols, "run_id", "checkpoint"]


def write_csv(rows: Sequence[Mapping[str, Any]], cols: Sequence[str],
              path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:  # csv writes None and missing cells as ""
        writer = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(rows: Sequence[Mapping[str, Any]], cols: Sequence[str],
             best: Mapping[str, Any] | None = None) -> str:
    """A Markdown table of `cols` (run ids and checkpoints left out); the best row starred."""
    shown = [c for c in cols if c not in ("run_id", "checkpoint", "trial_id")]
    lines = ["| " + " | ".join(["", *shown]) + " |", "|" + "---|" * (len(shown) + 1)]
    for row in rows:
        mark = "*" if best is not None and row.get("trial") == best.get("trial") else ""
        lines.append("| " + " | ".join([mark, *(_cell(row.get(c)) for c in shown)]) + " |")
    return "\n".join(lines)


def plot_axes(keys: Sequence[str]) -> tuple[str, str | None]:
    """(x key, line key): the number of viewpoints on x when searched (else the first key),
    one line per temperature when searched (else per the next key; None for one key)."""
    x = VIEWPOINTS_KEY if VIEWPOINTS_KEY in keys else keys[0]
    rest = [k for k in keys if k != x]
    line = TEMPERATURE_KEY if TEMPERATURE_KEY in rest else (rest[0] if rest else None)
    return x, line


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if finite(value) else (1, 0, str(value))


def sort_rows(rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Sort in place by the searched values (numbers numerically), then by trial name."""
    rows.sort(key=lambda r: ([_sort_key(r.get(k)) for k in keys], str(r.get("trial"))))


def plot(rows: Sequence[Mapping[str, Any]], x_key: str, line_key: str | None, metric: str,
         path: str | os.PathLike, title: str = "") -> None:
    """PNG of `metric` against `x_key`, one line per value of `line_key` (repeats averaged).
    Non-numeric x values are placed evenly, in sorted order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = sorted({r.get(x_key) for r in rows}, key=_sort_key)
    numeric = all(finite(x) for x in xs)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs)}
    groups = sorted({r.get(line_key) for r in rows} if line_key else {None}, key=_sort_key)
    for g in groups:
        points = []
        for x in xs:
            vals = [r[metric] for r in rows if r.get(x_key) == x
                    and (line_key is None or r.get(line_key) == g) and finite(r.get(metric))]
            if vals:
                points.append((pos[x], sum(vals) / len(vals)))
        if points:
            label = None if line_key is None else f"{line_key.rsplit('.', 1)[-1]}={_cell(g)}"
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
    ax.set_xticks([pos[x] for x in xs], [_cell(x) for x in xs])
    ax.minorticks_off()
    if metric.endswith("_score"):
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against {x_key}")
    ax.grid(alpha=0.3)
    if line_key is not None or metric.endswith("_score"):
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
