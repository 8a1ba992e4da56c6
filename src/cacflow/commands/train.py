"""``cacflow train``: train CalciumNet on generated phantoms (seeded, resumable), or
fine-tune it on COCA-format annotated scans (``--coca-root``)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from cacflow.model.quantization import CALIBRATION_PHANTOMS
from cacflow.model.preprocessing import INPUT_SETS
from cacflow.review_training import PATCH_REVIEW_PHANTOMS, REVIEW_PHANTOMS
from cacflow.training import ACQUISITION_RECIPES, SHIPPED_NEGATIVES_TUNE, TRAINING_DEVICES, NegativesTune

NAME = "train"
HELP = ("train the coronary calcium network on generated phantoms, or fine-tune it on COCA-format "
        "annotations (resumes from checkpoints)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, required=True, help="dataset cache and checkpoints")
    parser.add_argument("--model-dir", type=Path, required=True, help="where the trained model is written")
    parser.add_argument("--members", type=_members, default=None, metavar="VOLUMES:STEPS[,VOLUMES:STEPS...]",
                        help="phantoms and steps of each network of the ensemble (default: the shipped model's "
                             "recipe, 400:20000,800:30000); one pair trains a single network")
    parser.add_argument("--negatives-tune", type=_negatives_tune, default=None,
                        metavar="VOLUMES:STEPS|shipped|none",
                        help="then tune the trained network(s), all together, on this many phantoms with calcified "
                             "blobs scattered away from the arteries, for this many steps (default: shipped, the "
                             "shipped model's second stage, 400:5000 with perivascular blobs; none: stop after the "
                             "members; docs/evaluation.md). Not applied to a COCA fine-tune")
    parser.add_argument("--negatives-tune-learning-rate", type=_positive_float, default=None,
                        help=f"peak of a VOLUMES:STEPS tune's one-cycle schedule (default {NegativesTune.learning_rate})")
    parser.add_argument("--negatives-tune-perivascular", action="store_true",
                        help="a VOLUMES:STEPS tune's phantoms also hold calcified blobs beside the great vessels "
                             "(as --perivascular-calcium)")
    parser.add_argument("--negatives-tune-specks", action="store_true",
                        help="a VOLUMES:STEPS tune's phantoms also hold faint, tiny coronary plaques "
                             "(as --speck-lesions)")
    parser.add_argument("--steps", type=int, default=2000, help="steps of a COCA fine-tune")
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="crops per training step (default: the shipped recipe's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak of the one-cycle schedule")
    parser.add_argument("--coca-root", type=Path, default=None,
                        help="fine-tune on this COCA-format root (patient/<id>/<series>/, calcium_xml/<id>.xml)")
    parser.add_argument("--acquisition", choices=ACQUISITION_RECIPES, default="standard",
                        help="phantom acquisitions: standard (the shipped model's: pixels 0.30-0.85 mm, "
                             "100/120 kVp) or wide (0.30-0.98 mm, 80-140 kVp; tried and not adopted: "
                             "docs/evaluation.md)")
    parser.add_argument("--scattered-calcium", action="store_true",
                        help="training phantoms also hold calcified blobs scattered through the chest away from "
                             "the coronary arteries (negatives of any look; docs/evaluation.md, "
                             "\"Calcium of kinds the training never shows\")")
    parser.add_argument("--input-set", choices=tuple(INPUT_SETS), default="standard",
                        help="the network's input channels: standard (the shipped model's) or subcell (also the "
                             "calcium fraction of each quarter of a 1.5 mm pixel; starting weights with fewer "
                             "channels get zero weights for the new ones; docs/evaluation.md)")
    parser.add_argument("--artery-loss-weight", type=float, default=0.0, metavar="W",
                        help="above 0: the network also learns which artery each pixel lies on, calcified or not, "
                             "with this weight beside the calcium loss; the artery map is dropped before export "
                             "(phantoms only; tried and not adopted: docs/evaluation.md)")
    parser.add_argument("--perivascular-calcium", action="store_true",
                        help="training phantoms also hold calcified blobs, alone or in clusters and chains, just "
                             "outside the aorta, pulmonary trunk and superior vena cava (negatives that pass most "
                             "easily for the left main and proximal arteries; docs/evaluation.md)")
    parser.add_argument("--speck-lesions", action="store_true",
                        help="training phantoms also hold 1-3 faint, tiny coronary plaques at the edge of what a "
                             "scan shows (positives the risk mix holds in few scans; docs/evaluation.md)")
    parser.add_argument("--device", choices=TRAINING_DEVICES, default="auto",
                        help="auto: a CUDA GPU when torch sees one, else the CPU; cuda: fail without one")
    parser.add_argument("--init-weights", default=None,
                        help="start from these weights: 'packaged' (the shipped model) or a calciumnet.pt")
    parser.add_argument("--int8-calibration-phantoms", type=_non_negative, default=CALIBRATION_PHANTOMS,
                        help="phantoms calibrating the 8-bit copy of the graph that the CPU engine runs "
                             "(0: write none; the CPU engine then runs the float graph)")
    parser.add_argument("--review-phantoms", type=_review_phantoms, default=(0, 0),
                        metavar="WITH_SPECKS:WITHOUT",
                        help="then fit a second look at small calcium candidates on this many phantoms with faint "
                             "specks and without (default 0:0, the shipped model's recipe: none, the network decides "
                             "alone; tried and not adopted: %d:%d, docs/evaluation.md; never after a COCA "
                             "fine-tune)" % REVIEW_PHANTOMS)
    parser.add_argument("--patch-review-phantoms", type=_patch_review_phantoms, default=(0, 0, 0),
                        metavar="SPECKS:PLAIN:BLOBS[:UNFAMILIAR]",
                        help="then fit a small network that looks again at small candidates at 0.6 mm pixels "
                             "(cacflow.patch_review) on this many phantoms with faint specks, plain and with "
                             "calcified blobs, and optionally with specks and calcium of kinds the network never "
                             "sees (default 0:0:0: none; tried and not adopted: %d:%d:%d, docs/evaluation.md; "
                             "never after a COCA fine-tune)" % PATCH_REVIEW_PHANTOMS)
    parser.add_argument("--patch-review-min-share", type=float, default=0.01,
                        help="the patch review decides candidates with at least this coronary share from the "
                             "network (default 0.01; the eighth candidate: 0.1)")
    parser.add_argument("--patch-review-context", action="store_true",
                        help="the patch review also reads a 144 mm wide view of each candidate's slice, with the "
                             "chest wall, airways and heart around it (the ninth candidate, docs/evaluation.md)")
    parser.add_argument("--patch-review-scan-types", type=_scan_types, default=("gated", "nongated"),
                        metavar="TYPE[,TYPE]",
                        help="the scan types the patch review decides on: gated, nongated or both (default "
                             "gated,nongated); on the others the network's calls stand (the eleventh candidate: "
                             "gated)")


def _scan_types(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated scan types (cacflow.tables.SCAN_TYPE_VALUES)."""
    from cacflow.patch_review import checked_scan_types

    try:
        return checked_scan_types([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _integer_from(minimum: int, expected: str):
    """An argparse type: an integer of at least ``minimum``, else the message ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive = _integer_from(1, "a positive integer")
_non_negative = _integer_from(0, "0 or a positive integer")


def _members(text: str) -> tuple[tuple[int, int], ...]:
    try:
        members = tuple(tuple(int(n) for n in pair.split(":")) for pair in text.split(","))
    except ValueError:
        members = ()
    if not members or any(len(pair) != 2 or min(pair) < 1 for pair in members):
        raise argparse.ArgumentTypeError(f"expected VOLUMES:STEPS pairs of positive integers, e.g. 400:20000,800:30000; got {text!r}")
    return members


def _review_phantoms(text: str) -> tuple[int, int]:
    try:
        counts = tuple(int(n) for n in text.split(":"))
    except ValueError:
        counts = ()
    if len(counts) != 2 or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected WITH_SPECKS:WITHOUT, two counts of phantoms, e.g. 160:100; got {text!r}")
    return counts


def _patch_review_phantoms(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(":"))
    except ValueError:
        counts = ()
    if len(counts) not in (3, 4) or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected SPECKS:PLAIN:BLOBS[:UNFAMILIAR], three or four counts of phantoms, "
                                         f"e.g. 240:120:160; got {text!r}")
    return counts


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _negatives_tune(text: str) -> NegativesTune | str:
    """"shipped" or "none" as they are, else a tune of VOLUMES:STEPS with the default
    learning rate and blobs."""
    if text in ("shipped", "none"):
        return text
    pairs = _members(text)
    if len(pairs) != 1:
        raise argparse.ArgumentTypeError(f"expected one VOLUMES:STEPS pair, shipped or none, got {text!r}")
    return NegativesTune(*pairs[0])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cacflow.model.engines import ModelFiles
    from cacflow.disk import NotEnoughDiskSpace
    from cacflow.training import SHIPPED_MEMBERS, TrainingConfig, train

    init_weights = args.init_weights
    if init_weights == "packaged":
        init_weights = str(ModelFiles.packaged().torch_path)
    config = TrainingConfig(
        work_dir=str(args.work_dir), model_dir=str(args.model_dir), seed=args.seed,
        # A COCA fine-tune tunes whatever --init-weights holds: no member recipe.
        members=() if args.coca_root else args.members or SHIPPED_MEMBERS, steps=args.steps, workers=args.workers,
        coca_root=str(args.coca_root) if args.coca_root else None, init_weights=init_weights,
        device=args.device, acquisition=args.acquisition, scattered_calcium=args.scattered_calcium,
        perivascular_calcium=args.perivascular_calcium, speck_lesions=args.speck_lesions,
        input_set=args.input_set, artery_loss_weight=args.artery_loss_weight,
        int8_calibration_phantoms=args.int8_calibration_phantoms,
        review_phantoms=(0, 0) if args.coca_root else args.review_phantoms,
        patch_review_phantoms=(0, 0, 0) if args.coca_root else args.patch_review_phantoms,
        patch_review_min_share=args.patch_review_min_share, patch_review_context=args.patch_review_context,
        patch_review_scan_types=args.patch_review_scan_types,
    )
    tune = args.negatives_tune  # None: not given
    modifiers = (args.negatives_tune_perivascular or args.negatives_tune_specks
                 or args.negatives_tune_learning_rate is not None)
    if args.coca_root and (tune is not None or modifiers):
        print("cacflow train: --negatives-tune options cannot be combined with --coca-root (a COCA fine-tune "
              "tunes on the annotated scans only)", file=sys.stderr)
        return 2
    if isinstance(tune, NegativesTune):
        tune = replace(tune, perivascular_calcium=args.negatives_tune_perivascular,
                       speck_lesions=args.negatives_tune_specks,
                       learning_rate=args.negatives_tune_learning_rate or tune.learning_rate)
    elif modifiers:
        print("cacflow train: --negatives-tune-perivascular, --negatives-tune-specks and "
              "--negatives-tune-learning-rate need "
              "--negatives-tune VOLUMES:STEPS", file=sys.stderr)
        return 2
    # Not given: the shipped recipe's tune, except for a COCA fine-tune.
    config.negatives_tune = (None if args.coca_root or tune == "none"
                             else SHIPPED_NEGATIVES_TUNE if tune in (None, "shipped") else tune)
    if args.learning_rate:
        config.learning_rate = args.learning_rate
    if args.batch_size:
        config.batch_size = args.batch_size
    try:
        info = train(config)
    except NotEnoughDiskSpace as error:
        print(f"cacflow train: {error}", file=sys.stderr)
        return 1
    logging.getLogger("cacflow.train").info("model %s written to %s", info["model_version"], args.model_dir)
    return 0
