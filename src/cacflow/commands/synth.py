"""``cacflow synth``: write a synthetic DICOM cohort with ground truth."""

from __future__ import annotations

import argparse
import time

NAME = "synth"
HELP = "write a synthetic CT cohort (DICOM, manifest.tsv, ground truth) for demos and tests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the cohort into")
    parser.add_argument("--participants", type=int, default=None, help="number of participants (default: 12 demo, 4 tiny)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed; the same seed writes the same files")
    parser.add_argument("--size", choices=("demo", "tiny"), default="demo", help="demo: 512 x 512 series; tiny: small and fast")
    parser.add_argument("--workers", type=int, default=None, help="processes to use (default: up to 2)")


def run(args: argparse.Namespace) -> int:
    from cacflow.disk import NotEnoughDiskSpace
    from cacflow.synth.cohort import generate_cohort  # heavy imports only when the command runs

    start = time.perf_counter()
    try:
        manifest = generate_cohort(args.out_dir, args.participants, args.seed, size=args.size, workers=args.workers)
    except (ValueError, NotEnoughDiskSpace) as error:  # another cohort's folder, a full disk: say so, no traceback
        raise SystemExit(f"cacflow synth: {error}") from None
    print(f"wrote {manifest} ({time.perf_counter() - start:.1f} s); ground truth in {manifest.parent / 'ground_truth'}")
    return 0
