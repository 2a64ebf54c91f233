"""`avsa compare`: the paper-style table of transfer results, read back from MLflow.

Rows are pretexts (scratch, avc, avts, avsa, avsa_cur, then any other found), columns the
task metrics; each cell is the latest finished transfer run for (pretext, task, context).
Writes comparison.md (percentages), comparison.csv (fractions) and comparison.png (grouped
bars) to --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from avsa import tracking
from avsa.errors import TrackingError

PRETEXT_ORDER = ("scratch", "avc", "avts", "avsa", "avsa_cur")


@dataclass(frozen=True)
class Column:
    label: str
    task: str
    context: str | None
    metric: str


COLUMNS = (
    Column("AVC-Bin acc", "avc_bin", None, "test/acc"),
    Column("AVSA-Bin acc", "avsa_bin", None, "test/acc"),
    Column("Action clip@1", "action", None, "test/clip_acc"),
    Column("Action video@1", "action", None, "test/video_acc"),
    Column("Seg mIoU (video)", "segmentation", "video", "test/miou"),
    Column("Seg mIoU (+audio)", "segmentation", "audio", "test/miou"),
    Column("Seg mIoU (+context)", "segmentation", "context", "test/miou"),
)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    pretext: str
    task: str
    context: str | None  # segmentation only
    start_time: int  # ms since the epoch
    metrics: dict[str, float]


@dataclass
class Table:
    rows: list[str]
    columns: tuple[Column, ...]
    values: list[list[float | None]]  # [row][column], fractions

    def cell(self, pretext: str, label: str) -> float | None:
        j = [c.label for c in self.columns].index(label)
        return self.values[self.rows.index(pretext)][j]

    def to_markdown(self) -> str:
        """Percentages with one decimal; '–' where no run exists."""
        head = "| pretext | " + " | ".join(c.label for c in self.columns) + " |"
        rule = "|---|" + "---:|" * len(self.columns)
        lines = [head, rule]
        for name, vals in zip(self.rows, self.values):
            cells = ["–" if v is None else f"{100 * v:.1f}" for v in vals]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["pretext", *(c.label for c in self.columns)])
        for name, vals in zip(self.rows, self.values):
            w.writerow([name, *("" if v is None else f"{v:.6f}" for v in vals)])
        return buf.getvalue()

    def plot(self, path: str | Path) -> None:
        """Grouped bars: one group per column, one bar per pretext, heights in %."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = max(len(self.rows), 1)
        width = 0.8 / n
        fig, ax = plt.subplots(figsize=(1.6 * len(self.columns) + 2, 4.5))
        for i, (name, vals) in enumerate(zip(self.rows, self.values)):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(self.columns))]
            ax.bar(xs, [math.nan if v is None else 100 * v for v in vals], width, label=name)
        ax.set_xticks(range(len(self.columns)))
        ax.set_xticklabels([c.label for c in self.columns], rotation=20, ha="right")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.legend(title="pretext")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _pretext_key(name: str) -> tuple[int, str]:
    return (PRETEXT_ORDER.index(name), "") if name in PRETEXT_ORDER else (len(PRETEXT_ORDER), name)


def build_table(records: Iterable[RunRecord], columns: tuple[Column, ...] = COLUMNS) -> Table:
    """The latest run per (pretext, task, context) fills each cell; rows in PRETEXT_ORDER."""
    latest: dict[tuple[str, str, str | None], RunRecord] = {}
    for r in records:
        key = (r.pretext, r.task, r.context if r.task == "segmentation" else None)
        if key not in latest or r.start_time > latest[key].start_time:
            latest[key] = r
    rows = sorted({k[0] for k in latest}, key=_pretext_key)
    values = []
    for p in rows:
        row = []
        for c in columns:
            rec = latest.get((p, c.task, c.context))
            v = None if rec is None else rec.metrics.get(c.metric)
            row.append(None if v is None or math.isnan(v) else float(v))
        values.append(row)
    return Table(rows, columns, values)


def fetch_records(uri: str, experiment: str) -> list[RunRecord]:
    """Finished transfer runs (tag avsa.kind=transfer) of `experiment`."""
    from mlflow.tracking import MlflowClient

    from avsa.downstream.run import CONTEXT, PRETEXT

    client = MlflowClient(tracking_uri=uri)
    where = tracking.redact(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(where, f"no experiment {experiment!r}")
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{tracking.KIND}` = 'transfer' and "
                              "attributes.status = 'FINISHED'",
                max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(where, f"searching runs of {experiment!r} failed "
                                   f"({' '.join(str(e).split())[:200]})") from None
    out = []
    for run in runs:
        tags = run.data.tags
        context = tags.get(CONTEXT) or run.data.params.get("downstream.context") or None
        out.append(RunRecord(run.info.run_id, tags.get(PRETEXT, "?"), tags.get(tracking.TASK, "?"),
                             context, int(run.info.start_time or 0), dict(run.data.metrics)))
    return out


def write_outputs(table: Table, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.md", out / "comparison.csv", out / "comparison.png"]
    paths[0].write_text(table.to_markdown())
    paths[1].write_text(table.to_csv())
    table.plot(paths[2])
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avsa compare", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="avsa-transfer", help="MLflow experiment of the runs")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--out", default="outputs/comparison", help="folder for the table files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    records = fetch_records(uri, args.experiment)
    if not records:
        raise TrackingError(tracking.redact(uri),
                            f"experiment {args.experiment!r} has no finished transfer runs")
    table = build_table(records)
    paths = write_outputs(table, args.out)
    print(table.to_markdown(), end="")
    print(f"[avsa] wrote {', '.join(str(p) for p in paths)}")
    return 0
