"""``avsa shard INPUT_DIR OUTPUT_URI``: validate clips and write tar shards plus a manifest."""

from __future__ import annotations

import argparse
import sys

from avsa.errors import AvsaError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avsa shard",
        description="Validate the 360° clips in INPUT_DIR (KEY.mp4 with 4-channel ambiX audio or "
                    "a KEY.m4a/.wav/.flac sidecar, optional KEY.json and KEY.masks.npz) and "
                    "write tar shards plus manifest.json to OUTPUT_URI (a folder or s3://...). "
                    "Rerunning skips shards already in place; the manifest is written last.")
    p.add_argument("input_dir", metavar="INPUT_DIR", help="folder (or s3:// prefix) of clips")
    p.add_argument("output_uri", metavar="OUTPUT_URI", help="output folder or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=32, metavar="N",
                   help="clips per shard (default 32)")
    p.add_argument("--split", default="train", metavar="NAME",
                   help="split name recorded in the manifest (default train)")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="threads probing clips and building shards (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from avsa import lease
    from avsa.data.shards import write_shards

    try:
        # One writer per output: a second `avsa shard` to it is refused, naming the first.
        with lease.hold(args.output_uri, "avsa shard"):
            summary = write_shards(args.input_dir, args.output_uri,
                                   samples_per_shard=args.samples_per_shard, split=args.split,
                                   workers=args.workers, progress=not args.no_progress)
    except AvsaError as e:
        print(f"avsa shard: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
