"""``cacflow score-scan DICOM_DIR``: score one visit's folder, print one JSON object
with the fields of a ``scans.parquet`` row (the quick path for checking one scan)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from cacflow.model.engines import ENGINE_CHOICES

NAME = "score-scan"
HELP = "score one visit's DICOM folder and print the result as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dicom_dir", type=Path, help="folder with the visit's DICOM files (any layout)")
    parser.add_argument("--engine", default=None, choices=ENGINE_CHOICES,
                        help="inference engine (default: the config's, normally auto)")
    parser.add_argument("--model", default=None,
                        help="model folder, e.g. results/model after fine-tuning; relative to the current directory "
                             "(default: the config's model; empty: the shipped one)")
    parser.add_argument("--participant-id", default=None, help="recorded in the output (default null)")
    parser.add_argument("--visit", default=None, help="recorded in the output (default null)")
    parser.add_argument("--configfile", type=Path, default=None,
                        help="a cacflow config.yaml whose qc/scoring settings to use (default: the shipped one)")
    parser.add_argument("--lesions", action="store_true", help="include the lesion list")
    parser.add_argument("--keep-dir", type=Path, default=None, help="keep the NIfTI and label volumes here")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from cacflow.config import check_model, load_config

    config = load_config(args.configfile)
    if args.model is not None:
        config["model"] = args.model
    check_model(config, NAME)
    result = score_scan(args.dicom_dir, config, engine=args.engine or config["engine"],
                        participant_id=args.participant_id, visit=args.visit, keep_dir=args.keep_dir)
    if not args.lesions:
        result.pop("lesions")
    print(json.dumps(result, indent=2, default=_json_default))
    return 0


def score_scan(dicom_dir, config: dict, engine: str = "auto", participant_id=None, visit=None,
               keep_dir: Path | None = None, loaded: dict | None = None) -> dict:
    """One visit's scans row (and its ``lesions``). ``loaded``: a dict the caller keeps
    across visits, holding the engine once it is loaded (about 1.4 s a load), so a
    manifest of visits loads it once; an engine that fails to load is tried again at
    the next visit that reaches inference."""
    from cacflow import pipeline
    from cacflow.convert import load_volume
    from cacflow.manifest import VisitEntry

    entry = VisitEntry(participant_id or "", visit or "", str(Path(dicom_dir).resolve()))
    digest = pipeline.settings_hash({k: config[k] for k in ("qc", "scoring")})
    series_rows, state = pipeline.discover_entry(entry)
    _, state = pipeline.select_visit(series_rows, state, config)
    scores, lesions = None, []
    with tempfile.TemporaryDirectory(prefix="cacflow-score-scan-") as scratch:
        work = Path(keep_dir) if keep_dir else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if state["status"] == pipeline.PENDING:
            pipeline.convert_visit(state, work, config)
        if state["status"] == pipeline.PENDING:
            loaded = {} if loaded is None else loaded
            if "inferer" not in loaded:
                loaded["inferer"] = pipeline.Inferer(engine, config)
            inferer = loaded["inferer"]
            volume = load_volume(state["nifti_path"], state.get("slice_thickness_mm"))
            inferer.infer_visit(state, volume, work)
            scores, lesions = pipeline.score_visit(state, volume, pipeline.load_labels(state["labels_path"]), config)
    from cacflow import tables

    row = pipeline.scan_row(state, scores, digest)
    row.update(participant_id=participant_id, visit=visit)
    # Every scans.parquet column, null where it does not apply (cohort-only columns left out).
    cohort_only = {"shard", "reference_agatston_total", "reference_risk_category"}
    row = {name: row.get(name) for name in tables.schema("scans").names if name not in cohort_only}
    row["lesions"] = [{k: v for k, v in lesion.items() if k not in ("participant_id", "visit")} for lesion in lesions]
    return row


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")
