"""``cacflow calibrate PHANTOM_DICOM_DIR``: mass calibration factor from a phantom's
hydroxyapatite and water-equivalent rods; optionally the QRM insert check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "calibrate"
HELP = "derive the mass calibration factor c (mg HA per HU per mm^3) from a phantom DICOM series"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dicom_dir", type=Path, help="folder with the phantom's axial DICOM slices")
    parser.add_argument("--rod-density-mg-cm3", type=float, default=200.0,
                        help="HA density of the calibration rod (default 200)")
    parser.add_argument("--rod-center-x", type=float, default=None, help="rod centre, image column (pixels)")
    parser.add_argument("--rod-center-y", type=float, default=None, help="rod centre, image row (pixels)")
    parser.add_argument("--rod-radius-mm", type=float, default=None, help="rod radius (with the centre)")
    parser.add_argument("--water-center-x", type=float, default=None,
                        help="water-equivalent rod centre, image column (pixels)")
    parser.add_argument("--water-center-y", type=float, default=None,
                        help="water-equivalent rod centre, image row (pixels)")
    parser.add_argument("--inserts", action="store_true",
                        help="also score the QRM calcification inserts with this calibration")
    parser.add_argument("--reference", type=Path, default=None,
                        help="CSV of physical insert masses (ground_truth_mass_*), with --inserts")
    parser.add_argument("--mass-method", choices=("integrated", "threshold"), default="integrated",
                        help="mass definition for --inserts (default integrated; docs/scoring.md)")


def _pair(x, y, what: str):
    if (x is None) != (y is None):
        raise ValueError(f"give both --{what}-center-x and --{what}-center-y")
    return None if x is None else (y, x)


def run(args: argparse.Namespace) -> int:
    from cacflow.calibration import calibrate_dicom, measure_phantom_inserts
    from cacflow.scoring import ScoringSettings

    try:
        rod = _pair(args.rod_center_x, args.rod_center_y, "rod")
        water = _pair(args.water_center_x, args.water_center_y, "water")
        calibration = calibrate_dicom(
            args.dicom_dir,
            rod_density_mg_cm3=args.rod_density_mg_cm3,
            rod_centre_yx=rod,
            rod_radius_mm=args.rod_radius_mm,
            water_centre_yx=water,
        )
        result = calibration.to_dict()
        if args.inserts:
            result["inserts"] = measure_phantom_inserts(
                args.dicom_dir, args.reference, calibration, ScoringSettings(mass_method=args.mass_method)
            )
    except ValueError as error:
        print(f"cacflow calibrate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
