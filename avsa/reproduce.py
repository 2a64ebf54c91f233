"""`avsa reproduce`: the paper's comparisons regenerated on synthetic scenes, in one command.

Synthesises the data sets, pretrains every variant the tables need, transfers each (several
head seeds per cell) and writes the tables with 95% bootstrap intervals, to set beside the
paper's numbers (METHOD.md §8):
- pretext: scratch, AVC, AVTS, AVSA and AVSA after an AVC curriculum (--pretexts) x every
  transfer task (--tasks; --binary-only: the two binary ones), all from frozen encoders (action
  recognition on a second set of single-class clips);
- viewpoints: AVSA-Bin and AVC-Bin of AVSA pretrained with V in --viewpoints;
- audio: the same for each audio input in --features, dry and in a room (RT60 --rt60).

Every pretext sees the same (view, audio) pairs per step: the one-viewpoint baselines take V
times the batch; clips are synthesised at the size and frame rate the preset reads them at.
Everything lands under --out: data/, runs/ (checkpoints), mlruns/ (unless --tracking-uri or a
`tracking.uri=` override) and tables/NAME.{md,csv,png}, also on the MLflow run `reproduce`.
Re-running skips what is done (clips, pretrainings, transfer cells in MLflow); a cell counts as
done, and enters the tables, only when its transfer config matches (pretraining, seeds, data,
model, transfer), so other --steps, --seed or overrides on the same --out make their own cells.
Extra arguments are Hydra overrides for every run, e.g. `model=full train.use_gpu=true
train.num_workers=4` on a GPU machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from avsa import tracking
from avsa.config import compose, config_digest, override
from avsa.data.labels import NUM_CLASSES
from avsa.downstream import compare
from avsa.errors import ConfigError, TrackingError

log = logging.getLogger("avsa.reproduce")

PRESET = "experiment=demo_local"
TRANSFERS: list[tuple[str, list[str]]] = [
    ("avc_bin", []),
    ("avsa_bin", []),
    ("action", ["downstream.mode=linear"]),
    ("segmentation", ["downstream.context=video"]),
    ("segmentation", ["downstream.context=audio"]),
    ("segmentation", ["downstream.context=context"]),
]
BIN_COLUMNS = tuple(c for c in compare.COLUMNS if c.task in ("avc_bin", "avsa_bin"))
PRETEXT_COLUMNS = tuple(c for c in compare.COLUMNS if c.metric != "test/video_acc"
                        and "mIoU (" not in c.label)
PRETRAIN_COLUMNS = ("val/avsa_acc", "val/avc_acc")


@dataclass(frozen=True)
class Variant:
    """One pretraining: the row it fills, its overrides, and the data it trains on."""

    row: str
    overrides: tuple[str, ...] = ()
    data: str = "dry"  # "dry" or "wet" (reverberant copies of the same scenes)


@dataclass
class Table:
    """A table to fill: each row a pretraining variant (None: scratch), each with every one of
    `transfers` (task, its overrides)."""

    name: str
    columns: tuple[compare.Column, ...]
    transfers: list[tuple[str, list[str]]]
    rows: list[Variant | None] = field(default_factory=list)


def baseline(batch: int, v: int) -> tuple[str, ...]:
    """A one-viewpoint pretext without viewpoint context, as many pairs per step as AVSA."""
    return ("data.num_viewpoints=1", "model.use_transformer=false", f"train.batch_size={batch * v}")


def plan(args: argparse.Namespace, batch: int, v: int,
         preset_features: str = "intensity") -> list[Table]:
    """The tables asked for."""
    tables = []
    bins = [("avsa_bin", []), ("avc_bin", [])]
    if "pretext" in args.tables:
        t = Table("pretext", tuple(c for c in PRETEXT_COLUMNS if c.task in args.tasks),
                  [(task, extra) for task, extra in TRANSFERS if task in args.tasks], [None])
        for row, extra in (("avc", ("loss=avc", *baseline(batch, v))),
                           ("avts", ("loss=avts", *baseline(batch, v))),
                           ("avsa", ()),
                           ("avsa_cur", ("train.curriculum=true",
                                         f"train.curriculum_avc_steps={args.steps // 2}"))):
            if row in args.pretexts:
                t.rows.append(Variant(row, extra))
        tables.append(t)
    if "viewpoints" in args.tables:
        t = Table("viewpoints", BIN_COLUMNS, bins)
        for n in args.viewpoints:
            over = () if n == v else (f"data.num_viewpoints={n}",)
            if n > v:  # more views than the preset's separation fits: the paper's 36 deg
                over += ("data.min_separation_deg=36",)
            t.rows.append(Variant("avsa" if n == v else f"avsa-v{n}", over))
        tables.append(t)
    if "audio" in args.tables:
        t = Table("audio", BIN_COLUMNS, bins)
        for feat in args.features:
            t.rows.append(Variant(feat, (f"data.audio_features={feat}",)))
        if args.rt60 > 0:  # the preset's input, dry (above) against reverberant
            over = (f"data.audio_features={preset_features}",)
            t.rows.append(Variant(f"{preset_features}-rt60", over, "wet"))
        tables.append(t)
    return tables


TABLES = ("pretext", "viewpoints", "audio")
PRETEXTS = ("avc", "avts", "avsa", "avsa_cur")
TASKS = tuple(dict.fromkeys(task for task, _ in TRANSFERS))
FEATURES = ("logmel", "cardioid", "intensity")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = text.split(",")
        if bad := [n for n in names if n not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {','.join(allowed)}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="avsa reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    p.add_argument("--clips", type=int, default=192, help="training clips (pretraining, heads)")
    p.add_argument("--test-clips", type=int, default=48)
    p.add_argument("--action-clips", type=int, default=96, help="single-class clips for action "
                   "recognition (a quarter held out)")
    p.add_argument("--classes-per-clip", type=int, default=None, metavar="C",
                   choices=range(1, NUM_CLASSES + 1),
                   help="draw each scene's sources from C classes (`avsa synth`)")
    p.add_argument("--seconds", type=float, default=3.0, help="clip length (AVTS needs >= 2 s)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of every variant")
    p.add_argument("--seeds", type=int, default=2, help="head seeds per transfer cell")
    p.add_argument("--pretrain-seeds", type=int, default=1,
                   help="pretrainings of every variant (train.seed +0, +1, ...), pooled in "
                        "each cell, so that its interval covers pretraining's spread too")
    p.add_argument("--tables", type=_names(TABLES), default=list(TABLES),
                   help="comma-separated, of " + ",".join(TABLES))
    p.add_argument("--pretexts", type=_names(PRETEXTS), default=list(PRETEXTS),
                   help="comma-separated rows of the pretext table besides scratch, of "
                        + ",".join(PRETEXTS))
    p.add_argument("--tasks", type=_names(TASKS), default=list(TASKS),
                   help="comma-separated transfer tasks of the pretext table: " + ",".join(TASKS))
    p.add_argument("--binary-only", action="store_const", dest="tasks",
                   const=["avc_bin", "avsa_bin"], help="--tasks avc_bin,avsa_bin (the quick ones)")
    p.add_argument("--viewpoints", type=_ints, default=[1, 2, 4, 8],
                   help="comma-separated V of the viewpoints table")
    p.add_argument("--features", type=_names(FEATURES), default=["logmel", "intensity"],
                   help="comma-separated audio inputs of the audio table, of " + ",".join(FEATURES))
    p.add_argument("--rt60", type=float, default=0.4,
                   help="reverberation time of the wet rows of the audio table (0: none)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI (default: a tracking.uri= override, else a store in --out)")
    p.add_argument("--workers", type=int, default=2, help="processes for synthesis")
    p.add_argument("--train-workers", type=int, default=1,
                   help="Ray Train workers per pretraining (same global batch); on 2 cores "
                        "two took 6-10%% longer, the second competing with decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.clips < 8 or args.test_clips < 2 or args.action_clips < 8:
        p.error("need --clips >= 8, --test-clips >= 2 and --action-clips >= 8")
    if min(args.steps - 1, args.seeds, args.pretrain_seeds, args.train_workers, args.seconds) <= 0:
        p.error("need --steps >= 2, --seeds, --pretrain-seeds, --train-workers >= 1, --seconds > 0")
    return args


def make_data(args: argparse.Namespace, tables: list[Table], data) -> dict[str, tuple[str, str]]:
    """Shard URIs (train, test) of each data set (dry scenes, single-class action clips and,
    when a table asks, reverberant copies of the dry scenes) at the frame rate and equirect size
    `data` (a DataConfig) reads (`synth.read_format`)."""
    from avsa import synth

    fmt = synth.read_format(data)
    dry = {"classes_per_clip": args.classes_per_clip}
    sets = {"dry": dry, "action": {"classes_per_clip": 1}}
    if any(v is not None and v.data == "wet" for t in tables for v in t.rows):
        sets["wet"] = {**dry, "rt60_s": args.rt60}
    out = {}
    for name, kw in sets.items():
        n_train = args.action_clips * 3 // 4 if name == "action" else args.clips
        n_test = args.action_clips - n_train if name == "action" else args.test_clips
        seed = args.seed + (10 if name == "action" else 0)
        log.info("synthesising %d + %d %s clips", n_train, n_test, name)
        root = (args.out / "data" / name).resolve()
        out[name] = tuple(synth.write_split(root, split, n, args.seconds, s, args.workers,
                                            progress=False, **fmt, **kw)
                          for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)))
    return out


def _common(args: argparse.Namespace, uri: str) -> list[str]:
    return [PRESET, override("tracking.uri", uri), f"data.seed={args.seed}",
            f"train.num_workers={args.train_workers}", *args.overrides]


def pretrain_configs(args, tables, data, uri) -> list[tuple[str, object]]:
    """(row, config) of every pretraining: each distinct variant --pretrain-seeds times
    (train.seed +0, +1, ...), its run named by the config's digest, so rows with the same
    config, and other invocations (other --tables), find the same run."""
    variants = {v.row: v for t in tables for v in t.rows if v is not None}
    configs = []
    for row, v in variants.items():
        train, test = data[v.data]
        for p in range(args.pretrain_seeds):
            cfg = compose([
                *_common(args, uri), override("data.shards", train),
                override("data.val_shards", test),
                *v.overrides, f"train.max_steps={args.steps}", f"train.seed={args.seed + p}",
                override("storage.path", (args.out / "runs").resolve()),
                "tracking.experiment=avsa-reproduce-pretrain"])
            cfg.storage.run_name = f"reproduce-{cfg.run_name()}"
            configs.append((row, cfg))
    return configs


def pretrain_all(args, tables, data, uri) -> tuple[dict[str, list[str]],
                                                   dict[str, dict[str, float]]]:
    """Run `pretrain_configs` (each distinct run once): row -> checkpoint reference of each
    pretraining seed, row -> the first one's final validation metrics."""
    from avsa.train.driver import finished_run, pretrain

    configs = pretrain_configs(args, tables, data, uri)
    runs: dict[str, object] = {}  # run name -> result
    refs: dict[str, list[str]] = {}
    metrics: dict[str, dict[str, float]] = {}
    for i, (row, cfg) in enumerate(configs, 1):
        if (key := cfg.storage.run_name) not in runs:
            done = finished_run(cfg, uri)
            print(f"[avsa reproduce] pretraining {i}/{len(configs)}: {row}"
                  f"{' (done)' if done else ''}", flush=True)
            runs[key] = done or pretrain(cfg)
        res = runs[key]
        refs.setdefault(row, []).append(res.run_id or res.checkpoint_uri or res.run_uri)
        metrics.setdefault(row, {k: float(res.metrics[k]) for k in PRETRAIN_COLUMNS
                                 if isinstance(res.metrics.get(k), (int, float))})
    return refs, metrics


def done_configs(uri: str, experiment: str) -> set[str]:
    """The transfer digests (tag avsa.config) of the finished transfer runs in `experiment`."""
    try:
        records = compare.fetch_records(uri, experiment, with_examples=False)
    except TrackingError:  # no such experiment yet
        return set()
    return {r.config for r in records if r.config}


def cell_jobs(t: Table, seeds: int, pretrain_seeds: int, refs: dict[str, list[str]]
              ) -> list[tuple[str, str, list[str], int, str, str]]:
    """(row, task, overrides, seed, pretraining, data set) of every transfer cell of table
    `t`: seed p * seeds + s is head seed s on pretraining seed p (scratch: another random
    encoder), so with one pretraining seed the seeds are the head seeds. Action reads the
    single-class clips; other tasks the data the row pretrained on."""
    return [(v.row if v else "scratch", task, extra, seed,
             refs[v.row][seed // seeds] if v else "scratch",
             "action" if task == "action" else (v.data if v else "dry"))
            for v in t.rows for task, extra in t.transfers for seed in range(seeds * pretrain_seeds)]


def transfer_configs(args, t: Table, data, refs, uri) -> list[tuple[str, object]]:
    """(progress label, transfer config) of every cell job of table `t` (`cell_jobs`)."""
    out = []
    for row, task, extra, seed, pretrained, data_set in cell_jobs(t, args.seeds,
                                                                  args.pretrain_seeds, refs):
        train, test = data[data_set]
        # every row is read through the same clips and viewpoints (the preset's V); the
        # network brings its own audio input (see avsa.downstream.run)
        cfg = compose([*_common(args, uri), *extra,
                       override("data.shards", train), override("data.val_shards", test),
                       f"downstream.task={task}", f"downstream.seed={seed}",
                       override("downstream.pretrain", pretrained), f"downstream.row={row}",
                       f"downstream.experiment=avsa-reproduce-{t.name}"])
        context = [cfg.downstream.context] if task == "segmentation" else []
        out.append((" ".join([row, task, *context, f"seed {seed}"]), cfg))
    return out


def transfer_all(args, tables, data, refs, uri) -> dict[str, set[str]]:
    """Every cell of every table (`transfer_configs`) that MLflow does not hold yet: a finished
    run with the same transfer digest (`config_digest(transfer=True)`: the data, model and
    downstream settings). Returns table name -> its cells' digests."""
    from avsa.downstream.run import run_transfer

    memo: dict = {}  # decoded clips, shared by every head that reads the same data
    cells: dict[str, set[str]] = {}
    for t in tables:
        jobs = [(label, cfg, config_digest(cfg, transfer=True))
                for label, cfg in transfer_configs(args, t, data, refs, uri)]
        cells[t.name] = {digest for _, _, digest in jobs}
        done = done_configs(uri, f"avsa-reproduce-{t.name}")
        for i, (label, cfg, digest) in enumerate(jobs, 1):
            if digest in done:
                continue
            print(f"[avsa reproduce] {t.name} {i}/{len(jobs)}: {label}", flush=True)
            print(run_transfer(cfg, memo).summary().splitlines()[0], flush=True)
    return cells


def write_tables(args, tables, cells, metrics, uri) -> list[Path]:
    """tables/NAME.{md,csv,png} per table, from this invocation's cells (`cells`: table name ->
    transfer digests), and pretraining.* with the variants' own scores."""
    out = args.out / "tables"
    paths = []
    for t in tables:
        records = [r for r in compare.fetch_records(uri, f"avsa-reproduce-{t.name}")
                   if r.config in cells[t.name]]
        table = compare.build_table(records, t.columns)
        order = ["scratch"] + [v.row for v in t.rows if v is not None]
        table.rows = [r for r in order if r in table.rows]
        paths += compare.write_outputs(table, out, t.name)
        print(f"\n## {t.name}\n\n{table.to_markdown()}", flush=True)
    columns = tuple(compare.Column(k, "", None, k) for k in PRETRAIN_COLUMNS)
    scores = {row: {k: compare.Cell(m[k], None, None, 1) if k in m else None
                    for k in PRETRAIN_COLUMNS} for row, m in metrics.items()}
    table = compare.Table(list(metrics), columns, scores)
    print(f"\n## pretraining (validation, %)\n\n{table.to_markdown()}", flush=True)
    return [*paths, *compare.write_outputs(table, out, "pretraining")]


def tracking_uri(args: argparse.Namespace, cfg) -> str:
    """--tracking-uri, else the config's `tracking.uri` (every run's, so the tables' too), else
    a SQLite store in --out. Raises ConfigError when the two name different stores."""
    if args.tracking_uri and cfg.tracking.uri and args.tracking_uri != cfg.tracking.uri:
        raise ConfigError("tracking.uri", f"{cfg.tracking.uri!r} differs from --tracking-uri "
                          f"{args.tracking_uri!r}; give one")
    return tracking.resolve_tracking_uri(
        args.tracking_uri or cfg.tracking.uri
        or f"sqlite:///{(args.out / 'mlruns' / 'mlflow.db').resolve()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # The per-step [avsa] lines show progress; Ray Data's bars would bury them.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cfg = compose([PRESET, *args.overrides])  # bad overrides fail here, before any work
    uri = tracking_uri(args, cfg)
    tracking.check_reachable(uri)  # and an unusable tracking server
    tables = plan(args, cfg.train.batch_size, cfg.data.num_viewpoints, cfg.data.audio_features)
    data = make_data(args, tables, cfg.data)
    from avsa.train.ray_setup import ray_for_block

    with ray_for_block():  # the cells after it run in this process, without Ray
        refs, metrics = pretrain_all(args, tables, data, uri)
    cells = transfer_all(args, tables, data, refs, uri)
    paths = write_tables(args, tables, cells, metrics, uri)
    params = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v)
              for k, v in vars(args).items()}
    with tracking.RunLogger.start(uri, "avsa-reproduce", "reproduce", params=params,
                                  tags={tracking.KIND: "reproduce"}) as logger:
        for p in paths:
            logger.log_artifact(p, "tables")
        logger.log_metrics({"minutes": (time.perf_counter() - start) / 60}, step=0)
    print(f"[avsa reproduce] done in {(time.perf_counter() - start) / 60:.1f} min; tables in "
          f"{args.out / 'tables'}; runs in MLflow at {tracking.redact(uri)}")
    return 0
