"""`avsa demo`: the whole loop on one machine, in a few CPU minutes.

Synthesise a small 360° data set, shard it, pretrain the tiny AVSA model on local Ray with two
workers, run a transfer evaluation, and print where everything is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from avsa import synth
from avsa.config import compose
from avsa.data.shards import write_shards


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avsa demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/demo", help="folder for data, shards and runs")
    p.add_argument("--train-clips", type=int, default=48)
    p.add_argument("--val-clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each synthetic clip")
    p.add_argument("--workers", type=int, default=2, help="processes for synthesis")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for pretraining")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    shard_uris = {}
    for split, clips, seed in (("train", args.train_clips, 0), ("val", args.val_clips, 1)):
        clip_dir = out / "clips" / split
        print(f"[avsa demo] synthesising {clips} {split} clips into {clip_dir}", flush=True)
        synth.write_dataset(clip_dir, clips, args.seconds, seed=seed, workers=args.workers)
        shard_uris[split] = str(out / "shards" / split)
        write_shards(clip_dir, shard_uris[split], samples_per_shard=8, split=split)

    overrides = [
        "experiment=demo_local",
        f"data.shards={shard_uris['train']}",
        f"data.val_shards={shard_uris['val']}",
        f"storage.path={out / 'runs'}",
        *([f"train.max_steps={args.steps}"] if args.steps else []),
        *args.overrides,
    ]
    cfg = compose(overrides)
    from avsa import tracking
    from avsa.train.driver import pretrain, print_summary

    res = pretrain(cfg)
    print_summary(res, cfg)
    v = cfg.data.num_viewpoints
    acc = res.metrics.get("val/avsa_acc")
    if isinstance(acc, float):
        print(f"[avsa demo] val/avsa_acc {acc:.3f} against chance {1 / v:.3f} (1/V, V={v})")

    if not args.skip_transfer:
        from avsa.downstream.run import run_transfer

        tcfg = compose([*overrides, "downstream.task=avsa_bin", f"downstream.pretrain={res.run_id}",
                        "downstream.epochs=3"])
        t = run_transfer(tcfg)
        print(f"[avsa demo] transfer avsa_bin: {t.summary()}")

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    print(f"[avsa demo] done in {time.perf_counter() - t0:.0f}s. Look at the runs with:")
    print(f"    .venv/bin/mlflow ui --backend-store-uri {uri}")
    print("  then open http://127.0.0.1:5000 (experiments avsa-pretrain and avsa-transfer)")
    return 0
