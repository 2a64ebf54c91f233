"""Pretext comparison on synthetic data, end to end and reproducible.

Synthesises one data set, pretrains AVC, AVTS, AVSA and AVSA with an AVC curriculum on it with
the same step budget and batch, transfers each of them and a scratch network to AVC-Bin,
AVSA-Bin, action recognition (fine-tuned) and segmentation (video / +audio / +context), then
writes and prints the comparison table (`avsa compare`).

    python bench/compare_pretexts.py --clips 64 --steps 300 --out outputs/compare_pretexts

Everything lands under --out: clips/, shards/{train,test}, runs/ (checkpoints), mlruns/
(MLflow store unless --tracking-uri is given) and comparison.{md,csv,png}. Progress goes to
stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Pretraining variants: the pretext label (as `avsa compare` shows it) -> overrides.
# AVC and AVTS are the single-viewpoint baselines without viewpoint transformers; as in the
# paper (batch 112 against 28 x 4) they see as many (view, audio) pairs per step as AVSA does.
BASELINE = ["data.num_viewpoints=1", "model.use_transformer=false", "train.batch_size=32"]
PRETEXTS: dict[str, list[str]] = {
    "avc": ["loss=avc", *BASELINE],
    "avts": ["loss=avts", *BASELINE],
    "avsa": ["loss=avsa"],
    "avsa_cur": ["loss=avsa", "train.curriculum=true"],
}
TRANSFERS: list[tuple[str, list[str]]] = [
    ("avc_bin", []),
    ("avsa_bin", []),
    ("action", ["downstream.mode=finetune"]),
    ("segmentation", ["downstream.context=video"]),
    ("segmentation", ["downstream.context=audio"]),
    ("segmentation", ["downstream.context=context"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=64, help="synthetic clips (20%% held out)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each clip")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps, every pretext")
    p.add_argument("--transfer-epochs", type=int, default=5, help="epochs of each transfer")
    p.add_argument("--out", type=Path, default=Path("outputs/compare_pretexts"))
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: a store in --out)")
    p.add_argument("--experiment", default="avsa-transfer-compare",
                   help="MLflow experiment of the transfer runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes for synthesis")
    args = p.parse_args(argv)
    if args.clips < 5:
        p.error("--clips must be >= 5 (the test split takes a fifth, at least 2 clips)")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the curriculum spends half on AVC)")
    return args


def _link(clips: Path, indices: range, dest: Path) -> str:
    """A folder of symlinks to the files of clips `indices` (a split without copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in indices:
        for p in clips.glob(f"clip-{i:06d}.*"):
            if not (dest / p.name).exists():
                (dest / p.name).symlink_to(p.resolve())
    return str(dest)


def make_data(args: argparse.Namespace) -> tuple[str, str]:
    """Synthesise the clips and shard the last fifth as the test split, the rest for training."""
    from avsa import synth
    from avsa.data.shards import write_shards

    clips = args.out / "clips"
    synth.write_dataset(clips, args.clips, args.seconds, args.seed, workers=args.workers)
    n_train = args.clips - max(2, args.clips // 5)
    train, test = str(args.out / "shards" / "train"), str(args.out / "shards" / "test")
    write_shards(_link(clips, range(n_train), args.out / "train-clips"), train,
                 samples_per_shard=16, split="train")
    write_shards(_link(clips, range(n_train, args.clips), args.out / "test-clips"), test,
                 samples_per_shard=16, split="test")
    return train, test


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from avsa import tracking
    from avsa.config import compose
    from avsa.downstream import compare
    from avsa.downstream.run import run_transfer
    from avsa.train.driver import pretrain

    args.out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{(args.out / 'mlruns' / 'mlflow.db').resolve()}"
    uri = tracking.resolve_tracking_uri(uri)
    train, test = make_data(args)
    common = ["experiment=demo_local", f"data.shards={train}", f"data.val_shards={test}",
              f"tracking.uri={uri}", f"data.seed={args.seed}"]

    refs = {"scratch": "scratch"}
    for label, extra in PRETEXTS.items():
        over = [*common, *extra, f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                f"storage.path={(args.out / 'runs').resolve()}",
                "tracking.experiment=avsa-pretrain-compare",
                f"storage.run_name=compare-{label}-{args.steps}-s{args.seed}"]
        if label == "avsa_cur":
            over.append(f"train.curriculum_avc_steps={args.steps // 2}")
        res = pretrain(compose(over))
        refs[label] = res.run_id or res.checkpoint_uri or res.run_uri
        print(f"[bench] pretrained {label}: {refs[label]}", file=sys.stderr)

    for ref in refs.values():
        for task, extra in TRANSFERS:
            cfg = compose([*common, *extra, f"downstream.task={task}",
                           f"downstream.pretrain={ref}",
                           f"downstream.epochs={args.transfer_epochs}",
                           f"downstream.experiment={args.experiment}"])
            print(run_transfer(cfg).summary(), file=sys.stderr)

    return compare.main(["--experiment", args.experiment, "--tracking-uri", uri,
                         "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
