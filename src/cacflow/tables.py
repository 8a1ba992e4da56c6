"""The column contract of the cohort tables, as code.

One declaration per column (name, Arrow type, unit, definition, allowed values)
serves writing (``to_arrow``), checking (``validate``) and the data dictionary
(``cacflow.dictionary``), so the three cannot drift apart. Column names are a
contract with the users' analysis scripts: add columns, never rename them.

Conventions every table follows:
  * a missing value is a null, never NaN, an empty string or a sentinel number;
  * several codes in one cell are joined by ``LIST_SEPARATOR`` (a Stata/CSV
    export has no list type);
  * timestamps are UTC; naive datetimes are rejected rather than guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cacflow.atomic import atomic_write

# As written by cacflow.qc: codes and evidence items are short, messages are sentences.
LIST_SEPARATOR = "; "
MESSAGE_SEPARATOR = " | "

STATUS_VALUES = ("scored", "not_scorable", "failed")
QC_STATUS_VALUES = ("pass", "warn", "fail")
SCAN_TYPE_VALUES = ("gated", "nongated")
GATING_CONFIDENCE_VALUES = ("high", "medium", "low")
ORIENTATION_VALUES = ("axial", "tilted_axial", "oblique", "coronal", "sagittal")
VESSEL_VALUES = ("lm", "lad", "lcx", "rca")
RISK_CATEGORY_VALUES = ("0", "1-10", "11-100", "101-400", ">400")
# CAC-DRS: A0 carries no vessel count; any positive score has calcium in >= 1 vessel.
CAC_DRS_VALUES = ("A0",) + tuple(f"A{a}/N{n}" for a in (1, 2, 3) for n in (1, 2, 3, 4))

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")


class SchemaError(ValueError):
    """Rows or a table that do not follow the column contract."""


@dataclass(frozen=True)
class Column:
    name: str
    arrow_type: pa.DataType
    unit: str
    definition: str
    allowed_values: tuple[str, ...] = ()  # enforced for string columns; () = any
    nullable: bool = True
    min_value: float | None = None  # enforced for numeric columns

    def allowed_text(self) -> str:
        """Allowed values as one line of text, for the data dictionary."""
        if self.allowed_values:
            return "; ".join(self.allowed_values)
        if pa.types.is_boolean(self.arrow_type):
            return "true; false"
        if self.min_value is not None:
            return f">= {self.min_value:g}"
        return ""


def _c(name, arrow_type, unit, definition, allowed=(), *, nullable=True, min_value=None) -> Column:
    return Column(name, arrow_type, unit, definition, tuple(allowed), nullable, min_value)


_STR, _F64, _I32, _I8, _BOOL = pa.string(), pa.float64(), pa.int32(), pa.int8(), pa.bool_()

# Shared by several tables, declared once so the wording is identical.
_PARTICIPANT = _c(
    "participant_id", _STR, "",
    "Pseudonymised participant identifier, as given in the cohort manifest.",
    nullable=False,
)
_VISIT = _c(
    "visit", _STR, "",
    "Visit (imaging time point) label, as given in the cohort manifest.",
    nullable=False,
)
_MANUFACTURER = _c("manufacturer", _STR, "", "DICOM Manufacturer (0008,0070) of the scanner.")
_SCANNER_MODEL = _c(
    "scanner_model", _STR, "", "DICOM Manufacturer's Model Name (0008,1090) of the scanner."
)
_KVP = _c("kvp", _F64, "kV", "Peak tube voltage, DICOM KVP (0018,0060).", min_value=0)
_THICKNESS = _c(
    "slice_thickness_mm", _F64, "mm",
    "Nominal reconstructed slice thickness, DICOM Slice Thickness (0018,0050).",
    min_value=0,
)
_INCREMENT = _c(
    "slice_increment_mm", _F64, "mm",
    "Distance between adjacent slice centres, measured from Image Position (Patient) "
    "(0020,0032) along the slice normal (median over the series); not the nominal "
    "Spacing Between Slices.",
    min_value=0,
)
_GATED = _c(
    "gated", _BOOL, "",
    "True when the scan is judged ECG-gated, false when judged non-gated, null when the "
    "header evidence is insufficient. Inferred from DICOM headers; see Definitions: "
    "Gating inference.",
)
_GATING_CONFIDENCE = _c(
    "gating_confidence", _STR, "",
    "Confidence of the gating inference: 'high', 'medium' or 'low'. See Definitions: "
    "Gating inference.",
    GATING_CONFIDENCE_VALUES,
)
_SCAN_TYPE = _c(
    "scan_type", _STR, "",
    "Scan type the series is treated as: 'gated' (ECG-gated calcium-scoring CT) or "
    "'nongated' (routine chest CT). See Definitions: Scan type.",
    SCAN_TYPE_VALUES,
)
_QC_STATUS = _c(
    "qc_status", _STR, "",
    "Quality-control verdict: 'pass' (no problem found), 'warn' (scored, but a property "
    "may bias the score; see qc_reasons), 'fail' (not scorable).",
    QC_STATUS_VALUES,
)
_QC_REASONS = _c(
    "qc_reasons", _STR, "",
    f"Quality-control reason codes of the checks that did not pass, joined by "
    f"'{LIST_SEPARATOR}'; null when all passed. See Definitions: Quality control.",
)


def _agatston_vessel(vessel: str, full_name: str) -> Column:
    return _c(
        f"agatston_{vessel}", _F64, "Agatston units",
        f"Agatston score of calcium assigned to the {full_name}. See Definitions: Agatston score.",
        min_value=0,
    )


SCANS: list[Column] = [
    _PARTICIPANT,
    _VISIT,
    _c(
        "series_instance_uid", _STR, "",
        "DICOM Series Instance UID of the series scored for this visit; null when no "
        "series was chosen.",
    ),
    _c(
        "status", _STR, "",
        "Outcome for this visit: 'scored' (scores present), 'not_scorable' (no series "
        "passed selection and QC; see status_reason), 'failed' (processing error; see "
        "status_reason).",
        STATUS_VALUES, nullable=False,
    ),
    _c(
        "status_reason", _STR, "",
        "One sentence explaining the status that a person can act on (what to check or "
        "fix); for a scored scan, a note of any QC warning, or null.",
    ),
    _c(
        "agatston_total", _F64, "Agatston units",
        "Total coronary Agatston score (sum over LM, LAD, LCX and RCA); null unless "
        "status is 'scored'. See Definitions: Agatston score.",
        min_value=0,
    ),
    _agatston_vessel("lm", "left main coronary artery (LM)"),
    _agatston_vessel("lad", "left anterior descending artery (LAD)"),
    _agatston_vessel("lcx", "left circumflex artery (LCX)"),
    _agatston_vessel("rca", "right coronary artery (RCA)"),
    _c(
        "volume_mm3", _F64, "mm^3",
        "Calcium volume score over all coronary lesions. See Definitions: Volume score.",
        min_value=0,
    ),
    _c(
        "mass_mg", _F64, "mg",
        "Calcium mass score (calcium hydroxyapatite equivalent) over all coronary "
        "lesions; null when no calibration factor is available. See Definitions: Mass score.",
        min_value=0,
    ),
    _c(
        "lesion_count", _I32, "",
        "Number of lesions (per-slice connected components) counted in the Agatston "
        "score; equals the number of rows for this visit in the lesions table.",
        min_value=0,
    ),
    _c(
        "risk_category", _STR, "",
        "Agatston risk category (Rumberger). See Definitions: Risk category.",
        RISK_CATEGORY_VALUES,
    ),
    _c(
        "cac_drs", _STR, "",
        "CAC-DRS category (SCCT 2018), Agatston grade and number of vessels with "
        "calcium, e.g. 'A2/N3'. See Definitions: CAC-DRS.",
        CAC_DRS_VALUES,
    ),
    _c(
        "agatston_range_low", _F64, "Agatston units",
        "Total Agatston score if every calcium candidate whose coronary / not-coronary "
        "decision the model was unsure about is not coronary; equals agatston_total when "
        "there is no unsure decision. See Definitions: Model uncertainty.",
        min_value=0,
    ),
    _c(
        "agatston_range_high", _F64, "Agatston units",
        "Total Agatston score if every such unsure candidate is coronary. See "
        "Definitions: Model uncertainty.",
        min_value=0,
    ),
    _c(
        "risk_category_uncertain", _BOOL, "",
        "True when agatston_range_low and agatston_range_high fall in different risk "
        "categories: the category hangs on calcium the model was unsure about, so a "
        "reader should check the overlay (the scan is listed in the report). See "
        "Definitions: Model uncertainty.",
    ),
    _c(
        "outside_model_range", _BOOL, "",
        "True when the scan's in-plane pixel spacing lies outside the span the model was "
        "trained on (the shipped model: 0.30-0.85 mm; model.json training_ranges), e.g. "
        "a chest CT with a field of view over about 435 mm: the model is extrapolating "
        "and its agreement is lower (model card), so status_reason says so. Null for "
        "scans not scored, or when the model records no range.",
    ),
    _GATED,
    _GATING_CONFIDENCE,
    _SCAN_TYPE,
    _QC_STATUS,
    _QC_REASONS,
    _c(
        "blood_pool_hu", _F64, "HU",
        "Median HU of the cardiac blood pool, measured in the converted volume (a contrast "
        "check independent of the tags); null when it could not be measured (no pair of "
        "lungs in the field of view) or the visit was not converted. See Definitions: "
        "Quality control.",
    ),
    _c(
        "image_noise_hu", _F64, "HU",
        "Pixel noise of the converted volume: the median HU standard deviation in 5 mm "
        "windows of soft tissue. Above 30 HU the scan is flagged (noisy_image): small "
        "scores are less certain. Null when it could not be measured, the visit was not "
        "converted, or its row was kept from a run of a cacflow that did not measure it. "
        "See Definitions: Quality control.",
    ),
    _KVP,
    _THICKNESS,
    _INCREMENT,
    _MANUFACTURER,
    _SCANNER_MODEL,
    _c(
        "threshold_hu", _F64, "HU",
        "Calcium threshold applied for this scan (130 HU unless kVp adjustment is on).",
    ),
    _c(
        "min_area_mm2", _F64, "mm^2",
        "Minimum lesion area applied for this scan; smaller components are ignored.",
        min_value=0,
    ),
    _c(
        "kvp_adjusted", _BOOL, "",
        "True when the threshold and density-weight cut-offs were adjusted to the tube "
        "voltage. See Definitions: Agatston score.",
    ),
    _c(
        "mass_calibration_mg_per_hu_mm3", _F64, "mg/(HU*mm^3)",
        "Calibration factor c used for the mass score; null when none.",
        min_value=0,
    ),
    _c(
        "mass_calibration_source", _STR, "",
        "Where the mass calibration factor came from (e.g. a phantom scan or a "
        "configured per-scanner value); null when no mass score was computed.",
    ),
    _c("mass_method", _STR, "", "How mass_mg was computed: 'integrated' or 'threshold' (see the "
       "Mass score definition); null when no mass score was computed.", ("integrated", "threshold")),
    _c(
        "engine", _STR, "",
        "Inference engine that produced the vessel labels, "
        "'<runtime>-<device>-<precision>'. See Definitions: Engine.",
    ),
    _c("model_version", _STR, "", "Version of the segmentation model. See Definitions: Provenance."),
    _c(
        "model_sha256", _STR, "",
        "SHA-256 of the model used: its network weights file, with its candidate review when it has one. "
        "See Definitions: Provenance.",
    ),
    _c(
        "pipeline_version", _STR, "",
        "cacflow version that produced this row. See Definitions: Provenance.",
    ),
    _c(
        "settings_hash", _STR, "",
        "Hash of the scoring and selection settings in effect. See Definitions: Provenance.",
    ),
    _c("shard", _STR, "", "Processing shard this visit belongs to. See Definitions: Provenance."),
    _c("processed_at", UTC_TIMESTAMP, "UTC", "When this scan was scored (UTC)."),
    _c(
        "reference_agatston_total", _F64, "Agatston units",
        "Ground-truth total Agatston score, present only for generated (synthetic) or "
        "annotated evaluation data; null for cohort data.",
        min_value=0,
    ),
    _c(
        "reference_risk_category", _STR, "",
        "Risk category of reference_agatston_total; null when no reference.",
        RISK_CATEGORY_VALUES,
    ),
]

LESIONS: list[Column] = [
    _PARTICIPANT,
    _VISIT,
    _c(
        "lesion_id", _I32, "",
        "Lesion number, unique within the visit (1, 2, ...).",
        nullable=False, min_value=1,
    ),
    _c(
        "vessel", _STR, "",
        "Coronary artery the lesion is assigned to: 'lm', 'lad', 'lcx', 'rca'. A lesion "
        "on a vessel boundary goes to the vessel holding most of its pixels.",
        VESSEL_VALUES, nullable=False,
    ),
    _c(
        "slice_index", _I32, "",
        "Axial slice index of the lesion, 0 = most inferior slice of the series.",
        min_value=0,
    ),
    _c("z_mm", _F64, "mm", "Position of the lesion's slice along the feet-head axis."),
    _c(
        "area_mm2", _F64, "mm^2",
        "Lesion area on its slice: pixel count x pixel area.",
        min_value=0,
    ),
    _c("peak_hu", _F64, "HU", "Highest attenuation in the lesion."),
    _c("mean_hu", _F64, "HU", "Mean attenuation of the lesion's pixels."),
    _c(
        "density_weight", _I8, "",
        "Agatston density weight from peak_hu: 1, 2, 3 or 4. See Definitions: Agatston score.",
        min_value=1,
    ),
    _c(
        "agatston", _F64, "Agatston units",
        "Lesion Agatston score: area_mm2 x density_weight x (slice increment / 3 mm).",
        min_value=0,
    ),
    _c(
        "volume_mm3", _F64, "mm^3",
        "Lesion volume: pixel count x pixel area x slice increment.",
        min_value=0,
    ),
    _c(
        "mass_mg", _F64, "mg",
        "Lesion mass; null when no calibration. See Definitions: Mass score.",
        min_value=0,
    ),
]

SERIES: list[Column] = [
    _PARTICIPANT,
    _VISIT,
    _c(
        "series_instance_uid", _STR, "", "DICOM Series Instance UID (0020,000E).",
        nullable=False,
    ),
    _c("series_number", _I32, "", "DICOM Series Number (0020,0011)."),
    _c(
        "series_description", _STR, "",
        "DICOM Series Description (0008,103E), a scanner protocol string.",
    ),
    _c("protocol_name", _STR, "", "DICOM Protocol Name (0018,1030)."),
    _c("modality", _STR, "", "DICOM Modality (0008,0060); 'CT' for scorable series."),
    _c(
        "image_type", _STR, "",
        "DICOM Image Type (0008,0008) values joined by '\\', e.g. 'ORIGINAL\\PRIMARY\\AXIAL'.",
    ),
    _MANUFACTURER,
    _SCANNER_MODEL,
    _KVP,
    _THICKNESS,
    _INCREMENT,
    _c("n_slices", _I32, "", "Number of axial images (slices) in the series.", min_value=0),
    _c("n_files", _I32, "", "Number of DICOM files in the series.", min_value=0),
    _c(
        "pixel_spacing_mm", _F64, "mm",
        "In-plane pixel size: DICOM Pixel Spacing (0028,0030), row spacing (the first "
        "value; CT pixels are square in practice).",
        min_value=0,
    ),
    _c("rows", _I32, "pixels", "DICOM Rows (0028,0010).", min_value=0),
    _c("columns", _I32, "pixels", "DICOM Columns (0028,0011).", min_value=0),
    _c(
        "fov_mm", _F64, "mm",
        "In-plane field of view: the larger of rows x row spacing and columns x column spacing.",
        min_value=0,
    ),
    _c(
        "orientation", _STR, "",
        "Slice orientation from Image Orientation (Patient) (0020,0037).",
        ORIENTATION_VALUES,
    ),
    _c(
        "spacing_deviation_pct", _F64, "%",
        "Largest deviation of a slice-to-slice step from the median step (slice_increment_mm), "
        "in percent of the median; large values mean uneven spacing.",
        min_value=0,
    ),
    _c(
        "n_gaps", _I32, "",
        "Number of slice-to-slice steps much larger than the median step (missing slices).",
        min_value=0,
    ),
    _c(
        "z_extent_mm", _F64, "mm",
        "Distance between the first and last slice centres along the slice normal.",
        min_value=0,
    ),
    _c(
        "gantry_tilt_deg", _F64, "degrees",
        "DICOM Gantry/Detector Tilt (0018,1120); null when absent.",
    ),
    _c("convolution_kernel", _STR, "", "DICOM Convolution Kernel (0018,1210)."),
    _c(
        "contrast_agent_tag", _BOOL, "",
        "True when DICOM Contrast/Bolus Agent (0018,0010) or Route (0018,1040) names a "
        "contrast agent; calcium scoring needs a non-contrast scan.",
    ),
    _GATED,
    _GATING_CONFIDENCE,
    _c(
        "gating_evidence", _STR, "",
        f"Header evidence behind the gating inference, items joined by '{LIST_SEPARATOR}' "
        "(e.g. 'TriggerTime=350 ms'); items that speak against gating start with 'against: '.",
    ),
    _SCAN_TYPE,
    _c("transfer_syntax", _STR, "", "DICOM Transfer Syntax UID (0002,0010) of the files."),
    _QC_STATUS,
    _QC_REASONS,
    _c(
        "qc_messages", _STR, "",
        f"One sentence per code in qc_reasons, in the same order, joined by '{MESSAGE_SEPARATOR}'.",
    ),
    _c(
        "chosen", _BOOL, "",
        "True for the one series scored for this visit.",
        nullable=False,
    ),
    _c(
        "selection_rank", _I32, "",
        "Rank among the visit's scorable series (1 = chosen); null for series that "
        "failed QC.",
        min_value=1,
    ),
    _c(
        "not_chosen_reason", _STR, "",
        "Why this series was not chosen (one sentence); null for the chosen series.",
    ),
    _c("shard", _STR, "", "Processing shard this series belongs to. See Definitions: Provenance."),
]

RUNS: list[Column] = [
    _c("run_id", _STR, "", "Identifier of the workflow update.", nullable=False),
    _c("started_at", UTC_TIMESTAMP, "UTC", "When the update started (UTC)."),
    _c("finished_at", UTC_TIMESTAMP, "UTC", "When the update finished (UTC)."),
    _c("pipeline_version", _STR, "", "cacflow version of the update."),
    _c("model_version", _STR, "", "Segmentation model version of the update."),
    _c("model_sha256", _STR, "", "SHA-256 of the model: its network weights file, with its candidate review "
       "when it has one."),
    _c("engine", _STR, "", "Inference engine used, '<runtime>-<device>-<precision>'."),
    _c("settings_hash", _STR, "", "Hash of the scoring and selection settings."),
    _c("n_scans", _I32, "", "Rows in the scans table after the update.", min_value=0),
    _c("n_scored", _I32, "", "Scans with status 'scored' after the update.", min_value=0),
    _c(
        "n_not_scorable", _I32, "", "Scans with status 'not_scorable' after the update.",
        min_value=0,
    ),
    _c("n_failed", _I32, "", "Scans with status 'failed' after the update.", min_value=0),
    _c("n_added", _I32, "", "Scans added by the update.", min_value=0),
    _c("n_rescored", _I32, "", "Scans processed again by the update (a changed model, setting or code).",
       min_value=0),
    _c(
        "n_removed", _I32, "",
        "Scans removed by the update (withdrawn participants and visits no longer in the manifest).",
        min_value=0,
    ),
    _c("n_withdrawn", _I32, "", "Scans removed because their participant withdrew.", min_value=0),
    _c("added_scans", _STR, "", "The scans added, as 'participant_id/visit' joined by ';'."),
    _c("rescored_scans", _STR, "", "The scans processed again, as 'participant_id/visit' joined by ';'."),
    _c("failed_scans", _STR, "", "Scans added or rescored whose status is 'failed', as 'participant_id/visit' "
       "joined by ';'."),
    _c("removed_scans", _STR, "", "Scans that left the manifest, as 'participant_id/visit' joined by ';'. "
       "Withdrawn participants are counted in n_withdrawn and never listed."),
]

TABLES: dict[str, list[Column]] = {
    "scans": SCANS,
    "lesions": LESIONS,
    "series": SERIES,
    "runs": RUNS,
}

TABLE_DESCRIPTIONS: dict[str, str] = {
    "scans": "One row per manifest row (participant visit): the chosen series, the scores "
    "and their provenance, or why the visit was not scored.",
    "lesions": "One row per calcified lesion (connected component on one axial slice) "
    "counted in a scored visit.",
    "series": "One row per DICOM series discovered for a visit, with header facts, QC "
    "verdict and whether it was chosen for scoring.",
    "runs": "One row per workflow update of the cohort tables.",
}

# Columns that identify a row; validate() rejects duplicates.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "scans": ("participant_id", "visit"),
    "lesions": ("participant_id", "visit", "lesion_id"),
    "series": ("participant_id", "visit", "series_instance_uid"),
    "runs": ("run_id",),
}


def columns(name: str) -> list[Column]:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; tables are {sorted(TABLES)}") from None


def schema(name: str) -> pa.Schema:
    """Arrow schema of a table; units and definitions travel as field metadata."""
    return pa.schema(
        [
            pa.field(
                c.name, c.arrow_type, nullable=c.nullable,
                metadata={"unit": c.unit, "definition": c.definition},
            )
            for c in columns(name)
        ],
        metadata={"cacflow.table": name},
    )


def empty_table(name: str) -> pa.Table:
    return schema(name).empty_table()


def to_arrow(name: str, rows: list[dict] | pd.DataFrame) -> pa.Table:
    """Build a contract-conforming table from row dicts or a DataFrame.

    Declared columns that are absent become nulls; an undeclared column raises, so
    every column that reaches users is in the data dictionary. Values are cast to the
    declared type without loss (1.5 into an integer column raises); NaN becomes null.
    """
    cols = columns(name)
    declared = {c.name for c in cols}
    if isinstance(rows, pd.DataFrame):
        data = {column: rows[column] for column in rows.columns}
    else:
        keys = dict.fromkeys(k for row in rows for k in row)
        data = {k: [row.get(k) for row in rows] for k in keys}
    n = len(rows)
    undeclared = [k for k in data if k not in declared]
    if undeclared:
        raise SchemaError(
            f"{name}: undeclared column(s) {undeclared}; declare them in cacflow.tables first"
        )
    arrays = []
    for col in cols:
        if col.name in data:
            arrays.append(_to_array(name, col, data[col.name]))
        else:
            arrays.append(pa.nulls(n, col.arrow_type))
    table = pa.Table.from_arrays(arrays, schema=schema(name))
    validate(name, table)
    return table


def _to_array(table_name: str, col: Column, values) -> pa.Array:
    where = f"{table_name}.{col.name}"
    try:
        inferred = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"{where}: values cannot be read as one type ({exc})") from None
    if isinstance(inferred, pa.ChunkedArray):
        inferred = inferred.combine_chunks()
    if pa.types.is_dictionary(inferred.type):  # pandas categoricals
        inferred = inferred.dictionary_decode()
    source, target = inferred.type, col.arrow_type
    if pa.types.is_null(source):
        return pa.nulls(len(inferred), target)
    # Only same-kind casts: a string is never parsed into a number or a date here,
    # because a silently parsed "1,5" or "03/04" is worse than an error.
    compatible = (
        (pa.types.is_string(target) and (pa.types.is_string(source) or pa.types.is_large_string(source)))
        or (pa.types.is_boolean(target) and pa.types.is_boolean(source))
        or (
            (pa.types.is_integer(target) or pa.types.is_floating(target))
            and (pa.types.is_integer(source) or pa.types.is_floating(source))
        )
        or (pa.types.is_timestamp(target) and pa.types.is_timestamp(source) and source.tz is not None)
    )
    if not compatible:
        hint = " (naive datetimes are rejected: give a UTC time)" if pa.types.is_timestamp(source) else ""
        raise SchemaError(f"{where}: cannot store {source} values as {target}{hint}")
    try:
        return inferred.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"{where}: {exc}") from None


def validate(name: str, table: pa.Table) -> None:
    """Raise SchemaError listing every way ``table`` breaks the contract of ``name``."""
    cols = columns(name)
    problems = []
    expected = [c.name for c in cols]
    if table.column_names != expected:
        missing = [c for c in expected if c not in table.column_names]
        extra = [c for c in table.column_names if c not in expected]
        problems.append(
            f"columns differ from the contract (missing {missing}, undeclared {extra})"
            if missing or extra
            else "columns are not in the declared order"
        )
    for col in cols:
        if col.name not in table.column_names:
            continue
        data = table.column(col.name)
        if not data.type.equals(col.arrow_type):
            problems.append(f"{col.name}: type {data.type}, expected {col.arrow_type}")
            continue
        if not col.nullable and data.null_count:
            problems.append(f"{col.name}: {data.null_count} null(s) in a required column")
        if col.allowed_values:
            bad = pc.filter(data, pc.invert(pc.is_in(data, pa.array(col.allowed_values))))
            bad_values = sorted({v for v in bad.to_pylist() if v is not None})
            if bad_values:
                problems.append(
                    f"{col.name}: value(s) {bad_values[:5]} not in {list(col.allowed_values)}"
                )
        if col.min_value is not None:
            n_below = pc.sum(pc.less(data, col.min_value)).as_py() or 0
            if n_below:
                problems.append(f"{col.name}: {n_below} value(s) below {col.min_value:g}")
    key = list(TABLE_KEYS[name])
    if not problems and table.num_rows:
        counts = table.group_by(key).aggregate([([], "count_all")])
        duplicated = counts.filter(pc.greater(counts["count_all"], 1))
        if duplicated.num_rows:
            example = duplicated.slice(0, 1).to_pylist()[0]
            problems.append(f"{duplicated.num_rows} duplicated key(s) {key}, e.g. {example}")
    if problems:
        raise SchemaError(f"{name}: " + "; ".join(problems))


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    with atomic_write(path) as handle:
        pq.write_table(table, handle)
    return Path(path)


def write_table(name: str, rows: list[dict] | pd.DataFrame | pa.Table, path: str | os.PathLike) -> Path:
    """Convert (or check) ``rows`` against the contract of ``name``, then write atomically."""
    if isinstance(rows, pa.Table):
        validate(name, rows)
        table = rows
    else:
        table = to_arrow(name, rows)
    return write_parquet_atomic(table, path)


def read_parquet(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)
