"""`avsa synth`: write a synthetic 360° data set (`avsa.synth`) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from avsa import synth
from avsa.errors import AvsaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsa synth",
                                     description=synth.__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder of the clips (made if absent)")
    parser.add_argument("--clips", type=int, default=16,
                        help="clips to write (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="length of each clip in seconds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data set seed; each clip draws its own from it (default: 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing clips (default: %(default)s)")
    parser.add_argument("--width", type=int, default=None,
                        help="equirectangular frame width in pixels (default: twice --height, "
                             "else 384)")
    parser.add_argument("--height", type=int, default=None,
                        help="frame height in pixels (default: half --width)")
    parser.add_argument("--fps", type=float, default=16.0,
                        help="video frames per second (default: %(default)s)")
    parser.add_argument("--sample-rate", type=int, default=24000,
                        help="audio samples per second (default: %(default)s)")
    parser.add_argument("--sources", dest="num_sources", type=int, metavar="N",
                        choices=range(1, len(synth.CLASSES) + 1),
                        help="sources per clip (default: random {}-{})".format(
                            *synth.SOURCES_RANGE))
    parser.add_argument("--classes-per-clip", type=int, metavar="C",
                        choices=range(1, len(synth.CLASSES) + 1),
                        help="sources from C classes, each at least once (1: single-label clips)")
    parser.add_argument("--rt60", dest="rt60_s", type=float, default=0.0, metavar="SECONDS",
                        help="reverberation time of a simulated room (default 0: dry)")
    parser.add_argument("--stats", action="store_true",
                        help="print how many sampled crops show a source (default sampler)")
    args = parser.parse_args(argv)
    if args.clips < 0 or args.seconds <= 0 or args.workers < 1:
        parser.error("--clips must be >= 0, --seconds > 0 and --workers >= 1")
    if args.width is None:
        args.width = 2 * (192 if args.height is None else args.height)
    if args.height is None:
        args.height = args.width // 2
    if args.width != 2 * args.height:
        parser.error(f"--width {args.width} --height {args.height}: an equirectangular frame is "
                     f"2:1; give one of them, or a width twice the height")
    if args.height < 8 or args.height % 2:
        parser.error(f"--width {args.width} --height {args.height}: the height must be even "
                     f"and >= 8 (H.264 frames have even sides)")
    out = Path(args.out_dir)
    before = sum(synth.is_complete(out, f"clip-{i:06d}") for i in range(args.clips))
    start = time.perf_counter()
    try:
        scene = {k: getattr(args, k) for k in ("width", "height", "fps", "sample_rate",
                                                "num_sources", "classes_per_clip", "rt60_s")}
        synth.write_dataset(out, args.clips, args.seconds, args.seed, args.workers, **scene)
    except AvsaError as e:
        print(f"avsa synth: error: {e}", file=sys.stderr)
        return 2
    print(f"avsa synth: {args.clips} clips in {args.out_dir} ({args.clips - before} written, "
          f"{before} already there) in {time.perf_counter() - start:.1f} s")
    if args.stats:
        from avsa import coverage

        paths = [out / f"clip-{i:06d}.masks.npz" for i in range(args.clips)]
        stats = coverage.coverage_stats(coverage.load_masks(paths), seed=args.seed)
        print(f"avsa synth: {stats['share_with_source']:.1%} of {stats['crops']} sampled crops "
              f"show a source on >= {coverage.MIN_SHARE:.0%} of their pixels (mean share "
              f"{stats['mean_source_share']:.1%})")
        print(json.dumps({"name": "synth_coverage", **stats}))
    return 0
