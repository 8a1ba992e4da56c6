"""Figures of a trained model on generated scans it never saw (the model card's numbers).

    python tests/benchmarks/model_checks.py src/cacflow/model/weights \\
        [--validation 60] [--holdout 40] [--noncoronary 40] [--unfamiliar 40] [--specks 0] [--thin 40]
        [--outside 40]
        [--workers 2]

* validation: 60 phantoms, seed 55000001 (the set that chooses between models);
* hold-out: 40 phantoms, seed 99000001 (reported, never used to choose);
* non-coronary: 40 phantoms without coronary calcium but with aortic wall, aortic
  valve or mitral annulus calcium, seed 31000001 (share scored 0; target >= 95 %);
* unfamiliar: 40 phantoms without coronary calcium but with calcium of kinds the
  training phantoms never hold (lung granulomas, hilar lymph nodes, costal cartilage,
  breast arteries: ``cacflow.synth.phantom.UNFAMILIAR_CALCIUM_KINDS``) beside the
  usual distractors, seed 41000001: the share scored 0, and which kinds the model
  called coronary. How a simulator-trained model meets calcium it has not learnt.
  ``--noncoronary-seed`` / ``--unfamiliar-seed`` draw these two from other seeds: a
  candidate designed after seeing a set's failures is judged on fresh ones
  (32000001 and 42000001 for the sixth candidate, docs/evaluation.md).
* specks (only when asked for, e.g. --specks 40): phantoms with no planned coronary
  lesions but 1-3 faint, tiny coronary plaques each (``PhantomSettings.speck_lesions``;
  about 40 % of them score 0, so some scans are negatives), seed 23000001 unless
  --specks-seed names another: sensitivity for calcium at the edge of what a scan
  shows, where the model's misses lie (docs/evaluation.md).
* thin: 40 phantoms reconstructed as 1.25 mm slices, thinner than any training scan
  (2.5-5 mm slices; some at half increments, so 1.25 mm apart, but never 1.25 mm
  thick, with its higher noise); thin recons are common in chest CT archives.
  Seed 12500001.
* outside_wide_fov, outside_kvp_80, outside_kvp_140: 40 phantoms each with an
  acquisition the training set never holds (``cacflow.training.ACQUISITION_CHANGES``):
  non-gated chest CT at 0.86-0.98 mm pixels (440-500 mm field of view; training stops
  at 0.85 mm), or every scan at 80 or at 140 kVp (training: 100 and 120). Each has a
  control with the same seed, so the same patients, inside the training ranges
  (control_nongated: non-gated at 0.60-0.85 mm; control_kvp: kVp as drawn), so the
  difference is the acquisition's alone. Seeds in ``OUTSIDE_CHECKS``.
* gap_gated_0.5_0.6: gated scans at 0.50-0.60 mm pixels, between the gated
  (0.30-0.50 mm) and non-gated (0.60-0.85 mm) training spans, which
  ``outside_model_range`` counts as inside; control_gated: the same patients at
  0.30-0.50 mm.

All are drawn with the training distribution (``randomised_phantom_settings``) but
other seeds, the last two groups with their acquisition changed as described; ``snakemake evaluate`` is the end-to-end evaluation from DICOM. Prints
one JSON object per check (the per-scan rows with --scans). About 5 s per scan on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging

from cacflow.training import holdout_check, noncoronary_check, unfamiliar_calcium_check

# Checks outside the training distribution: (name, acquisition change, seed). Each
# control images the same patients as its checks (same seed) within the training ranges.
OUTSIDE_CHECKS = (
    ("outside_wide_fov", "wide_fov", 98_000_001),
    ("control_nongated", "nongated", 98_000_001),
    ("outside_kvp_80", "kvp_80", 8_000_001),
    ("outside_kvp_140", "kvp_140", 8_000_001),
    ("control_kvp", None, 8_000_001),
    ("gap_gated_0.5_0.6", "gated_gap", 56_000_001),
    ("control_gated", "gated", 56_000_001),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--validation", type=int, default=60, help="validation phantoms (0: skip)")
    parser.add_argument("--holdout", type=int, default=40, help="hold-out phantoms (0: skip)")
    parser.add_argument("--noncoronary", type=int, default=40, help="non-coronary-calcium-only phantoms (0: skip)")
    parser.add_argument("--unfamiliar", type=int, default=40,
                        help="phantoms with calcium of kinds training never shows, and no coronary calcium (0: skip)")
    parser.add_argument("--specks", type=int, default=0,
                        help="phantoms whose only coronary calcium is 1-3 faint, tiny plaques (default 0: skip; "
                             "the fourth fine-tune's check, docs/evaluation.md, used 40)")
    parser.add_argument("--thin", type=int, default=40, help="phantoms at 1.25 mm slices (0: skip)")
    parser.add_argument("--outside", type=int, default=40,
                        help="phantoms per acquisition check (440-500 mm non-gated fields of view, 80 kVp, "
                             "140 kVp, gated 0.50-0.60 mm pixels) and per control (0: skip)")
    parser.add_argument("--noncoronary-seed", type=int, default=31_000_001,
                        help="seed of the non-coronary check (default 31000001; a fresh one for a candidate "
                             "designed after that set's results, docs/evaluation.md)")
    parser.add_argument("--unfamiliar-seed", type=int, default=41_000_001,
                        help="seed of the unfamiliar check (default 41000001; likewise)")
    parser.add_argument("--specks-seed", type=int, default=23_000_001,
                        help="seed of the speck check (default 23000001; likewise)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scans", action="store_true", help="print the per-scan rows too")
    parser.add_argument("--engine", choices=("onnxruntime", "onnxruntime-fp32"), default="onnxruntime",
                        help="onnxruntime: the model's int8 copy of its graph when it has one (what the workflow "
                             "runs on a CPU); onnxruntime-fp32: the float graph")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder, workers, engine = args.model_dir, args.workers, args.engine
    checks = [
        ("validation", args.validation, lambda n: holdout_check(folder, n, 55_000_001, workers, engine=engine)),
        ("holdout", args.holdout, lambda n: holdout_check(folder, n, 99_000_001, workers, engine=engine)),
        ("noncoronary", args.noncoronary, lambda n: noncoronary_check(folder, n, args.noncoronary_seed, workers, engine=engine)),
        ("unfamiliar", args.unfamiliar,
         lambda n: unfamiliar_calcium_check(folder, n, args.unfamiliar_seed, workers, engine=engine)),
        ("specks", args.specks,
         lambda n: holdout_check(folder, n, args.specks_seed, workers, change="specks", engine=engine)),
        ("thin", args.thin, lambda n: holdout_check(folder, n, 12_500_001, workers, change="thin", engine=engine)),
        *[(name, args.outside, lambda n, change=change, seed=seed: holdout_check(
            folder, n, seed, workers, change=change, engine=engine)) for name, change, seed in OUTSIDE_CHECKS],
    ]
    for name, n_scans, check in checks:
        if n_scans > 0:
            result = check(n_scans)
            if not args.scans:
                result.pop("scans")
            print(json.dumps({"check": name, **result}), flush=True)


if __name__ == "__main__":
    main()
