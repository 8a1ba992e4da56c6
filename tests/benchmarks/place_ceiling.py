"""How far knowing where the coronary arteries run can take CAC >= 1 detection on
generated scans (docs/evaluation.md, "How far place alone can go").

    python tests/benchmarks/place_ceiling.py --seed 888001 --participants 120 > b.jsonl
    python tests/benchmarks/place_ceiling.py --check-seed 55000001 --check-scans 60 > validation.jsonl

It images each visit's scan of record exactly as ``generate_cohort`` does (cohort B:
seed 888001, 120 participants; C: 999001, 400), or with ``--check-seed`` the scans of
a model check drawn like the training data (``cacflow.training.check_phantom_draws``:
validation 55000001 x 60, specks 23000001 x 40 with ``--change specks``), and reads
each with an oracle that knows what no model is given: every coronary tube (lumen and
wall, and the plaques that bulge past it) and every voxel of non-coronary calcium, bone
and noise spike (the noise-free image at >= 130 HU outside the coronary plaques,
widened by 1 mm for the blur).

Per slice, each 8-connected group of >= 130 HU pixels of at least 1 mm^2 in the image
as the DICOM stores it (HU rounded) is one candidate, as in Agatston scoring. The
oracle calls a candidate coronary when it lies within ``tolerance`` mm of a coronary
tube and touches no non-coronary calcium; optionally only candidates of at least a
given area and peak HU. A scan's score is the Agatston sum of its calls (times
increment / 3 mm). Detection of CAC >= 1 is then compared with the generator's
noise-free reference, the issue's primary one, as ``cacflow evaluate`` does: positive
is a score >= 1 on both sides.

What it measures: how many scans without coronary calcium show a candidate on an
artery that only noise made, and whether any rule on place, size and brightness finds
the specks while passing those by. It is not an upper bound for every model (a model
may read texture or shape), but a decision by place can do no better than this.

Prints one JSON object per scan ("scan"), then one per rule ("rule"). About 3 s per
scan on 2 cores with --workers 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import ndimage

import cacflow.synth.phantom as phantom_module
from cacflow.synth.cohort import scan_of_record, visit_plans
from cacflow.training import check_phantom_draws

# Agatston's threshold, minimum area and density weight as the generator's references
# write them, apart from cacflow's scoring code.
THRESHOLD_HU = phantom_module.AGATSTON_THRESHOLD_HU
MIN_AREA_MM2 = phantom_module.AGATSTON_MIN_AREA_MM2
_weight = phantom_module._weight
NONCORONARY_MARGIN_MM = 1.0
NEAREST_REPORTED_MM = 5.0  # candidates farther than this from every artery are only counted
TOLERANCES_MM = (0.0, 1.0, 2.0)
AREA_FLOORS_MM2 = (1.0, 1.5, 2.0, 3.0)
PEAK_FLOORS_HU = (130.0, 150.0, 175.0, 200.0)


def _imaged_with_truth(make):
    """``make()``'s phantom (or None), the noise added to it and its coronary footprints.

    The generator keeps neither the noise nor the footprints, so this wraps the two
    functions that see them, in this (worker) process only, for the one call."""
    seen = {}
    noise_fn, image_reference_fn = phantom_module._correlated_noise, phantom_module.image_reference

    def keep_noise(rng, shape, settings):
        seen["noise"] = noise_fn(rng, shape, settings)
        return seen["noise"]

    def keep_footprints(hu, footprints, pixel_mm, increment_mm):
        seen["footprints"] = footprints
        return image_reference_fn(hu, footprints, pixel_mm, increment_mm)

    phantom_module._correlated_noise, phantom_module.image_reference = keep_noise, keep_footprints
    try:
        phantom = make()
    finally:
        phantom_module._correlated_noise, phantom_module.image_reference = noise_fn, image_reference_fn
    return None if phantom is None else (phantom, seen["noise"], seen["footprints"])


def candidates(image: np.ndarray, coronary: np.ndarray, artery: np.ndarray, noncoronary: np.ndarray,
               pixel_mm: float, increment_mm: float) -> tuple[list[dict], dict]:
    """Agatston candidates of ``image`` (HU as stored) within NEAREST_REPORTED_MM of
    ``artery``, with what each is; and how many of each kind lie farther away."""
    factor = increment_mm / 3.0
    found, far = [], {"coronary": 0, "noncoronary": 0, "noise": 0}
    for s in np.flatnonzero((image >= THRESHOLD_HU).any(axis=(1, 2))):
        groups, n = ndimage.label(image[s] >= THRESHOLD_HU, structure=np.ones((3, 3)))
        sizes = np.bincount(groups.ravel(), minlength=n + 1)
        large = np.flatnonzero(sizes * pixel_mm * pixel_mm >= MIN_AREA_MM2)
        large = large[large > 0]
        if not len(large):
            continue
        if artery[s].any():
            distance = ndimage.distance_transform_edt(~artery[s], sampling=pixel_mm)
        else:
            distance = np.full(image[s].shape, np.inf)
        nearest = ndimage.minimum(distance, groups, large)
        peaks = ndimage.maximum(image[s], groups, large)
        on_plaque = np.bincount(groups[coronary[s]], minlength=n + 1) > 0
        on_other_calcium = np.bincount(groups[noncoronary[s]], minlength=n + 1) > 0
        for g, near, peak in zip(large, nearest, peaks):
            what = "coronary" if on_plaque[g] else "noncoronary" if on_other_calcium[g] else "noise"
            if near > NEAREST_REPORTED_MM:
                far[what] += 1
                continue
            area = float(sizes[g]) * pixel_mm * pixel_mm
            found.append({
                "slice": int(s), "area_mm2": round(area, 3), "peak_hu": float(peak),
                "agatston": round(area * _weight(float(peak)) * factor, 4), "distance_mm": round(float(near), 3),
                "what": what,
            })
    return found, far


def _cohort_scan(plan, seed: int, size: str):
    record = scan_of_record(plan, seed, size)
    return None if record is None else record[1]


def analyse_scan(job) -> dict | None:
    """One scan's candidates. ``job``: ("cohort", plan, seed, size) for a visit's scan
    of record, or ("check", name, phantom seed, settings) for a check's scan."""
    if job[0] == "cohort":
        _, plan, seed, size = job
        name, visit = plan.participant, plan.visit
        imaged = _imaged_with_truth(lambda: _cohort_scan(plan, seed, size))
    else:
        _, name, phantom_seed, settings = job
        visit = ""
        imaged = _imaged_with_truth(lambda: phantom_module.generate_phantom(phantom_seed, settings))
    if imaged is None:
        return None
    phantom, noise, footprints = imaged
    increment, pixel, _ = phantom.spacing_mm
    coronary = np.zeros(phantom.hu.shape, dtype=bool)
    for box, mask, _vessel in footprints:
        coronary[box] |= mask
    artery = (phantom.vessel_labels > 0) | coronary
    # Noise-free: the image before noise (spikes and streaks, added after, stay in).
    clean = phantom.hu - noise
    reach = int(np.ceil(NONCORONARY_MARGIN_MM / pixel))
    disk = np.hypot(*np.mgrid[-reach:reach + 1, -reach:reach + 1]) * pixel <= NONCORONARY_MARGIN_MM
    noncoronary = ndimage.binary_dilation((clean >= THRESHOLD_HU) & ~coronary, structure=disk[None])
    found, far = candidates(np.rint(phantom.hu), coronary, artery, noncoronary, pixel, increment)
    reference, settings = phantom.reference, phantom.metadata["settings"]
    return {
        "type": "scan", "participant_id": name, "visit": visit,
        "scan_type": "gated" if settings["gated"] else "nongated",
        "noise_hu": settings["noise_hu"], "kvp": settings["kvp"], "pixel_spacing_mm": pixel, "increment_mm": increment,
        "reference_agatston": reference["agatston_total"], "image_reference_agatston": reference["image_agatston_total"],
        "candidates": found, "candidates_far_from_arteries": far,
    }


def oracle_calls(scan: dict, tolerance: float = 0.0, area_floor: float = MIN_AREA_MM2,
                 peak_floor: float = THRESHOLD_HU, knows_kind: bool = True) -> list[dict]:
    """The scan's candidates the oracle calls coronary: within ``tolerance`` mm of an
    artery, of at least ``area_floor`` and ``peak_floor``, and (``knows_kind``) not
    touching non-coronary calcium. The scan is called CAC >= 1 when their Agatston sum
    is at least 1."""
    return [c for c in scan["candidates"] if (not knows_kind or c["what"] != "noncoronary")
            and c["distance_mm"] <= tolerance and c["area_mm2"] >= area_floor and c["peak_hu"] >= peak_floor]


def called_positive(calls: list[dict]) -> bool:
    """Whether the oracle's calls (``oracle_calls``) make the scan CAC >= 1."""
    return sum(c["agatston"] for c in calls) >= 1.0


def rule_result(scans: list[dict], tolerance: float, area_floor: float, peak_floor: float) -> dict:
    """CAC >= 1 detection of the oracle that calls every candidate within ``tolerance``
    mm of an artery, not touching non-coronary calcium, of at least ``area_floor`` and
    ``peak_floor``; its false calls split by whether a planted plaque was among them."""
    tp = fp = fn = tn = 0
    false_by = {"noise": 0, "plaque_the_reference_scores_under_1": 0}
    for scan in scans:
        calls = oracle_calls(scan, tolerance, area_floor, peak_floor)
        called = called_positive(calls)
        positive = scan["reference_agatston"] >= 1.0
        tp, fp = tp + (called and positive), fp + (called and not positive)
        fn, tn = fn + (positive and not called), tn + (not positive and not called)
        if called and not positive:
            false_by["noise" if not any(c["what"] == "coronary" for c in calls) else "plaque_the_reference_scores_under_1"] += 1
    return {
        "type": "rule", "tolerance_mm": tolerance, "area_floor_mm2": area_floor, "peak_floor_hu": peak_floor,
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
        "specificity": round(tn / (tn + fp), 4) if tn + fp else None,
        "false_positives_by": false_by,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="cohort seed (with --participants)")
    parser.add_argument("--participants", type=int)
    parser.add_argument("--size", default="demo")
    parser.add_argument("--check-seed", type=int, help="a model check's seed instead of a cohort")
    parser.add_argument("--check-scans", type=int, default=40)
    parser.add_argument("--change", help="the check's change (cacflow.training.ACQUISITION_CHANGES), e.g. specks")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.check_seed is not None:
        draws = check_phantom_draws(args.check_scans, args.check_seed, args.change)
        jobs = [("check", f"scan{index + 1}", phantom_seed, settings) for index, (phantom_seed, settings) in enumerate(draws)]
    elif args.seed is not None and args.participants:
        jobs = [("cohort", plan, args.seed, args.size) for plan in visit_plans(args.participants, args.size, args.seed)]
    else:
        parser.error("give --seed and --participants (a cohort) or --check-seed (a model check)")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        scans = [scan for scan in pool.map(analyse_scan, jobs) if scan is not None]
    for scan in scans:
        print(json.dumps(scan), flush=True)
    for tolerance, area, peak in itertools.product(TOLERANCES_MM, AREA_FLOORS_MM2, PEAK_FLOORS_HU):
        print(json.dumps(rule_result(scans, tolerance, area, peak)), flush=True)


if __name__ == "__main__":
    main()
