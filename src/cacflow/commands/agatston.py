"""``cacflow agatston --ct CT --labels LABELS``: score one CT NIfTI with a label NIfTI
and print one JSON object (scores, settings used, lesions)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

NAME = "agatston"
HELP = "score a CT NIfTI with a per-vessel label NIfTI (1 LM, 2 LAD, 3 LCX, 4 RCA); print JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ct", type=Path, required=True, help="CT volume in HU (.nii or .nii.gz)")
    parser.add_argument("--labels", type=Path, required=True, help="label volume on the CT's grid")
    parser.add_argument("--min-area-mm2", type=float, default=1.0, help="smallest lesion area kept (default 1)")
    parser.add_argument("--mass-calibration", type=float, default=None, metavar="C",
                        help="mass calibration factor c, mg HA per HU per mm^3 (default: no mass score)")
    parser.add_argument("--mass-water-hu", type=float, default=0.0,
                        help="HU of water measured with the same calibration (default 0)")
    parser.add_argument("--mass-method", choices=("integrated", "threshold"), default="integrated",
                        help="mass definition (docs/scoring.md): excess over the local background integrated "
                             "over each lesion's blur (default), or c x (mean HU - water HU) x volume")
    parser.add_argument("--mass-margin-mm", type=float, default=1.0,
                        help="integrated mass: in-plane margin around each lesion (default 1)")
    parser.add_argument("--mass-ring-mm", type=float, default=2.0,
                        help="integrated mass: width of the background ring outside the margin (default 2)")
    parser.add_argument("--kvp", type=float, default=None, help="tube voltage of the scan, recorded")
    parser.add_argument("--kvp-adjusted", action="store_true",
                        help="use kVp-specific threshold and weight cut-offs (needs --kvp)")


def run(args: argparse.Namespace) -> int:
    from cacflow.nifti_io import load_nifti
    from cacflow.scoring import ScoringSettings, score

    if args.kvp_adjusted and args.kvp is None:
        print("cacflow agatston: --kvp-adjusted needs --kvp", file=sys.stderr)
        return 2
    if not (args.mass_margin_mm >= 0 and args.mass_ring_mm > 0):
        print("cacflow agatston: --mass-margin-mm must be >= 0 and --mass-ring-mm > 0", file=sys.stderr)
        return 2
    ct = load_nifti(args.ct)
    labels = load_nifti(args.labels)
    if labels.hu.shape != ct.hu.shape:
        print(f"cacflow agatston: labels shape {labels.hu.shape} (z, y, x) differs from CT shape "
              f"{ct.hu.shape}; the label volume must be on the CT's grid", file=sys.stderr)
        return 2
    settings = ScoringSettings(
        min_area_mm2=args.min_area_mm2,
        kvp_adjusted_thresholds=args.kvp_adjusted,
        mass_calibration_mg_per_hu_mm3=args.mass_calibration,
        mass_calibration_source="cli" if args.mass_calibration is not None else "none",
        mass_calibration_water_hu=args.mass_water_hu,
        mass_method=args.mass_method,
        mass_margin_mm=args.mass_margin_mm,
        mass_ring_mm=args.mass_ring_mm,
    )
    result = score(ct, np.rint(labels.hu).astype(np.int16), settings, kvp=args.kvp)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
