"""The per-shard stage functions the Snakemake rules call (via ``cacflow stage``).

Every stage reads the previous stage's per-visit table and writes its own. A
visit carries a ``status`` (``pending`` until scored, then ``scored``,
``not_scorable`` or ``failed``) and a ``status_reason``; each visit is processed
in isolation, so one bad scan is recorded and the shard still completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cacflow import __version__
from cacflow.atomic import atomic_write_bytes
from cacflow.progress import Progress

log = logging.getLogger("cacflow.pipeline")

PENDING, SCORED, NOT_SCORABLE, FAILED = "pending", "scored", "not_scorable", "failed"


# --- small helpers -----------------------------------------------------------------

def visit_file_stem(participant_id: str, visit: str) -> str:
    """A file name for a visit: readable, filesystem-safe, and collision-free
    (a short hash of the exact ids disambiguates ids that sanitise alike)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{participant_id}_{visit}")[:80]
    digest = hashlib.sha256(f"{participant_id}\0{visit}".encode()).hexdigest()[:8]
    return f"{safe}_{digest}"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Internal per-shard tables (not the cohort contract): Parquet, atomic."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    # Columns from every row: pyarrow alone takes them from the first row and would drop
    # a key that row lacks (e.g. the scores, when the shard's first visit was not scored).
    names = list(dict.fromkeys(name for row in rows for name in row))
    table = pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows]) if rows else pa.table({})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_rows(path: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _fresh_folder(folder: str | Path) -> None:
    """Empty a stage's image folder before the stage (re)runs: volumes of an earlier
    run must not outlive it."""
    import shutil

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _failure_reason(stage: str, error: BaseException) -> str:
    log.error("%s failed:\n%s", stage, "".join(traceback.format_exception(error)))
    return f"{stage} failed: {error}"


# --- plan ------------------------------------------------------------------------

def stage_plan(manifest_path: Path, shards_dir: Path, shard_size: int, out_plan: Path,
               withdrawals_path: Path | None = None) -> None:
    from cacflow.manifest import read_manifest, read_withdrawals
    from cacflow.sharding import plan_shards, write_plan

    entries, warnings = read_manifest(manifest_path)
    for warning in warnings:
        log.warning("manifest %s", warning)
    withdrawn = read_withdrawals(withdrawals_path)
    if withdrawn:
        kept = [entry for entry in entries if entry.participant_id not in withdrawn]
        log.info("withdrawals: %d manifest rows of withdrawn participants are not scheduled", len(entries) - len(kept))
        entries = kept
    plan = plan_shards(entries, shards_dir, shard_size)
    write_plan(plan, out_plan)
    log.info("plan: %d visits in %d shards", len(plan), len({shard for shard, _ in plan}))


# --- discover --------------------------------------------------------------------

DISCOVERY_MESSAGES = {
    "dicom_dir_missing": "the DICOM folder given in the manifest does not exist; check the manifest path",
    "dicom_dir_not_a_directory": "the manifest's dicom_dir is a file, not a folder; give the visit's folder",
    "dicom_dir_empty": "the DICOM folder is empty; the visit's images were not exported",
    "no_dicom_files": "the folder holds no readable DICOM files; check the export (files unreadable or not DICOM)",
    "directory_unreadable": "the DICOM folder cannot be read (permissions); ask for read access",
}


def discover_entry(entry, header_cache=None) -> tuple[list[dict], dict]:
    """Series rows (with their sorted file lists) and the visit row for one manifest entry.

    ``header_cache``: a :class:`cacflow.header_cache.HeaderCache` (unchanged files are not read again).
    """
    from cacflow.discover import discover_visit

    found = discover_visit(entry.dicom_dir, cache=header_cache) if entry.dicom_dir else None
    visit = {"participant_id": entry.participant_id, "visit": entry.visit, "status": PENDING, "status_reason": None}
    if found is None:
        visit.update(status=NOT_SCORABLE, status_reason="the manifest gives no dicom_dir for this visit")
        return [], visit
    visit.update(n_series=len(found.series), n_files_seen=found.n_files_seen, n_unreadable=len(found.unreadable))
    if found.unreadable:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(found.unreadable_counts().items()))
        log.warning("%s %s: %d files not used (%s)", entry.participant_id, entry.visit, len(found.unreadable), counts)
        visit["unreadable_summary"] = counts
    if not found.series:
        message = DISCOVERY_MESSAGES.get(found.reason or "", found.reason or "no DICOM series found")
        detail = f": {visit['unreadable_summary']}" if found.unreadable else ""
        visit.update(status=NOT_SCORABLE, status_reason=f"{message} [{found.reason}{detail}]")
    series = []
    for record in found.series:
        row = record.to_row()
        row.update(participant_id=entry.participant_id, visit=entry.visit, files=list(record.files))
        series.append(row)
    return series, visit


def stage_discover(members_path: Path, out_series: Path, out_visits: Path, header_cache: Path | None = None) -> None:
    """``header_cache``: the shard's header cache file (default: ``header_cache.parquet``
    beside ``out_series``); read first, rewritten (atomically) once the shard is done."""
    from cacflow.header_cache import HeaderCache, cache_path
    from cacflow.sharding import read_members

    entries = read_members(members_path)
    cache = HeaderCache.load(header_cache or cache_path(Path(out_series).parent))
    progress = Progress("discover", len(entries), log)
    all_series, visits = [], []
    for entry in entries:
        try:
            series, visit = discover_entry(entry, header_cache=cache)
        except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
            series, visit = [], {"participant_id": entry.participant_id, "visit": entry.visit,
                                 "status": FAILED, "status_reason": _failure_reason("discovery", error)}
        all_series.extend(series)
        visits.append(visit)
        progress.step()
    log.info("discover: %d file headers read, %d unchanged files taken from the header cache",
             cache.reads, cache.hits)
    cache.save()
    write_rows(all_series, out_series)
    write_rows(visits, out_visits)


# --- select ----------------------------------------------------------------------

def qc_settings_from_config(settings: dict):
    from cacflow.qc import QCSettings

    qc = settings["qc"]
    return QCSettings(
        scoring_thickness_mm=tuple(qc["gated_thickness_mm"]),
        max_thickness_mm=float(qc["nongated_max_thickness_mm"]),
        expected_kvp=float(qc["expected_kvp"]),
        blood_pool_contrast_hu=float(qc.get("blood_pool_contrast_hu", 200.0)),
    )


def record_from_row(row: dict):
    """Rebuild a SeriesRecord from its discover-stage row."""
    from dataclasses import fields

    from cacflow.discover import SeriesRecord

    values = {f.name: row.get(f.name) for f in fields(SeriesRecord) if f.name != "duplicate_files"}
    values["image_type"] = tuple(filter(None, (row.get("image_type") or "").split("\\")))
    values["files"] = list(row.get("files") or [])
    return SeriesRecord(**values)


# Columns of the chosen series that travel with the visit to the scans table.
CHOSEN_SERIES_FIELDS = {
    "series_instance_uid": "series_uid", "kvp": "kvp", "slice_thickness_mm": "slice_thickness_mm",
    "slice_increment_mm": "slice_increment_mm", "manufacturer": "manufacturer",
    "scanner_model": "manufacturer_model", "n_slices": "n_slices", "files": "files",
}


def select_visit(series_rows: list[dict], visit: dict, settings: dict) -> tuple[list[dict], dict]:
    """QC every series of one visit and choose the one to score."""
    from cacflow.qc import qc_series
    from cacflow.selection import select_series

    qc_settings = qc_settings_from_config(settings)
    records = [record_from_row(row) for row in series_rows]
    pairs = [(record, qc_series(record, qc_settings)) for record in records]
    qc_by_uid = {record.series_uid: qc for record, qc in pairs}
    out_rows = []
    if visit["status"] == PENDING or series_rows:
        selection = select_series(pairs, prefer_gated=True, settings=qc_settings)
        ranking = {r.series_uid: r for r in selection.ranked}
        for row in series_rows:
            qc = qc_by_uid[row["series_uid"]]
            ranked = ranking[row["series_uid"]]
            out = dict(row)
            out.update(qc.to_row())
            out.update(chosen=ranked.chosen, selection_rank=ranked.rank, not_chosen_reason=ranked.reason_not_chosen)
            out_rows.append(out)
        if visit["status"] == PENDING:
            _apply_selection(visit, selection, qc_by_uid, series_rows, settings)
    return out_rows, visit


def _apply_selection(visit, selection, qc_by_uid, series_rows, settings) -> None:
    if selection.chosen_uid is None:
        visit.update(status=NOT_SCORABLE, status_reason=selection.visit_reason)
        return
    qc = qc_by_uid[selection.chosen_uid]
    if selection.scan_type == "nongated" and not settings["qc"]["score_nongated"]:
        visit.update(status=NOT_SCORABLE, status_reason=(
            "no ECG-gated series; the best series is non-gated chest CT, which this run is configured "
            "not to score (qc.score_nongated: false)"))
        return
    chosen = next(row for row in series_rows if row["series_uid"] == selection.chosen_uid)
    for column, field_name in CHOSEN_SERIES_FIELDS.items():
        visit[column] = chosen.get(field_name)
    visit.update(
        gated=qc.gating.gated, gating_confidence=qc.gating.confidence, scan_type=qc.scan_type,
        qc_status=qc.status, qc_reasons=qc.qc_reasons or None, selection_note=selection.visit_reason,
    )


def stage_select(series_path: Path, visits_path: Path, settings: dict, out_series: Path, out_visits: Path) -> None:
    series_rows, visits = read_rows(series_path), read_rows(visits_path)
    by_visit: dict[tuple, list[dict]] = {}
    for row in series_rows:
        by_visit.setdefault((row["participant_id"], row["visit"]), []).append(row)
    progress = Progress("select", len(visits), log)
    all_series = []
    for visit in visits:
        rows = by_visit.get((visit["participant_id"], visit["visit"]), [])
        try:
            selected, visit = select_visit(rows, visit, settings)
        except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
            selected = [dict(row, qc_status="fail", qc_reasons="qc_error", chosen=False) for row in rows]
            visit.update(status=FAILED, status_reason=_failure_reason("quality control", error))
        all_series.extend(selected)
        progress.step()
    write_rows(all_series, out_series)
    write_rows(visits, out_visits)


# --- convert ---------------------------------------------------------------------

def convert_visit(visit: dict, nifti_dir: Path, settings: dict) -> dict:
    from cacflow.convert import ConversionError, convert_series, load_volume

    target = Path(nifti_dir) / f"{visit_file_stem(visit['participant_id'], visit['visit'])}.nii"
    try:
        convert_series(list(visit["files"]), target, expected_slices=visit.get("n_slices"))
        visit["nifti_path"] = str(target)
    except ConversionError as error:
        visit.update(status=FAILED, status_reason=f"conversion failed: {error}")
        return visit
    volume = load_volume(target)
    check_blood_pool(visit, volume, settings)
    check_image_noise(visit, volume, settings)
    return visit


def reason_codes(qc_reasons: str | None) -> list[str]:
    """The QC codes of a ``qc_reasons`` value (codes joined by ``qc.LIST_SEPARATOR``)."""
    from cacflow.qc import LIST_SEPARATOR

    return [code for code in (qc_reasons or "").split(LIST_SEPARATOR) if code]


def check_blood_pool(visit: dict, volume, settings: dict) -> None:
    """The image's own contrast check: a contrast-enhanced scan is not scored, an
    unmeasurable one is flagged (tags can be blank, so they are not enough)."""
    from cacflow.blood_pool import measure_blood_pool
    from cacflow.qc import blood_pool_contrast_check

    measured = measure_blood_pool(volume.hu, volume.spacing_mm)
    visit["blood_pool_hu"] = measured.hu
    log.info("%s %s: blood pool %s (%s)", visit["participant_id"], visit["visit"],
             "unmeasured" if measured.hu is None else f"{measured.hu:.0f} HU", measured.note)
    _apply_image_check(visit, blood_pool_contrast_check(measured.hu, qc_settings_from_config(settings)))


def check_image_noise(visit: dict, volume, settings: dict) -> None:
    """The image's pixel noise: a noisy scan is scored and flagged, as its small scores
    are less certain."""
    from cacflow.pixel_noise import pixel_noise_hu
    from cacflow.qc import image_noise_check

    in_plane_mm = (float(volume.spacing_mm[1]) + float(volume.spacing_mm[2])) / 2
    visit["image_noise_hu"] = pixel_noise_hu(volume.hu, in_plane_mm)
    _apply_image_check(visit, image_noise_check(visit["image_noise_hu"], qc_settings_from_config(settings)))


def _apply_image_check(visit: dict, check) -> None:
    """Add a check on the converted image to the visit's QC verdict: a failed one makes
    it not scorable."""
    from cacflow.qc import FAIL, LIST_SEPARATOR, PASS

    if check.status == PASS:
        return
    visit["qc_reasons"] = LIST_SEPARATOR.join([*reason_codes(visit.get("qc_reasons")), check.code])
    if check.status == FAIL:
        visit.update(qc_status=FAIL, status=NOT_SCORABLE, status_reason=f"{check.message} [{check.code}]")
    elif visit.get("qc_status") == PASS:
        visit["qc_status"] = check.status


def stage_convert(visits_path: Path, nifti_dir: Path, settings: dict, out_visits: Path) -> None:
    visits = read_rows(visits_path)
    _fresh_folder(nifti_dir)
    todo = [visit for visit in visits if visit["status"] == PENDING]
    progress = Progress("convert", len(todo), log)
    for visit in todo:
        try:
            convert_visit(visit, nifti_dir, settings)
        except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
            visit.update(status=FAILED, status_reason=_failure_reason("conversion", error))
        progress.step()
    write_rows(visits, out_visits)


# --- infer -----------------------------------------------------------------------

class Inferer:
    """One engine for a whole shard (or one ``score-scan``): loaded once. ``settings``
    holds the config's ``scoring`` section and its ``model`` (empty: the shipped one)."""

    def __init__(self, engine_kind: str, settings: dict):
        from cacflow.inference import CalciumSegmenter
        from cacflow.model.engines import ModelFiles, create_engine

        self.settings = settings
        self.model = ModelFiles.chosen(settings.get("model"))
        self.engine = create_engine(engine_kind, self.model)
        self.segmenter = CalciumSegmenter.for_model(self.engine, self.model,
                                                    threshold_hu=float(settings["scoring"]["threshold_hu"]))
        log.info("engine %s, model %s (sha256 %s)", self.engine.label, self.model.version, self.model.sha256[:12])

    def provenance(self) -> dict:
        return {"engine": self.engine.label, "model_version": self.model.version, "model_sha256": self.model.sha256}

    def infer_visit(self, visit: dict, volume, labels_dir: Path) -> dict:
        import nibabel as nib

        from cacflow.nifti_io import save_like
        from cacflow.scoring import agatston_range

        started = time.perf_counter()
        segmentation = self.segmenter.segment(volume.hu, volume.spacing_mm, scan_type=visit.get("scan_type"))
        stem = visit_file_stem(visit["participant_id"], visit["visit"])
        target = Path(labels_dir) / f"{stem}.labels.nii.gz"
        like = nib.load(visit["nifti_path"])
        save_like(segmentation.labels, like, target)
        # The unsure calls, for the reviewer's overlay (only where there are any).
        unsure = segmentation.labels != segmentation.flipped_labels
        unsure_path = Path(labels_dir) / f"{stem}.unsure.nii.gz" if unsure.any() else None
        if unsure_path is not None:
            save_like(unsure.astype(np.uint8), like, unsure_path)
        # How far the score moves if every decision the model was unsure of went the
        # other way; scored here, where the probabilities are, with the scan's settings.
        low, high = agatston_range(
            volume.hu, segmentation.labels, segmentation.flipped_labels, volume.spacing_mm,
            scoring_settings_for(self.settings, visit.get("kvp")), kvp=visit.get("kvp"),
            z_positions_mm=volume.z_positions_mm,
        )
        visit.update(self.provenance(), labels_path=str(target), infer_seconds=time.perf_counter() - started,
                     n_calcium_candidates=segmentation.n_candidates, n_coronary_candidates=segmentation.n_coronary,
                     n_ambiguous_candidates=segmentation.n_ambiguous, agatston_range_low=low,
                     agatston_range_high=high, unsure_labels_path=str(unsure_path) if unsure_path else None,
                     outside_model_range=_negated(self.model.within_training_range(volume.spacing_mm)))
        return visit


def _negated(flag: bool | None) -> bool | None:
    return None if flag is None else not flag


def stage_infer(visits_path: Path, engine_kind: str, settings: dict, labels_dir: Path, out_visits: Path) -> None:
    """Volumes are read ahead on a worker thread while the engine runs."""
    from concurrent.futures import ThreadPoolExecutor

    from cacflow.convert import load_volume

    visits = read_rows(visits_path)
    _fresh_folder(labels_dir)
    todo = [visit for visit in visits if visit["status"] == PENDING]
    if not todo:  # nothing scorable in this shard: no model to load
        log.info("infer: no visit of this shard reached inference")
        write_rows(visits, out_visits)
        return
    inferer = Inferer(engine_kind, settings)
    progress = Progress("infer", len(todo), log)

    def read(visit):
        try:
            return load_volume(visit["nifti_path"], visit.get("slice_thickness_mm")), None
        except Exception as error:  # noqa: BLE001 - recorded for this visit
            return None, error

    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = [reader.submit(read, visit) for visit in todo[:2]]
        for position, visit in enumerate(todo):
            volume, error = ahead.pop(0).result()
            if position + 2 < len(todo):
                ahead.append(reader.submit(read, todo[position + 2]))
            try:
                if error is not None:
                    raise error
                inferer.infer_visit(visit, volume, labels_dir)
            except Exception as failure:  # noqa: BLE001 - one visit must never stop the shard
                visit.update(status=FAILED, status_reason=_failure_reason("inference", failure))
            progress.step()
    write_rows(visits, out_visits)


def load_labels(path: str | Path) -> np.ndarray:
    from cacflow.convert import load_volume

    return np.rint(load_volume(path).hu).astype(np.uint8)


# --- score -----------------------------------------------------------------------

SCAN_SCORE_FIELDS = (
    "agatston_total", "agatston_lm", "agatston_lad", "agatston_lcx", "agatston_rca", "volume_mm3", "mass_mg",
    "lesion_count", "risk_category", "cac_drs", "threshold_hu", "kvp_adjusted",
    "mass_calibration_mg_per_hu_mm3", "mass_calibration_source", "mass_method",
)
LESION_FIELDS = (
    "lesion_id", "vessel", "slice_index", "z_mm", "area_mm2", "peak_hu", "mean_hu", "density_weight",
    "agatston", "volume_mm3", "mass_mg",
)
# Visit columns that are internal to the shard (paths, file lists, timings), not cohort columns.
_INTERNAL_VISIT_FIELDS = {
    "files", "nifti_path", "labels_path", "n_slices", "n_series", "n_files_seen", "n_unreadable",
    "unreadable_summary", "infer_seconds", "n_calcium_candidates", "n_coronary_candidates", "selection_note",
    "n_ambiguous_candidates", "unsure_labels_path",
}


def scoring_settings_for(settings: dict, kvp: float | None):
    """ScoringSettings for one scan: the mass calibration depends on its kVp."""
    from cacflow.scoring import ScoringSettings

    scoring = settings["scoring"]
    calibration = next(
        (entry for entry in scoring["mass_calibration"] if kvp is not None and abs(entry["kvp"] - kvp) < 0.5),
        None,
    )
    return ScoringSettings(
        threshold_hu=float(scoring["threshold_hu"]),
        min_area_mm2=float(scoring["min_area_mm2"]),
        reference_increment_mm=float(scoring["reference_increment_mm"]),
        kvp_adjusted_thresholds=bool(scoring["kvp_adjusted_thresholds"]),
        mass_method=scoring.get("mass_method", "integrated"),
        mass_margin_mm=float(scoring.get("mass_margin_mm", 1.0)),
        mass_ring_mm=float(scoring.get("mass_ring_mm", 2.0)),
        mass_calibration_mg_per_hu_mm3=calibration["mg_per_hu_mm3"] if calibration else None,
        mass_calibration_source=f"config: {calibration['source']}" if calibration else
        f"none: no calibration configured for {kvp if kvp is not None else 'unknown'} kVp",
    )


def score_visit(visit: dict, volume, labels: np.ndarray, settings: dict) -> tuple[dict, list[dict]]:
    """The scans-table row (less provenance) and lesion rows for one scored visit."""
    from cacflow.scoring import risk_category, score_volume

    result = score_volume(
        volume.hu, labels, volume.spacing_mm, scoring_settings_for(settings, visit.get("kvp")),
        kvp=visit.get("kvp"), slice_thickness_mm=visit.get("slice_thickness_mm"), z_positions_mm=volume.z_positions_mm,
    )
    scan = {name: getattr(result, name) for name in SCAN_SCORE_FIELDS}
    low, high = visit.get("agatston_range_low"), visit.get("agatston_range_high")
    uncertain = None if low is None or high is None else risk_category(low) != risk_category(high)
    scan.update(
        status=SCORED,
        status_reason=_scored_reason(visit, bool(uncertain)),
        risk_category_uncertain=uncertain,
        slice_increment_mm=result.slice_increment_mm,
        min_area_mm2=float(settings["scoring"]["min_area_mm2"]),
    )
    lesions = [
        {"participant_id": visit["participant_id"], "visit": visit["visit"],
         **{name: getattr(lesion, name) for name in LESION_FIELDS}}
        for lesion in result.lesions
    ]
    return scan, lesions


OUTSIDE_MODEL_RANGE_NOTE = ("pixel spacing outside the range the model was trained on (outside_model_range); "
                            "expect lower agreement with a reader")


def _scored_reason(visit: dict, category_uncertain: bool = False) -> str | None:
    """Scored scans still say what a reader should know (non-gated, QC warnings, a risk
    category that hangs on calcium the model was unsure about). The wording is fixed
    so that the report can count scans per reason."""
    notes = []
    if category_uncertain:
        notes.append("review the overlay: the risk category depends on calcium the model was unsure is coronary "
                     "(agatston_range_low to agatston_range_high)")
    if visit.get("scan_type") == "nongated":
        notes.append("scored on non-gated chest CT (no gated series); expect lower agreement with gated scoring")
    if visit.get("outside_model_range"):
        notes.append(OUTSIDE_MODEL_RANGE_NOTE)
    if visit.get("qc_reasons"):
        notes.append(f"QC warnings: {visit['qc_reasons']}")
    return "; ".join(notes) or None


def scan_row(visit: dict, scores: dict | None, settings_digest: str) -> dict:
    row = {key: value for key, value in visit.items() if key not in _INTERNAL_VISIT_FIELDS}
    if scores:
        row.update(scores)
    else:  # the range was measured at inference, but this visit has no score to bracket
        row.update(agatston_range_low=None, agatston_range_high=None, risk_category_uncertain=None,
                   outside_model_range=None)
    row.update(pipeline_version=__version__, settings_hash=settings_digest,
               processed_at=datetime.now(timezone.utc))
    return row


def stage_score(visits_path: Path, settings: dict, out_scans: Path, out_lesions: Path) -> None:
    from cacflow.convert import load_volume

    visits = read_rows(visits_path)
    digest = settings_hash(settings)
    progress = Progress("score", sum(v["status"] == PENDING for v in visits), log)
    scans, lesions = [], []
    for visit in visits:
        scores = None
        if visit["status"] == PENDING:
            try:
                volume = load_volume(visit["nifti_path"], visit.get("slice_thickness_mm"))
                scores, visit_lesions = score_visit(visit, volume, load_labels(visit["labels_path"]), settings)
                lesions.extend(visit_lesions)
            except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
                visit.update(status=FAILED, status_reason=_failure_reason("scoring", error))
            progress.step()
        scans.append(scan_row(visit, scores, digest))
    write_rows(scans, out_scans)
    write_rows(lesions, out_lesions)


# --- aggregate -------------------------------------------------------------------

# discover/QC field -> series-table column, where the names differ.
SERIES_COLUMN_SOURCES = {
    "series_instance_uid": "series_uid", "scanner_model": "manufacturer_model",
    "pixel_spacing_mm": "pixel_spacing_row_mm",
}


def series_table_row(row: dict, shard: str, columns: list[str]) -> dict:
    out = {column: row.get(SERIES_COLUMN_SOURCES.get(column, column)) for column in columns}
    out["qc_reasons"] = out.get("qc_reasons") or None
    out["shard"] = shard
    return out


def _shard_of(path: Path) -> str:
    # results/shards/<shard>/<stage>/<file>.parquet
    return Path(path).parent.parent.name


def read_reference(paths: list[Path]) -> dict[tuple[str, str], dict]:
    import csv

    reference = {}
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                reference[(row["participant_id"], row["visit"])] = row
    return reference


def stage_aggregate(scan_paths, lesion_paths, series_paths, reference_paths, withdrawals_path, out_dir,
                    plan_path: Path | None = None, history_dir: Path | None = None) -> None:
    """Cohort tables from the shards, after applying withdrawals; then record the update."""
    from cacflow import history, tables
    from cacflow.manifest import read_withdrawals
    from cacflow.sharding import read_plan_keys
    from cacflow.withdrawals import purge_shards

    out_dir = Path(out_dir)
    history_dir = Path(history_dir or out_dir.parent / "history")
    withdrawn = read_withdrawals(withdrawals_path)
    shards_dir = Path(scan_paths[0]).parents[2] if scan_paths else None
    if shards_dir is not None:
        # Every shard job has finished (they are this job's inputs): a temp file left
        # there is from a killed write, and could hold a withdrawn participant's rows.
        from cacflow.atomic import remove_leftover_temp_files

        leftovers = remove_leftover_temp_files(shards_dir)
        if leftovers:
            log.info("removed %d temp files left by an interrupted run", leftovers)
    if withdrawn and shards_dir is not None:
        n_visits, n_files = purge_shards(shards_dir, withdrawn)
        log.info("withdrawals: %d withdrawn participants listed; %d of their visits removed from the shards, "
                 "%d derived image files deleted; none of their rows is in any cohort table",
                 len(withdrawn), n_visits, n_files)
    current = read_plan_keys(plan_path) if plan_path else None

    def keep(row: dict) -> bool:
        key = (row["participant_id"], row["visit"])
        return row["participant_id"] not in withdrawn and (current is None or key in current)

    scan_columns = set(tables.schema("scans").names)
    reference = read_reference(reference_paths)
    scans = []
    for path in scan_paths:
        for row in read_rows(path):
            if not keep(row):
                continue
            out = {column: value for column, value in row.items() if column in scan_columns}
            out["shard"] = _shard_of(path)
            truth = reference.get((row["participant_id"], row["visit"]))
            if truth and truth.get("agatston_total"):  # no reference score where nothing is scorable
                out["reference_agatston_total"] = float(truth["agatston_total"])
                out["reference_risk_category"] = truth["risk_category"]
            scans.append(out)
    lesions = [row for path in lesion_paths for row in read_rows(path) if keep(row)]
    series_columns = tables.schema("series").names
    series = [series_table_row(row, _shard_of(path), series_columns)
              for path in series_paths for row in read_rows(path) if keep(row)]
    apply_image_checks(series, scans)
    tables.write_table("scans", scans, out_dir / "scans.parquet")
    tables.write_table("lesions", lesions, out_dir / "lesions.parquet")
    tables.write_table("series", series, out_dir / "series.parquet")
    record = history.record_update(history_dir, scans, withdrawn, _provenance(scans))
    history.purge_withdrawn(history_dir, withdrawn)  # after counting them in this update
    tables.write_table("runs", history.runs_rows(history_dir), out_dir / "runs.parquet")
    log.info("update %s: %d added, %d rescored, %d removed (%d withdrawn), %d failed",
             record["run_id"], record["n_added"], record["n_rescored"], record["n_removed"],
             record["n_withdrawn"], len(record["failed_scans"]))
    _log_summary(scans, reference)


# QC codes of the checks run on the converted image (after selection), which the
# chosen series' row must show too.
IMAGE_CHECK_CODES = ("contrast_blood_pool", "blood_pool_unmeasured", "noisy_image")


def apply_image_checks(series: list[dict], scans: list[dict]) -> None:
    """Carry the image checks' outcome back to the chosen series' row: a series that
    failed one is no longer the chosen one, and says why."""
    from cacflow.qc import FAIL, LIST_SEPARATOR, MESSAGE_SEPARATOR, PASS, WARN

    found = {}
    for scan in scans:
        codes = [c for c in reason_codes(scan.get("qc_reasons")) if c in IMAGE_CHECK_CODES]
        if codes and scan.get("series_instance_uid"):
            found[(scan["participant_id"], scan["visit"], scan["series_instance_uid"])] = (codes, scan)
    for row in series:
        hit = found.get((row["participant_id"], row["visit"], row["series_instance_uid"]))
        if hit is None:
            continue
        codes, scan = hit
        old_codes = reason_codes(row.get("qc_reasons"))
        row["qc_reasons"] = LIST_SEPARATOR.join([*old_codes, *(c for c in codes if c not in old_codes)])
        if "contrast_blood_pool" in codes:
            message = scan.get("status_reason") or "contrast-enhanced blood pool"
            row.update(qc_status=FAIL, chosen=False,
                       not_chosen_reason=f"chosen, then failed the image check after conversion: {message}")
            row["qc_messages"] = MESSAGE_SEPARATOR.join(m for m in (row.get("qc_messages"), message) if m)
        else:
            messages = [_image_warning(code, scan) for code in codes]
            row["qc_messages"] = MESSAGE_SEPARATOR.join(m for m in (row.get("qc_messages"), *messages) if m)
            if row.get("qc_status") == PASS:
                row["qc_status"] = WARN


def _image_warning(code: str, scan: dict) -> str:
    """The sentence of an image check that warned (``IMAGE_CHECK_CODES``) on ``scan``."""
    from cacflow.qc import blood_pool_contrast_check, image_noise_check

    if code == "noisy_image":
        return image_noise_check(scan.get("image_noise_hu")).message
    return blood_pool_contrast_check(None).message


def _provenance(scans: list[dict]) -> dict:
    """Provenance of an update: that of its scored rows (one model and engine per run)."""
    def most_common(column):
        values = [row.get(column) for row in scans if row.get(column)]
        return max(set(values), key=values.count) if values else None

    return {"pipeline_version": __version__, "model_version": most_common("model_version"),
            "model_sha256": most_common("model_sha256"), "engine": most_common("engine"),
            "settings_hash": most_common("settings_hash")}


def _log_summary(scans: list[dict], reference: dict) -> None:
    from collections import Counter

    counts = Counter(row["status"] for row in scans)
    log.info("cohort: %d scans: %s", len(scans), ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    review = [row for row in scans if row["status"] == SCORED and row.get("risk_category_uncertain")]
    if review:
        log.info("review: in %d of %d scored scans the risk category depends on calls the model was unsure of "
                 "(risk_category_uncertain; listed in the report)", len(review), counts.get(SCORED, 0))
    compared = [row for row in scans if row["status"] == SCORED and row.get("reference_risk_category")]
    if compared:
        agree = sum(row["risk_category"] == row["reference_risk_category"] for row in compared)
        log.info("predicted vs reference: risk category agrees on %d of %d scored scans (%.1f %%)",
                 agree, len(compared), 100.0 * agree / len(compared))
        for row in sorted(compared, key=lambda r: (r["participant_id"], r["visit"])):
            log.info("  %s %s: predicted %.1f (%s), reference %.1f (%s)%s", row["participant_id"], row["visit"],
                     row["agatston_total"], row["risk_category"], row["reference_agatston_total"],
                     row["reference_risk_category"], ", flagged for review" if row.get("risk_category_uncertain") else "")


# --- report ----------------------------------------------------------------------

def stage_report(cohort_dir: Path, infer_paths: list[Path], out_html: Path) -> None:
    from cacflow import report, tables
    from cacflow.convert import load_volume

    scans = tables.read_parquet(Path(cohort_dir) / "scans.parquet").to_pandas()
    series = tables.read_parquet(Path(cohort_dir) / "series.parquet").to_pandas()
    lesions = tables.read_parquet(Path(cohort_dir) / "lesions.parquet").to_pandas()
    volumes = {(v["participant_id"], v["visit"]): v for path in infer_paths for v in read_rows(path)}
    overlays = {}
    for key in report.select_overlay_scans(scans):
        visit = volumes.get(key, {})
        if not visit.get("nifti_path") or not visit.get("labels_path"):
            continue
        try:
            volume = load_volume(visit["nifti_path"])
            labels = load_labels(visit["labels_path"])
            unsure = load_labels(visit["unsure_labels_path"]) > 0 if visit.get("unsure_labels_path") else None
            overlays[key] = [report.overlay_png(volume.hu[z], labels[z], unsure=None if unsure is None else unsure[z])
                             for z in report.pick_overlay_slices(volume.hu, labels, unsure=unsure)]
        except Exception as error:  # noqa: BLE001 - a missing picture must not stop the report
            log.warning("no overlay for %s %s: %s", key[0], key[1], error)
    report.render_report(scans, series, lesions, out_html, overlays=overlays,
                         run_info={"pipeline_version": __version__})
