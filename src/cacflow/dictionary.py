"""The data dictionary of the cohort tables: CSV for scripts, Markdown for people.

Every row comes from the column declarations in ``cacflow.tables``; this module
adds only the method definitions the columns refer to ("See Definitions: X").
The definitions are written for a paper's methods section: when the scoring or QC
code changes a rule, change the matching text in ``DEFINITIONS`` here.
Text is plain ASCII so the CSV opens cleanly in Stata and spreadsheet software.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pyarrow as pa

from cacflow.tables import (
    LIST_SEPARATOR,
    MESSAGE_SEPARATOR,
    TABLE_DESCRIPTIONS,
    TABLE_KEYS,
    TABLES,
    Column,
    atomic_write,
)

CSV_NAME = "data_dictionary.csv"
MARKDOWN_NAME = "data_dictionary.md"
CSV_FIELDS = ("table", "column", "type", "unit", "definition", "allowed_values")

# The mass formula lives here only; the column definitions point to it.
MASS_SCORE_DEFINITION = (
    "Calcium mass score (mg of calcium hydroxyapatite). Default method 'integrated' "
    "(mass_method): per lesion, c x voxel volume x sum of (HU - local background HU) over "
    "the lesion's pixels plus a margin of mass_margin_mm (default 1 mm, which covers the "
    "in-plane blur of a standard kernel) in its own slice and over the same footprint in "
    "the neighbouring slices (floor(thickness / increment) on each side), each voxel "
    "counted for one lesion only; the background is the median HU of a ring "
    "(mass_ring_mm, default 2 mm) around the margin, without calcium; a lesion's mass is "
    "at least 0. Method 'threshold': c x (mean HU of the lesion's pixels) x lesion volume. "
    "c is the calibration factor in mg/(HU*mm^3), c = rho_HA / (HU_HA - HU_water) with "
    "rho_HA in mg/mm^3, measured on a calibration phantom of known hydroxyapatite density; "
    "it is scanner- and kVp-specific. The factor used is stored in "
    "mass_calibration_mg_per_hu_mm3 and its origin in mass_calibration_source. Without a "
    "calibration for the scan's kVp, mass_mg is null: no default factor is ever assumed. "
    "Validation on a real QRM phantom scan is in docs/scoring.md."
)

DEFINITIONS: dict[str, str] = {
    "Agatston score": (
        "Agatston et al., J Am Coll Cardiol 1990;15:827-32. On each axial slice, pixels "
        "at or above the calcium threshold (130 HU, defined at 120 kVp; value used in "
        "threshold_hu) that lie inside a coronary artery label (LM, LAD, LCX or RCA, from "
        "the segmentation model) are grouped into lesions as 8-connected components "
        "within that slice (no connection across slices). Components smaller than the "
        "minimum area (default 1 mm^2; value used in min_area_mm2) are discarded. Each "
        "lesion scores its area in mm^2 times a density weight from its peak HU: "
        "130 <= peak < 200 -> 1, 200 <= peak < 300 -> 2, 300 <= peak < 400 -> 3, "
        "peak >= 400 -> 4. The scan score is the sum over all lesions on all slices "
        "multiplied by (slice increment / 3 mm), so that reconstructions other than "
        "contiguous 3 mm slices give a 3 mm-equivalent score and overlapping slices "
        "(increment < thickness) are not counted twice. The increment is measured from "
        "the Image Position (Patient) of consecutive slices, not taken from the nominal "
        "slice thickness. A lesion spanning two vessel labels is assigned to the vessel "
        "holding most of its pixels; agatston_total is the sum of the four vessel "
        "scores. When kvp_adjusted is true, the threshold and weight cut-offs follow "
        "the tube voltage (CalciumScoring.jl, after Grani et al.; HU cut-offs for "
        "weights 1/2/3/4: 70 kV 207/318/477/636, 80 kV 177/271/408/544, 100 kV "
        "145/222/334/446, 120 kV 130/199/299/399, 135 kV 119/183/274/364); the "
        "standard score, and the default, uses 130 HU regardless of kVp."
    ),
    "Volume score": (
        "Calcium volume = number of pixels in the counted lesions x pixel area (mm^2) x "
        "slice increment (mm), in mm^3. It uses the measured slice increment, not the "
        "slice thickness, so overlapping reconstructions are not counted twice."
    ),
    "Mass score": MASS_SCORE_DEFINITION,
    "Risk category": (
        "Rumberger categories of the total Agatston score, applied to the real-valued "
        "score with upper-inclusive bounds: '0' = 0; '1-10' = more than 0 up to 10; "
        "'11-100' = more than 10 up to 100; '101-400' = more than 100 up to 400; "
        "'>400' = more than 400. A small positive score (e.g. 0.5 after the increment "
        "scaling) is therefore '1-10', not '0'."
    ),
    "CAC-DRS": (
        "Coronary Artery Calcium Data and Reporting System (Hecht et al., SCCT 2018, "
        "J Cardiovasc Comput Tomogr 2018;12:185-91). Agatston grade of the total score: "
        "A0 = 0; A1 = more than 0 and below 100 (1-99); A2 = 100 up to below 300 "
        "(100-299); A3 = 300 or more (the cut-off is 300, not 400). For A1-A3 the number "
        "of vessels among LM, LAD, LCX and RCA with a positive Agatston score is "
        "appended as /N1 to /N4, e.g. 'A2/N3'; A0 has no vessel count."
    ),
    "Model uncertainty": (
        "The segmentation model votes each calcium candidate (one 8-connected group of "
        "pixels >= 130 HU on one slice) coronary or not by summing its class "
        "probabilities over the candidate's pixels. When the coronary share of that vote "
        "is at least 0.1 and below 0.9 (the model gave the other answer at least a 10 % "
        "chance), the decision is called unsure. agatston_range_low re-scores the scan "
        "with every unsure candidate left out, agatston_range_high with every unsure "
        "candidate counted (in its most probable vessel); agatston_total "
        "lies between them. The band was chosen on generated validation scans "
        "(docs/evaluation.md). A scan whose range spans two risk categories has "
        "risk_category_uncertain true and a 'review the overlay' note in status_reason."
    ),
    "Gating inference": (
        "Whether a series is ECG-gated is inferred from its DICOM headers, because many "
        "de-identified gated scans have the ECG tags blanked. Each kind of evidence "
        "counts once, with a weight. Weight 3: Cardiac Synchronization Technique "
        "(0018,9037) PROSPECTIVE, RETROSPECTIVE or PACED (NONE or REALTIME counts "
        "against), Nominal Percentage of Cardiac Phase (0020,9241) present, a cardiac "
        "phase in Scan Options (0018,0022; e.g. Siemens 'TP70PC'). Weight 2: Trigger Time "
        "(0018,1060) above 0, Heart Rate (0018,1088), a heart rate or cardiac wording in "
        "Scan Options, the words gated/ECG/triggered or a calcium-scoring protocol name "
        "('CaSc', 'Ca Score', 'Calcium', 'SmartScore', 'CS 3.0', ...) in Series "
        "Description or Protocol Name; 'non-gated' and similar count against. Weight 1: "
        "cardiac words or a cardiac phase percentage (e.g. '70%') in the descriptions; "
        "chest/lung words count against unless a calcium-scoring or gating word is also "
        "present. gated is true when the evidence for outweighs the evidence against, "
        "false when it is outweighed, null on a tie (including no evidence). "
        "gating_confidence is 'high' for a margin of 3 or more, 'medium' for 2, 'low' "
        "for 1 or a tie; 'high' needs at least one DICOM tag, descriptions alone give at "
        "most 'medium'. A gated call with low confidence is a QC warning "
        "(gating_uncertain). The evidence used is listed in gating_evidence."
    ),
    "Scan type": (
        "scan_type is the kind of CT the series was scored as: 'gated' (ECG-gated, "
        "non-contrast calcium-scoring CT, the setting the Agatston score was defined "
        "for) when gated is true, otherwise 'nongated' (routine non-gated chest CT; this "
        "includes series whose gating is unknown, with QC warning not_gated). Scores "
        "from non-gated CT are systematically different (thicker slices, cardiac motion) "
        "and should be analysed as a separate group or with adjustment, not pooled with "
        "gated scores."
    ),
    "Engine": (
        "The inference engine is named '<runtime>-<device>-<precision>': runtime "
        "'onnxruntime', 'torch' or 'tensorrt'; device 'cpu' or 'cuda'; precision "
        "'fp32', 'fp16', 'bf16' or 'int8' (e.g. 'onnxruntime-cpu-int8', the CPU default, "
        "which runs the model's 8-bit copy of its network; 'tensorrt-cuda-fp16'). "
        "The network only decides which vessel, if any, each candidate pixel belongs "
        "to; lesions, areas and HU values come from the full-resolution threshold, so "
        "engines can differ only where reduced precision changes a vessel label."
    ),
    "Provenance": (
        "Every scored value carries what produced it: pipeline_version (the cacflow "
        "release), model_version and model_sha256 (the segmentation weights; the hash "
        "identifies the exact files, with any second-look review they carry), engine (see Engine), settings_hash (a hash of all "
        "settings that change selection, QC or scores), shard (the processing batch) "
        "and processed_at (UTC time of scoring). Rows that agree on pipeline_version, "
        "model_sha256, engine and settings_hash were produced by the same code, weights, "
        "arithmetic (engine: e.g. 'int8', the model's 8-bit copy of its weights that a "
        "CPU runs, made from them reproducibly) and settings. Other model weights (a release with a new shipped model, or the "
        "config's model) or a changed setting re-score the affected scans on the next "
        "run; a release that changes only code does not (force it with snakemake "
        "--forcerun infer)."
    ),
    "Quality control": (
        "Each series gets qc_status 'pass', 'warn' or 'fail', the worst of its checks, "
        f"with the codes of the checks that did not pass in qc_reasons (joined by "
        f"'{LIST_SEPARATOR}') and one sentence per code in qc_messages (joined by "
        f"'{MESSAGE_SEPARATOR}'). 'fail' makes a series unscorable (e.g. localizer, "
        "contrast-enhanced, not axial, too few slices); 'warn' marks a scorable series "
        "with a property that may bias the score (e.g. tube voltage other than 120 kV, "
        "slice thickness other than the calcium-scoring 2.5-3 mm, uneven slice "
        "spacing, uncertain gating). Every check, code and threshold is listed in the "
        "project's QC documentation (docs/qc.md). The scans table repeats the QC verdict "
        "of the chosen series. After conversion the chosen series' image is checked for "
        "contrast whatever its tags say: the median HU of the cardiac blood pool "
        "(blood_pool_hu) above 200 HU makes the visit not scorable (contrast_blood_pool); "
        "when it cannot be measured (no lungs in the field of view) the scan is scored "
        "and flagged (blood_pool_unmeasured). Its pixel noise (image_noise_hu) above "
        "30 HU flags it too (noisy_image): noise that high lifts specks of soft tissue "
        "over 130 HU, so small scores are less certain."
    ),
    "Missing values": (
        "A missing value is always a null (NA in R, NULL in DuckDB, NaN/None/NA in "
        "pandas), never 0, an empty string or NaN stored as a number. Scores are null "
        "unless status is 'scored'."
    ),
}


def type_name(arrow_type: pa.DataType) -> str:
    """Type as users see it in R arrow / DuckDB terms, e.g. 'float64', 'timestamp (UTC)'."""
    if pa.types.is_timestamp(arrow_type):
        return f"timestamp[{arrow_type.unit}] ({arrow_type.tz})" if arrow_type.tz else "timestamp"
    if pa.types.is_floating(arrow_type):
        return f"float{arrow_type.bit_width}"
    return str(arrow_type)


def dictionary_rows() -> list[dict[str, str]]:
    """One row per column of every table, in table and column order."""
    return [
        {
            "table": table,
            "column": col.name,
            "type": type_name(col.arrow_type),
            "unit": col.unit,
            "definition": _definition(col),
            "allowed_values": col.allowed_text(),
        }
        for table, cols in TABLES.items()
        for col in cols
    ]


def _definition(col: Column) -> str:
    required = "" if col.nullable else " Never null."
    return col.definition + required


def write_data_dictionary(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write data_dictionary.csv and data_dictionary.md into ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    rows = dictionary_rows()
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MARKDOWN_NAME
    with atomic_write(csv_path) as handle:
        handle.write(_csv_text(rows).encode("utf-8"))
    with atomic_write(md_path) as handle:
        handle.write(_markdown_text(rows).encode("utf-8"))
    return csv_path, md_path


def _csv_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_text(rows: list[dict[str, str]]) -> str:
    lines = [
        "# cacflow data dictionary",
        "",
        "Column contract of the cohort tables (Parquet). Generated from "
        "`cacflow.tables`; do not edit by hand. Method terms are defined under "
        "[Definitions](#definitions).",
        "",
    ]
    for table in TABLES:
        lines += [
            f"## Table `{table}`",
            "",
            TABLE_DESCRIPTIONS[table],
            "",
            "Row key: " + ", ".join(f"`{k}`" for k in TABLE_KEYS[table]) + ".",
            "",
            "| " + " | ".join(CSV_FIELDS[1:]) + " |",
            "|" + "---|" * (len(CSV_FIELDS) - 1),
        ]
        lines += [
            "| " + " | ".join(_md_cell(row[field]) for field in CSV_FIELDS[1:]) + " |"
            for row in rows
            if row["table"] == table
        ]
        lines.append("")
    lines += ["## Definitions", ""]
    for heading, text in DEFINITIONS.items():
        lines += [f"### {heading}", "", text, ""]
    return "\n".join(lines)
