"""`avsa compare`: the paper-style table of transfer results, read back from MLflow.

Rows are pretexts (scratch, avc, avts, avsa, avsa_cur, then any other found), columns the
task metrics. A cell pools the finished transfer runs of (pretext, task, context for
segmentation, mode for action), one per seed (the latest run of each seed): it shows their
mean and a 95% percentile bootstrap interval that resamples seeds, then test clips within each
seed, from the per-example results every run stores (stats.bootstrap_ci). Action runs of
several modes (linear, frozen, finetune) get a column each. Writes comparison.md (percentages,
`mean [lo, hi]`), comparison.csv (fractions: mean, lo, hi, n_runs per column) and
comparison.png (grouped bars with the intervals) to --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import numpy as np

from avsa import tracking
from avsa.downstream import stats
from avsa.errors import TrackingError
from avsa.progress import progress_bar
from avsa.tracking.client import connect, one_line, reading, sqlite_path

log = logging.getLogger(__name__)

PRETEXT_ORDER = ("scratch", "avc", "avts", "avsa", "avsa_cur")


@dataclass(frozen=True)
class Column:
    label: str
    task: str
    context: str | None
    metric: str
    mode: str | None = None  # action's downstream.mode; None for the other tasks


COLUMNS = (
    Column("AVC-Bin acc", "avc_bin", None, "test/acc"),
    Column("AVSA-Bin acc", "avsa_bin", None, "test/acc"),
    Column("AVC-Bin clip acc", "avc_bin", None, "test/clip_acc"),
    Column("AVSA-Bin clip acc", "avsa_bin", None, "test/clip_acc"),
    Column("Action clip@1", "action", None, "test/clip_acc"),
    Column("Action video@1", "action", None, "test/video_acc"),
    Column("Seg mIoU (video)", "segmentation", "video", "test/miou"),
    Column("Seg mIoU (+audio)", "segmentation", "audio", "test/miou"),
    Column("Seg mIoU (+context)", "segmentation", "context", "test/miou"),
    Column("Seg mIoU-fg (video)", "segmentation", "video", "test/miou_fg"),
    Column("Seg mIoU-fg (+audio)", "segmentation", "audio", "test/miou_fg"),
    Column("Seg mIoU-fg (+context)", "segmentation", "context", "test/miou_fg"),
)

# metric -> (array in a run's per-example results, statistic of resampled rows)
RESAMPLED: dict[str, tuple[str, stats.Statistic]] = {
    "test/acc": ("acc", stats.mean_statistic),
    "test/clip_acc": ("clip_acc", stats.mean_statistic),
    "test/video_acc": ("video_acc", stats.mean_statistic),
    "test/miou": ("confusion", stats.of_sums(stats.iou)),
    "test/miou_fg": ("confusion", stats.of_sums(stats.iou, foreground=True)),
}


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    pretext: str
    task: str
    context: str | None  # segmentation only
    start_time: int  # ms since the epoch
    metrics: dict[str, float]
    seed: str | None = None  # the avsa.seed tag; None for runs logged before seeds were tagged
    examples: dict[str, np.ndarray] | None = None  # per-example test results, when stored
    mode: str | None = None  # downstream.mode of an action run; None for the other tasks
    config: str | None = None  # its transfer digest (tag avsa.config), when tagged


@dataclass(frozen=True)
class Cell:
    mean: float  # mean over the cell's runs of their logged metric
    lo: float | None  # 95% bootstrap interval; None without per-example results
    hi: float | None
    n_runs: int


def cell_of(runs: list[RunRecord], metric: str) -> Cell | None:
    """Mean over `runs` (one per seed) of `metric`, with a 95% bootstrap interval resampling
    seeds and test examples (stats.bootstrap_ci) when every run stored its examples. Rows
    stored with their unit (NAME_unit: the clip of a viewpoint, the video of a window) are
    resampled by unit."""
    runs = [r for r in runs if not math.isnan(r.metrics.get(metric, math.nan))]
    if not runs:
        return None
    name, statistic = RESAMPLED.get(metric, ("", None))
    arrays = [(r.examples or {}).get(name) for r in runs]
    lo = hi = None
    if statistic is not None and all(a is not None and len(a) for a in arrays):
        units = [(r.examples or {}).get(f"{name}_unit") for r in runs]
        lo, hi = stats.bootstrap_ci(arrays, statistic=statistic, clusters=units)
        if math.isnan(lo):
            lo = hi = None
    return Cell(fmean(float(r.metrics[metric]) for r in runs), lo, hi, len(runs))


@dataclass
class Table:
    rows: list[str]
    columns: tuple[Column, ...]
    cells: dict[str, dict[str, Cell | None]]  # [row][column label], fractions

    def _row_cells(self, name: str) -> list[Cell | None]:
        return [self.cells[name][c.label] for c in self.columns]

    def to_markdown(self) -> str:
        """Percentages with one decimal, `mean [lo, hi]` where a 95% interval exists, '–' where
        no run exists."""
        lines = ["| pretext | " + " | ".join(c.label for c in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        lines += [f"| {name} | " + " | ".join(map(_md, self._row_cells(name))) + " |"
                  for name in self.rows]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """One row per pretext; per column its mean, lo, hi (fractions) and n_runs."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["pretext", *(f"{c.label}{s}" for c in self.columns
                                 for s in ("", " lo", " hi", " n_runs"))])
        for name in self.rows:
            w.writerow([name, *(v for c in self._row_cells(name) for v in (
                ("", "", "", "0") if c is None else
                (*("" if x is None else f"{x:.6f}" for x in (c.mean, c.lo, c.hi)),
                 str(c.n_runs))))])
        return buf.getvalue()

    def plot(self, path: str | Path) -> None:
        """Grouped bars: one group per column, one bar per pretext, heights in %, 95% CIs."""
        from matplotlib.figure import Figure

        n = max(len(self.rows), 1)
        width = 0.8 / n
        fig = Figure(figsize=(1.6 * len(self.columns) + 2, 4.5))
        ax = fig.subplots()
        for i, name in enumerate(self.rows):
            cells = [c or Cell(math.nan, None, None, 0) for c in self._row_cells(name)]
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(self.columns))]
            err = [[0.0 if c.lo is None else max(0.0, 100 * (c.mean - c.lo)) for c in cells],
                   [0.0 if c.hi is None else max(0.0, 100 * (c.hi - c.mean)) for c in cells]]
            ax.bar(xs, [100 * c.mean for c in cells], width, yerr=err, capsize=2, label=name)
        ax.set_xticks(range(len(self.columns)), [c.label for c in self.columns], rotation=20,
                      ha="right")
        ax.set_ylabel("% (bars: 95% bootstrap CI)")
        ax.set_ylim(0, 100)
        ax.legend(title="pretext")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def _md(c: Cell | None) -> str:
    if c is None:
        return "–"
    if c.lo is None:
        return f"{100 * c.mean:.1f}"
    return f"{100 * c.mean:.1f} [{100 * c.lo:.1f}, {100 * c.hi:.1f}]"


def _pretext_key(name: str) -> tuple[int, str]:
    return (PRETEXT_ORDER.index(name), "") if name in PRETEXT_ORDER else (len(PRETEXT_ORDER), name)


def cell_key(r: RunRecord) -> tuple[str, str, str | None, str | None, str | None]:
    """(row, task, context, mode, seed): the replicate of a table cell that a run fills. The
    context counts for segmentation only and the mode for action only (other tasks' runs carry
    the config's defaults)."""
    return (r.pretext, r.task, r.context if r.task == "segmentation" else None,
            r.mode if r.task == "action" else None, r.seed)


def mode_columns(columns: Iterable[Column], records: Iterable[RunRecord]) -> tuple[Column, ...]:
    """`columns` with each action column bound to the mode of the action runs, or split into
    one column per mode ("Action clip@1 (linear)") when the runs hold several."""
    modes = sorted({r.mode for r in records if r.task == "action" and r.mode})
    out: list[Column] = []
    for c in columns:
        if c.task != "action" or not modes:
            out.append(c)
            continue
        out += [replace(c, mode=m, label=c.label if len(modes) == 1 else f"{c.label} ({m})")
                for m in modes]
    return tuple(out)


def build_table(records: Iterable[RunRecord], columns: tuple[Column, ...] = COLUMNS) -> Table:
    """Each cell pools the runs of (pretext, task, context, mode): the latest run of each seed
    (a rerun of a seed replaces it). Rows in PRETEXT_ORDER, then other pretexts by name."""
    records = list(records)
    columns = mode_columns(columns, records)
    latest: dict[tuple, RunRecord] = {}
    for r in sorted(records, key=lambda r: r.start_time, reverse=True):  # stable: ties keep order
        latest.setdefault(cell_key(r), r)
    groups: dict[tuple, list[RunRecord]] = {}
    for key, r in sorted(latest.items(), key=lambda kv: str(kv[0][-1])):
        groups.setdefault(key[:-1], []).append(r)
    rows = sorted({k[0] for k in groups}, key=_pretext_key)
    cells = {p: {c.label: cell_of(groups.get((p, c.task, c.context, c.mode), []), c.metric)
                 for c in columns} for p in rows}
    return Table(rows, columns, cells)


def fetch_records(uri: str, experiment: str, *, with_examples: bool = True) -> list[RunRecord]:
    """Finished transfer runs (tag avsa.kind=transfer) of `experiment`, with their per-example
    test results unless with_examples is False."""
    from mlflow.utils import get_results_from_paginated_fn

    from avsa.downstream.run import CONFIG, CONTEXT, MODE, PRETEXT, ROW, SEED

    client = connect(uri)  # MLflow's own retries, bounded as for every other client here
    what = f"searching runs of {experiment!r}"
    exp = reading(uri, what, lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        raise TrackingError(tracking.redact(uri), f"no experiment {experiment!r}")
    query = f"tags.`{tracking.KIND}` = 'transfer' and attributes.status = 'FINISHED'"
    runs = reading(uri, what, lambda: get_results_from_paginated_fn(
        lambda n, token: client.search_runs([exp.experiment_id], query, max_results=n,
                                            page_token=token), 1000))
    out = []
    # Two requests a run for its examples.
    with progress_bar(len(runs), f"{experiment} results", "run", enabled=with_examples) as bar:
        for run in runs:
            tags = run.data.tags
            context = tags.get(CONTEXT) or run.data.params.get("downstream.context") or None
            row = tags.get(ROW) or tags.get(PRETEXT, "?")
            task = tags.get(tracking.TASK, "?")
            mode = (tags.get(MODE) or run.data.params.get("downstream.mode") or None
                    if task == "action" else None)
            out.append(RunRecord(run.info.run_id, row, task, context,
                                 int(run.info.start_time or 0), dict(run.data.metrics),
                                 tags.get(SEED),
                                 _examples(client, run.info.run_id) if with_examples else None,
                                 mode, tags.get(CONFIG)))
            bar.update()
    return out


def _examples(client, run_id: str) -> dict[str, np.ndarray] | None:
    """A run's per-example test results (its EXAMPLES artifact), or None when it has none."""
    from avsa.downstream.run import EXAMPLES

    try:
        if EXAMPLES not in {a.path for a in client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, EXAMPLES, tmp)
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
    except Exception as e:  # a run without readable results still counts, without an interval
        log.warning("run %s: cannot read %s (%s); its cell gets no interval", run_id, EXAMPLES,
                    one_line(e, 200))
        return None


def write_outputs(table: Table, out: str | Path, name: str = "comparison") -> list[Path]:
    """NAME.md, NAME.csv and NAME.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.csv", out / f"{name}.png"]
    paths[0].write_text(table.to_markdown())
    paths[1].write_text(table.to_csv())
    table.plot(paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avsa compare", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="avsa-transfer", help="MLflow experiment of the runs")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--out", default="outputs/comparison", help="folder for the table files")
    args = p.parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading would create an empty store there
        raise TrackingError(uri, "no MLflow store here; pass --tracking-uri or set "
                                 "MLFLOW_TRACKING_URI to where the transfer runs were logged")
    tracking.check_reachable(uri)
    records = fetch_records(uri, args.experiment)
    if not records:
        raise TrackingError(tracking.redact(uri),
                            f"experiment {args.experiment!r} has no finished transfer runs")
    table = build_table(records)
    paths = write_outputs(table, args.out)
    print(table.to_markdown(), end="")
    print(f"[avsa] wrote {', '.join(str(p) for p in paths)}")
    return 0
