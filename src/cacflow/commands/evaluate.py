"""``cacflow evaluate --predicted scans.parquet --reference reference.tsv --out-dir DIR``:
agreement of predicted scores with reference scores, in the form of Eng et al. 2021
(risk-category kappa, sensitivity/specificity/PPV/NPV/F1 at CAC >= 1, 10, 100, 400,
ICC, Bland-Altman, per vessel, overall and per scan type, with 95 % CIs).

Writes DIR/report.html, DIR/metrics.csv, DIR/metrics.parquet and DIR/pairs.csv and
prints a short summary. With ``--score-manifest MANIFEST`` it first scores every
visit of MANIFEST (``score-scan``'s logic) into the ``--predicted`` Parquet; without
``--reference`` it stops there (the workflow's ``evaluation_scores`` step)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cacflow.model.engines import ENGINE_CHOICES

NAME = "evaluate"
HELP = "compare predicted scores with reference scores (kappa, sensitivity, ICC, Bland-Altman) as an HTML report"


# cacflow.evaluation's defaults, repeated so that building the parser of every
# cacflow command does not import scipy (a test checks that they agree).
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predicted", type=Path, required=True,
                        help="predicted scans table (scans.parquet, or TSV/CSV with participant_id, visit, "
                             "status, agatston_total, agatston_lm/lad/lcx/rca, optional scan_type); "
                             "with --score-manifest, the Parquet file to write")
    parser.add_argument("--reference", type=Path, default=None,
                        help="reference table (.tsv/.csv/.parquet): participant_id (or coca_id), visit (optional), "
                             "agatston_total, agatston_lm/lad/lcx/rca")
    parser.add_argument("--image-reference", action="store_true",
                        help="compare with the reference's image-based scores (image_agatston_*, which cohorts from "
                             "cacflow synth hold: what the scored series shows of the coronary plaques, noise "
                             "included) instead of its primary, noise-free ones")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for report.html and metrics.csv/.parquet")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap resamples for kappa/F1 CIs (default {DEFAULT_BOOTSTRAP}; 0: none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})")
    parser.add_argument("--title", default="cacflow evaluation: predicted vs reference", help="report title")
    parser.add_argument("--run-info", action="append", default=[], metavar="KEY=VALUE",
                        help="a line for the report's Run table (repeatable), e.g. 'cohort seed=777001'")
    scoring = parser.add_argument_group("scoring a manifest first")
    scoring.add_argument("--score-manifest", type=Path, default=None,
                         help="score every visit of this manifest TSV into --predicted before evaluating")
    scoring.add_argument("--engine", default=None, choices=ENGINE_CHOICES,
                         help="inference engine (default: the config's)")
    scoring.add_argument("--model", default=None,
                         help="model folder, e.g. results/model after fine-tuning; relative to the current directory "
                              "(default: the config's model; empty: the shipped one)")
    scoring.add_argument("--configfile", type=Path, default=None, help="a cacflow config.yaml to use")
    scoring.add_argument("--settings", type=json.loads, default=None,
                         help="JSON of config sections (qc, scoring) overriding the config, "
                              "as the workflow passes them")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from cacflow import evaluation

    if args.score_manifest is not None:
        from cacflow.config import check_model, load_config

        config = load_config(args.configfile)
        config.update(args.settings or {})
        if args.model is not None:
            config["model"] = args.model
        check_model(config, "evaluate")
        evaluation.score_manifest(args.score_manifest, args.predicted, engine=args.engine or config["engine"],
                                  config=config)
        print(f"scored {args.score_manifest} -> {args.predicted}", file=sys.stderr)
        if args.reference is None:
            return 0
    if args.reference is None or args.out_dir is None:
        print("cacflow evaluate: --reference and --out-dir are required (unless scoring only)", file=sys.stderr)
        return 2
    if args.bootstrap < 0:
        print("cacflow evaluate: --bootstrap must be >= 0", file=sys.stderr)
        return 2
    run_info = {"predicted": str(args.predicted), "reference": str(args.reference)}
    if args.image_reference:
        run_info["reference scores"] = "image-based (image_agatston_*: what the scan shows of the coronary plaques)"
    for item in args.run_info:
        key, _, value = item.partition("=")
        run_info[key.strip()] = value.strip()
    try:
        predicted = evaluation.read_table(args.predicted)
        reference = evaluation.read_table(args.reference)
        if args.image_reference:
            reference = evaluation.image_based_reference(reference)
        results = evaluation.evaluate(predicted, reference, n_bootstrap=args.bootstrap, seed=args.seed,
                                      run_info=run_info)
    except evaluation.EvaluationInputError as error:
        print(f"cacflow evaluate: {error}", file=sys.stderr)
        return 2
    html = evaluation.render_evaluation(results, args.out_dir / "report.html", title=args.title)
    paths = evaluation.write_evaluation_tables(results, args.out_dir)
    for line in evaluation.summary_lines(results):
        print(line)
    print(f"report {html}; metrics {paths['csv']}, {paths['parquet']}")
    return 0
