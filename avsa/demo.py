"""`avsa demo`: the whole loop on one machine, in a few CPU minutes.

Synthesise a small 360° data set, shard it, pretrain the tiny AVSA model on local Ray with two
workers, train an AVSA-Bin head on its frozen features and on a frozen random network's, and
print where everything is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from avsa import synth, tracking
from avsa.config import compose, override

PRESET = "experiment=demo_local"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="avsa demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/demo",
                   help="folder for data, shards and runs (default: %(default)s)")
    p.add_argument("--train-clips", type=int, default=320,
                   help="synthetic clips to pretrain on (default: %(default)s)")
    p.add_argument("--val-clips", type=int, default=64,
                   help="synthetic clips to validate and test on (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="length of each synthetic clip (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes for synthesis (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="override train.max_steps (default: the preset's)")
    p.add_argument("--transfer-epochs", type=int, default=None,
                   help="most epochs of the AVSA-Bin head (default: downstream.epochs; the head "
                        "stops early on held-out training clips)")
    p.add_argument("--skip-transfer", action="store_true", help="stop after pretraining")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for pretraining")
    args = p.parse_args(argv)
    counts = (args.train_clips, args.val_clips, args.workers, args.steps, args.transfer_epochs)
    if any(n is not None and n < 1 for n in counts):
        p.error("--train-clips, --val-clips, --workers, --steps and --transfer-epochs must be "
                ">= 1")
    out = Path(args.out)
    t0 = time.perf_counter()
    # Bad overrides and a dead tracking server fail here, before any clip is made.
    base = compose([PRESET, *args.overrides])
    if args.seconds < base.data.audio_seconds:
        p.error(f"--seconds must be at least data.audio_seconds ({base.data.audio_seconds:g} s): "
                f"shorter clips would be padded with silence")
    if args.train_clips < base.train.batch_size:
        p.error(f"--train-clips must be at least train.batch_size ({base.train.batch_size})")
    tracking.check_reachable(tracking.resolve_tracking_uri(base.tracking.uri))
    fmt = synth.read_format(base.data)
    shard_uris = {}
    for split, clips, seed in (("train", args.train_clips, 0), ("val", args.val_clips, 1)):
        print(f"[avsa demo] synthesising {clips} {split} clips into {out / 'clips' / split}",
              flush=True)
        shard_uris[split] = synth.write_split(out, split, clips, args.seconds, seed, args.workers,
                                              **fmt)

    overrides = [
        PRESET,
        override("data.shards", shard_uris["train"]),
        override("data.val_shards", shard_uris["val"]),
        override("storage.path", out / "runs"),
        *([f"train.max_steps={args.steps}"] if args.steps is not None else []),
        *args.overrides,
    ]
    cfg = compose(overrides)
    # The per-step [avsa] lines already show progress; Ray Data's bars would bury them.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from avsa.train.driver import pretrain, print_summary
    from avsa.train.ray_setup import ray_for_block

    with ray_for_block():  # the transfer after it runs in this process, without Ray
        res = pretrain(cfg)
    print_summary(res, cfg)
    v = cfg.data.num_viewpoints
    acc = res.metrics.get("val/avsa_acc")
    if isinstance(acc, float):
        print(f"[avsa demo] val/avsa_acc {acc:.3f} against chance {1 / v:.3f} (1/V, V={v})")

    if not args.skip_transfer:
        from avsa.downstream.run import run_transfer

        # A frozen random network through the same head is the floor the pretraining must beat.
        pretrained = res.run_id or res.checkpoint_uri or res.run_uri
        accs, memo = {}, {}  # memo: both heads read the same decoded clips
        epochs = [f"downstream.epochs={args.transfer_epochs}"] if args.transfer_epochs else []
        for label, ref in (("pretrained", pretrained), ("scratch", "scratch")):
            tcfg = compose([*overrides, "downstream.task=avsa_bin",
                            override("downstream.pretrain", ref), *epochs])
            t = run_transfer(tcfg, memo)
            print(t.summary(), flush=True)
            accs[label] = t.metrics.get("test/acc", float("nan"))
        print(f"[avsa demo] AVSA-Bin test/acc (frozen encoders + trained head): pretrained "
              f"{accs['pretrained']:.3f}, scratch {accs['scratch']:.3f} (pretrained - scratch "
              f"{accs['pretrained'] - accs['scratch']:+.3f}), chance 0.5")

    print(f"[avsa demo] done in {time.perf_counter() - t0:.0f}s. Look at the runs with:")
    print(*where_to_look(tracking.resolve_tracking_uri(cfg.tracking.uri),
                         cfg.tracking.experiment), sep="\n")
    return 0


def where_to_look(uri: str, experiment: str) -> list[str]:
    """Lines that open the runs of `experiment`: `mlflow ui` on a local store, else the
    server's own page."""
    from avsa.tracking import ui
    from avsa.tracking.client import is_remote

    if is_remote(uri):
        return [f"  open {ui.runs_page(uri, experiment, ui=tracking.redact(uri))}"]
    return [f"    {mlflow_command()} ui --backend-store-uri {uri}",
            f"  then open {ui.runs_page(uri, experiment)}"]


def mlflow_command() -> str:
    """The `mlflow` beside this Python (`.venv/bin/mlflow` from the repository), else `mlflow`."""
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.is_file():
        return "mlflow"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)
