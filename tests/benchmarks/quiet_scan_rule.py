"""The sixteenth candidate's tables: 0.4.0's calls, and what the artery map would add
in quiet scans (docs/evaluation.md, "The artery map on unsure candidates of quiet
scans only").

    python tests/benchmarks/quiet_scan_rule.py validation 55000001 60 \
        --artery-checkpoint work14/checkpoint.pt > validation.jsonl
    python tests/benchmarks/quiet_scan_rule.py cohort 888001 120 --only P001/baseline,P089/baseline ...
    python tests/benchmarks/quiet_scan_rule.py --rule validation.jsonl specks23.jsonl

Sets: ``validation``, ``holdout`` and ``specks`` (``cacflow.training.check_phantom_draws``,
the last with the specks change), ``noncoronary`` and ``unfamiliar`` (drawn as
``noncoronary_check`` and ``unfamiliar_calcium_check`` draw them), and ``cohort`` (a
cohort's scans of record, HU rounded as DICOM stores them; ``--only`` names the
participant/visit pairs to read).

For every scan: the shipped model's Agatston score (its int8 graph, the shipped
decision and scorer), the generator's noise and the image's (``cacflow.pixel_noise``),
the references, and every in-slice candidate of at least 1 mm^2 with a coronary share
of at least 0.02: share, most probable artery, the artery map's share (the fourteenth
candidate's artery output, fp32, from its training checkpoint: ``cacflow train
--artery-loss-weight 0.1``, recipe in docs/evaluation.md; null without
``--artery-checkpoint``), area, peak HU and whether it holds a planted coronary plaque.

With ``--fine-artery-map WEIGHTS`` (``fine_artery_map.py train``) each candidate also
gets ``fine_artery_share``, the full-resolution map's mean over its pixels (the
eighteenth candidate); ``--rule --artery-key fine_artery_share`` counts its rule.

``--rule`` reads such tables and prints, for the pre-registered rule and its
neighbours, positives found and zero scans scored above 0. A scan is positive when the
shipped model scores it above 0 or the rule adds a candidate (the rule only adds, and
any in-slice candidate of 1 mm^2 at >= 130 HU scores above 0). About 10-60 s per scan
on 2 cores, most of it drawing the phantoms.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

MIN_AREA_MM2 = 1.0  # Agatston's
KEPT_SHARE = 0.02  # candidates below it are not tabled: no rule here calls them
# The pre-registered rules: (noise cut HU, lowest share, lowest artery share), the
# sixteenth's on the 1.5 mm map and the eighteenth's on the full-resolution one.
RULE = (30.0, 0.1, 0.5)
FINE_RULE = (30.0, 0.1, 0.9)


def artery_map(checkpoint: Path):
    import torch

    from cacflow.model.network import build_network, first_layer_channels

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["network"]
    n_members = len({key.split(".")[1] for key in state if key.startswith("members.")}) or 1
    network = build_network(first_layer_channels(state), (16, 24, 32, 48, 64), n_members, artery_head=True)
    network.load_state_dict(state)
    return network.eval()


def artery_shares(network, inputs, grid, candidates, chosen: np.ndarray) -> np.ndarray:
    """Each chosen candidate's mean artery probability over its voxels, the artery map
    run on their slices only."""
    import torch

    from cacflow.inference import BATCH_SLICES, calcium_cell_probabilities, summed_by_component

    z, y, x = candidates.voxels
    on_chosen = np.isin(candidates.of_voxel, chosen)
    slices = np.unique(z[on_chosen])
    logits = np.zeros((len(inputs), 5, grid.padded_height, grid.padded_width), np.float32)
    with torch.no_grad():
        for start in range(0, len(slices), BATCH_SLICES):
            batch = slices[start:start + BATCH_SLICES]
            logits[batch] = network.forward_with_arteries(torch.from_numpy(np.ascontiguousarray(inputs[batch])))[1].numpy()
    probabilities = calcium_cell_probabilities(logits, grid, z[on_chosen], y[on_chosen], x[on_chosen])
    votes = summed_by_component(candidates.of_voxel[on_chosen], probabilities, candidates.count + 1)
    return (votes[:, 1:].sum(axis=1) / np.maximum(votes.sum(axis=1), 1e-12))[chosen]


def analyse(phantom, segmenter, network, fine_map=None) -> dict:
    from cacflow.inference import candidate_votes, engine_logits
    from cacflow.model.preprocessing import network_inputs
    from cacflow.pixel_noise import pixel_noise_hu
    from cacflow.qc import scan_type_of
    from cacflow.scoring import score_volume

    hu, spacing = phantom.hu, phantom.spacing_mm
    settings = phantom.metadata["settings"]
    labels = segmenter.segment(hu, spacing, scan_type=scan_type_of(settings["gated"])).labels
    predicted = score_volume(hu, labels, spacing, z_positions_mm=phantom.z_positions_mm).agatston_total
    inputs, grid = network_inputs(hu, spacing, segmenter.threshold_hu, input_set=segmenter.input_set)
    candidates = candidate_votes(hu, engine_logits(segmenter.engine, inputs), grid, segmenter.threshold_hu)
    rows = []
    if candidates.count:
        share = candidates.coronary_share
        area = candidates.areas_mm2(spacing[1] * spacing[2])
        chosen = np.flatnonzero((area >= MIN_AREA_MM2) & (share >= KEPT_SHARE))
        chosen = chosen[chosen > 0]
        if len(chosen):
            arteries = (artery_shares(network, inputs, grid, candidates, chosen) if network is not None
                        else [None] * len(chosen))
            peaks = ndimage.maximum(hu, candidates.components, index=chosen)
            coronary = candidates.holding(phantom.coronary_labels > 0)
            vessel = candidates.votes[:, 1:].argmax(axis=1) + 1
            rows = [{"share": float(share[k]), "vessel": int(vessel[k]), "artery_share": None if a is None else float(a),
                     "area": float(area[k]), "peak": float(p), "coronary": bool(coronary[k])}
                    for k, a, p in zip(chosen, arteries, peaks)]
            if fine_map is not None:
                from fine_artery_map import fine_artery_shares

                for row, fine in zip(rows, fine_artery_shares(fine_map, hu, candidates.components, chosen, spacing[1])):
                    row["fine_artery_share"] = fine
    return {"gated": bool(settings["gated"]), "noise_hu": settings["noise_hu"], "pixel_mm": float(spacing[1]),
            "image_noise_hu": pixel_noise_hu(hu, spacing[1]), "reference": phantom.reference["agatston_total"],
            "image_reference": phantom.reference["image_agatston_total"], "predicted": float(predicted),
            "candidates": rows}


def phantoms(kind: str, seed: int, n: int, only: set[str] | None):
    """(name, phantom) of each scan of the set."""
    from cacflow.synth.cohort import noncoronary_calcium, scan_of_record, visit_plans
    from cacflow.synth.phantom import UNFAMILIAR_CALCIUM_KINDS, generate_phantom
    from cacflow.training import _phantoms_showing, check_phantom_draws

    def visible_unfamiliar(phantom):
        return [d["kind"] for d in phantom.distractors
                if d["kind"] in UNFAMILIAR_CALCIUM_KINDS and d["agatston_if_scored"] > 0]

    if kind in ("validation", "holdout", "specks"):
        for index, draw in enumerate(check_phantom_draws(n, seed, "specks" if kind == "specks" else None)):
            yield index, generate_phantom(*draw)
    elif kind in ("noncoronary", "unfamiliar"):
        changes = ({"n_coronary_lesions": 0, "device_probability": 0.3} if kind == "noncoronary"
                   else {"n_coronary_lesions": 0, "unfamiliar_calcium": True})
        kinds_of = noncoronary_calcium if kind == "noncoronary" else visible_unfamiliar
        for index, (_, phantom, _) in enumerate(_phantoms_showing(np.random.default_rng(seed), n, kinds_of, **changes)):
            yield index, phantom
    else:
        for plan in visit_plans(n, "demo", seed):
            name = f"{plan.participant}/{plan.visit}"
            record = None if only is not None and name not in only else scan_of_record(plan, seed, "demo")
            if record is not None:
                yield name, replace(record[1], hu=np.rint(record[1].hu).astype(np.float32))


def added_calls(scan: dict, noise_cut_hu: float, min_share: float, min_artery_share: float,
                artery_key: str = "artery_share") -> list[dict]:
    """The candidates the rule calls coronary beyond the shipped model's calls (a
    missing or NaN ``artery_key`` never reaches the threshold)."""
    if scan["image_noise_hu"] is None or scan["image_noise_hu"] >= noise_cut_hu:
        return []
    return [c for c in scan["candidates"]
            if min_share <= c["share"] < 0.5 and (c.get(artery_key) or 0.0) >= min_artery_share
            and c["area"] >= MIN_AREA_MM2]


def rule_counts(scans: list[dict], rule: tuple[float, float, float] | None, artery_key: str = "artery_share") -> dict:
    """Positives found and zero scans scored above 0 (by the noise-free reference), and
    which scans the rule changed; ``rule`` None is the shipped model alone."""
    counts = {"found": 0, "positives": 0, "false": 0, "negatives": 0, "found_added": [], "false_added": []}
    for scan in scans:
        added = bool(rule) and bool(added_calls(scan, *rule, artery_key=artery_key))
        positive = scan["predicted"] > 0 or added
        kind = ("found", "positives") if scan["reference"] > 0 else ("false", "negatives")
        counts[kind[1]] += 1
        counts[kind[0]] += positive
        if positive and scan["predicted"] == 0:
            counts[f"{kind[0]}_added"].append(scan["scan"])
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", nargs="?", choices=("validation", "holdout", "specks", "noncoronary", "unfamiliar", "cohort"))
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("n", nargs="?", type=int, help="scans, or the cohort's participants")
    parser.add_argument("--only", help="cohort: comma-separated participant/visit pairs")
    parser.add_argument("--artery-checkpoint", type=Path,
                        help="the fourteenth candidate's checkpoint.pt; without it artery_share is null")
    parser.add_argument("--fine-artery-map", type=Path, help="the eighteenth's weights (fine_artery_map.py train)")
    parser.add_argument("--rule", nargs="+", metavar="TABLE", help="read tables instead and print the rules' counts")
    parser.add_argument("--artery-key", default="artery_share", choices=("artery_share", "fine_artery_share"),
                        help="--rule: the map whose share the rules read")
    args = parser.parse_args(argv)
    if args.rule:
        for path in args.rule:
            scans = [json.loads(line) for line in open(path)]
            print(json.dumps({"table": path, "rule": "shipped", **rule_counts(scans, None)}))
            fine = args.artery_key == "fine_artery_share"
            cuts, shares, artery = (25.0, 30.0, 35.0, float("inf")), (0.05, 0.1, 0.2), (0.0, 0.5, 0.9 if fine else 0.55)
            for rule in itertools.product(cuts, shares, artery):
                print(json.dumps({"table": path, "rule": list(rule), "preregistered": rule == (FINE_RULE if fine else RULE),
                                  **rule_counts(scans, rule, args.artery_key)}))
        return
    if args.set is None or args.seed is None or args.n is None:
        parser.error("give SET SEED N, or --rule TABLE ...")
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine

    model = ModelFiles(Path(__file__).resolve().parents[2] / "src/cacflow/model/weights")
    segmenter = CalciumSegmenter.for_model(create_engine("onnxruntime", model, threads=2), model)
    network = artery_map(args.artery_checkpoint) if args.artery_checkpoint else None
    fine_map = None
    if args.fine_artery_map:
        from fine_artery_map import load_map  # beside this script, first on sys.path when it runs

        fine_map = load_map(args.fine_artery_map)
    only = set(args.only.split(",")) if args.only else None
    for name, phantom in phantoms(args.set, args.seed, args.n, only):
        print(json.dumps({"set": args.set, "seed": args.seed, "scan": name,
                          **analyse(phantom, segmenter, network, fine_map)}), flush=True)


if __name__ == "__main__":
    main()
