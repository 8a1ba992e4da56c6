"""``cacflow coca-reference GATED_ROOT --out refs.parquet``: reference scores of the
COCA gated release from its OsiriX calcium ROIs, one row per patient."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "coca-reference"
HELP = "score the COCA gated release's calcium ROIs into a reference Parquet table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gated_root", type=Path,
                        help="the Gated_release_final folder (holds calcium_xml/ and patient/)")
    parser.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    parser.add_argument("--labels-dir", type=Path, default=None,
                        help="also write each patient's rasterised label volume here as <id>.nii.gz")


def run(args: argparse.Namespace) -> int:
    from cacflow.coca import reference_table
    from cacflow.tables import write_parquet_atomic

    if not (args.gated_root / "calcium_xml").is_dir() and not (args.gated_root / "patient").is_dir():
        print(f"cacflow coca-reference: {args.gated_root} has neither calcium_xml/ nor patient/",
              file=sys.stderr)
        return 2
    table = reference_table(args.gated_root, labels_dir=args.labels_dir)
    write_parquet_atomic(table, args.out)
    statuses = table.column("status").to_pylist()
    print(f"{statuses.count('ok')} patients scored, {statuses.count('failed')} failed -> {args.out}",
          file=sys.stderr)
    return 0
