"""Other ways to turn the model's per-pixel probabilities into coronary calls, compared
with the shipped one on the same generated phantoms (docs/evaluation.md, "Decision
rules tried").

    python tests/benchmarks/decision_rules.py [MODEL_DIR] [--validation 60] [--holdout 40]

Rules (the network runs once per phantom; only the decision differs):

* ``per_slice_0.50`` (shipped, ``cacflow.inference.assign_candidates``): each
  in-slice calcium component is coronary when the vessels' share of its summed
  probability is at least 0.5;
* ``per_slice_T``: the same with another share T (below 0.5 calls more calcium
  coronary: fewer missed specks, more false positives);
* ``lesion_3d``: components that touch across neighbouring slices (26-connected) vote
  together, so one 3-D calcification gets one decision;
* ``ground_truth``: an oracle, not the network: each component takes the majority
  class of its voxels in the generator's truth (a plain 5-way majority, ties to "not
  coronary"). It shows what is findable at all (a lesion that noise keeps under
  130 HU or under 1 mm² is not), but it is not a strict upper bound: a component
  with a coronary minority goes to "not coronary" here, and the network may call it
  coronary and be right by the reference.

Scores use the same Agatston code as the pipeline. Prints one JSON object per set
and rule: risk-category agreement, CAC > 0 sensitivity and specificity, mean absolute
Agatston error. About 5 s per phantom on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from cacflow.inference import IN_PLANE_8_CONNECTED, assign_candidates, calcium_cell_probabilities, engine_logits
from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine
from cacflow.model.network import N_CLASSES
from cacflow.model.preprocessing import network_inputs
from cacflow.scoring import risk_category, score_volume
from cacflow.synth.phantom import generate_phantom
from cacflow.training import agreement_summary, randomised_phantom_settings

SETS = {"validation": 55_000_001, "holdout": 99_000_001}  # the seeds of tests/benchmarks/model_checks.py
SHARES = (0.3, 0.4, 0.45, 0.55, 0.6)


def labels_by_rule(hu: np.ndarray, logits: np.ndarray, grid, truth: np.ndarray) -> dict[str, np.ndarray]:
    shipped = assign_candidates(hu, logits, grid, 130.0)[0]
    calcium = hu >= 130.0
    in_slice, _ = ndimage.label(calcium, structure=IN_PLANE_8_CONNECTED)
    in_3d, _ = ndimage.label(calcium, structure=np.ones((3, 3, 3), bool))
    rules = {"per_slice_0.50": shipped}
    z, y, x = np.nonzero(calcium)
    voxel_probabilities = calcium_cell_probabilities(logits, grid, z, y, x)
    for name, groups in (("per_slice", in_slice[z, y, x]), ("lesion_3d", in_3d[z, y, x])):
        votes = np.stack([np.bincount(groups, weights=voxel_probabilities[:, c]) for c in range(N_CLASSES)], axis=1)
        share = votes[:, 1:].sum(axis=1) / np.maximum(votes.sum(axis=1), 1e-12)
        vessel = (votes[:, 1:].argmax(axis=1) + 1).astype(np.uint8)
        for threshold in (SHARES if name == "per_slice" else (0.5,)):
            labels = np.zeros(hu.shape, np.uint8)
            labels[z, y, x] = np.where(share >= threshold, vessel, 0)[groups]
            rules[name if name == "lesion_3d" else f"{name}_{threshold:.2f}"] = labels
    components = in_slice[z, y, x]
    votes = np.bincount(components * N_CLASSES + truth[z, y, x],
                        minlength=(components.max(initial=0) + 1) * N_CLASSES)
    majority = votes.reshape(-1, N_CLASSES).argmax(axis=1).astype(np.uint8)
    rules["ground_truth"] = np.zeros(hu.shape, np.uint8)
    rules["ground_truth"][z, y, x] = majority[components]
    return rules


def summary(rows: list[dict]) -> dict:
    return {"n_scans": len(rows), **agreement_summary(rows, "reference")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=None, help="default: the shipped model")
    parser.add_argument("--validation", type=int, default=60)
    parser.add_argument("--holdout", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = ModelFiles(Path(args.model_dir)) if args.model_dir else ModelFiles.packaged()
    engine = OnnxRuntimeEngine(model, threads=args.threads)
    for set_name, n_scans in (("validation", args.validation), ("holdout", args.holdout)):
        rng = np.random.default_rng(SETS[set_name])
        rows: dict[str, list[dict]] = {}
        for _ in range(n_scans):
            settings = randomised_phantom_settings(rng)
            phantom = generate_phantom(int(rng.integers(2**31)), settings)
            inputs, grid = network_inputs(phantom.hu, phantom.spacing_mm)
            logits = engine_logits(engine, inputs)
            for rule, labels in labels_by_rule(phantom.hu, logits, grid, phantom.coronary_labels).items():
                predicted = score_volume(phantom.hu, labels, phantom.spacing_mm,
                                         z_positions_mm=phantom.z_positions_mm).agatston_total
                reference = phantom.reference["agatston_total"]
                rows.setdefault(rule, []).append({"reference": reference, "reference_category": risk_category(reference),
                                                  "predicted": predicted, "predicted_category": risk_category(predicted)})
        for rule, rule_rows in rows.items():
            print(json.dumps({"set": set_name, "seed": SETS[set_name], "rule": rule, **summary(rule_rows)}), flush=True)


if __name__ == "__main__":
    main()
