"""``cacflow stage NAME ...``: one workflow stage for one shard (called by the
Snakemake rules; logs go to stderr, which the rules redirect to their log file)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

NAME = "stage"
HELP = "run one workflow stage (used by the Snakemake rules)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    plan = stages.add_parser("plan", help="assign manifest rows to shards")
    plan.add_argument("--manifest", required=True, type=Path)
    plan.add_argument("--shards-dir", required=True, type=Path)
    plan.add_argument("--shard-size", required=True, type=int)
    plan.add_argument("--withdrawals", default=None, type=Path)
    plan.add_argument("--out", required=True, type=Path)

    discover = stages.add_parser("discover", help="read DICOM headers of a shard's visits")
    discover.add_argument("--members", required=True, type=Path)
    discover.add_argument("--out-series", required=True, type=Path)
    discover.add_argument("--out-visits", required=True, type=Path)

    select = stages.add_parser("select", help="QC every series and choose one per visit")
    select.add_argument("--series", required=True, type=Path)
    select.add_argument("--visits", required=True, type=Path)
    select.add_argument("--settings", required=True, type=json.loads)
    select.add_argument("--out-series", required=True, type=Path)
    select.add_argument("--out-visits", required=True, type=Path)

    convert = stages.add_parser("convert", help="convert chosen series with dcm2niix")
    convert.add_argument("--visits", required=True, type=Path)
    convert.add_argument("--nifti-dir", required=True, type=Path)
    convert.add_argument("--settings", required=True, type=json.loads)
    convert.add_argument("--out-visits", required=True, type=Path)

    infer = stages.add_parser("infer", help="label coronary calcium per vessel")
    infer.add_argument("--visits", required=True, type=Path)
    infer.add_argument("--engine", default="auto")
    infer.add_argument("--model", default="", help="model folder (the config's model; empty: the shipped one)")
    infer.add_argument("--settings", required=True, type=json.loads)
    infer.add_argument("--labels-dir", required=True, type=Path)
    infer.add_argument("--out-visits", required=True, type=Path)

    score = stages.add_parser("score", help="Agatston, volume and mass scores")
    score.add_argument("--visits", required=True, type=Path)
    score.add_argument("--settings", required=True, type=json.loads)
    score.add_argument("--out-scans", required=True, type=Path)
    score.add_argument("--out-lesions", required=True, type=Path)

    aggregate = stages.add_parser("aggregate", help="build the cohort tables")
    aggregate.add_argument("--scans", nargs="+", required=True, type=Path)
    aggregate.add_argument("--lesions", nargs="+", required=True, type=Path)
    aggregate.add_argument("--series", nargs="+", required=True, type=Path)
    aggregate.add_argument("--reference", action="append", default=[], type=Path)
    aggregate.add_argument("--withdrawals", default="")
    aggregate.add_argument("--plan", type=Path, help="plan.tsv: only visits in the current manifest")
    aggregate.add_argument("--out-dir", required=True, type=Path)

    dictionary = stages.add_parser("dictionary", help="write the data dictionary")
    dictionary.add_argument("--out-dir", required=True, type=Path)

    report = stages.add_parser("report", help="write the cohort QC report")
    report.add_argument("--cohort-dir", required=True, type=Path)
    report.add_argument("--infer", nargs="*", default=[], type=Path)
    report.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cacflow import pipeline

    if args.stage == "plan":
        pipeline.stage_plan(args.manifest, args.shards_dir, args.shard_size, args.out, args.withdrawals)
    elif args.stage == "discover":
        pipeline.stage_discover(args.members, args.out_series, args.out_visits)
    elif args.stage == "select":
        pipeline.stage_select(args.series, args.visits, args.settings, args.out_series, args.out_visits)
    elif args.stage == "convert":
        pipeline.stage_convert(args.visits, args.nifti_dir, args.settings, args.out_visits)
    elif args.stage == "infer":
        pipeline.stage_infer(args.visits, args.engine, {**args.settings, "model": args.model}, args.labels_dir,
                             args.out_visits)
    elif args.stage == "score":
        pipeline.stage_score(args.visits, args.settings, args.out_scans, args.out_lesions)
    elif args.stage == "aggregate":
        pipeline.stage_aggregate(args.scans, args.lesions, args.series, args.reference,
                                 args.withdrawals or None, args.out_dir, args.plan)
    elif args.stage == "dictionary":
        from cacflow.dictionary import write_data_dictionary

        write_data_dictionary(args.out_dir)
    elif args.stage == "report":
        pipeline.stage_report(args.cohort_dir, args.infer, args.out)
    return 0
