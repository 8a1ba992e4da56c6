"""Cohort QC report: one self-contained HTML file.

Everything is inline (CSS, SVG charts, PNG overlays as data URIs) so the file
opens offline, can be mailed or archived, and leaks nothing to a web server.
Only participant_id and visit identify a scan in it; DICOM UIDs are left out.
All text from the tables goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cacflow import VESSEL_LABELS
from cacflow.scoring import risk_category
from cacflow.tables import (
    LIST_SEPARATOR,
    QC_STATUS_VALUES,
    RISK_CATEGORY_VALUES,
    STATUS_VALUES,
    atomic_write,
)

ScanKey = tuple[str, str]  # (participant_id, visit)

# Boxes around the calls the model was unsure of: white stands out from every vessel colour.
UNSURE_COLOUR = (255, 255, 255)
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
VESSEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (240, 228, 66),  # LM, yellow
    2: (213, 94, 0),  # LAD, vermillion
    3: (0, 158, 115),  # LCX, bluish green
    4: (86, 180, 233),  # RCA, sky blue
}
_OVERLAY_ALPHA = 0.6  # keeps the HU texture under the colour visible
_OVERLAY_MIN_SIZE = 256  # small slices are enlarged so the legend fits
_LEGEND_HEIGHT = 20
_HISTOGRAM_BIN = 0.5  # bin width in ln(1 + Agatston)
AGREEMENT_THRESHOLDS = (1, 10, 100, 400)  # CAC >= t, as in Eng et al. 2021
_MISSING = "(missing)"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.headline{display:flex;gap:1em;flex-wrap:wrap}
.headline div{border:1px solid #ccc;border-radius:6px;padding:.5em 1em;min-width:8em}
.headline b{display:block;font-size:1.6em}
.charts{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
svg text{font-size:11px;fill:#333}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figure img{display:block;max-width:340px;image-rendering:pixelated}
figcaption{font-size:.85em;max-width:340px}
.muted{color:#777}
"""


# --------------------------------------------------------------------------- images


def overlay_png(
    hu_slice: np.ndarray, label_slice: np.ndarray, *, window: tuple[float, float] = (-200, 600),
    unsure: np.ndarray | None = None,
) -> bytes:
    """PNG of one axial CT slice (grey, HU window) with vessel labels in colour and
    a legend. Orientation as stored: image left = patient right, top = anterior.
    ``unsure`` (a mask of the calls the model was unsure of) draws a box around each."""
    hu = np.asarray(hu_slice, dtype=np.float32)
    labels = np.asarray(label_slice)
    if hu.ndim != 2 or hu.shape != labels.shape:
        raise ValueError(f"need two 2-D arrays of one shape, got {hu.shape} and {labels.shape}")
    if unsure is not None and np.shape(unsure) != hu.shape:
        raise ValueError(f"unsure mask shape {np.shape(unsure)} differs from the slice's {hu.shape}")
    low, high = window
    grey = np.clip((hu - low) / (high - low), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in VESSEL_COLOURS.items():
        mask = labels == value
        rgb[mask] = (1 - _OVERLAY_ALPHA) * rgb[mask] + _OVERLAY_ALPHA * np.asarray(colour)
    image = Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    scale = max(1, math.ceil(_OVERLAY_MIN_SIZE / max(image.size)))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)

    canvas = Image.new("RGB", (image.width, image.height + _LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 2), "R", fill=(255, 255, 255), font=font)
    boxes = _unsure_boxes(unsure) if unsure is not None else []
    for top, left, bottom, right in boxes:  # a margin of 4 pixels: the box stands out, the calcium stays visible
        draw.rectangle(((left - 4) * scale, (top - 4) * scale, (right + 4) * scale - 1, (bottom + 4) * scale - 1),
                       outline=UNSURE_COLOUR, width=max(2, scale // 2))
    x, y = 4, image.height + 4
    for value, colour in VESSEL_COLOURS.items():
        draw.rectangle((x, y, x + 11, y + 11), fill=colour)
        name = VESSEL_LABELS[value].upper()
        draw.text((x + 15, y), name, fill=(255, 255, 255), font=font)
        x += 15 + int(draw.textlength(name, font=font)) + 12
    if boxes:
        draw.rectangle((x, y, x + 11, y + 11), outline=UNSURE_COLOUR, width=2)
        draw.text((x + 15, y), "unsure", fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _unsure_boxes(unsure: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right), exclusive ends, of each 8-connected unsure group."""
    from scipy import ndimage

    groups, _ = ndimage.label(np.asarray(unsure, dtype=bool), structure=np.ones((3, 3), bool))
    return [(rows.start, cols.start, rows.stop, cols.stop) for rows, cols in ndimage.find_objects(groups)]


def pick_overlay_slices(
    hu: np.ndarray, labels: np.ndarray, n: int = 3, *, threshold_hu: float = 130.0,
    unsure: np.ndarray | None = None,
) -> list[int]:
    """Indices (ascending) of the ``n`` axial slices with the most labelled calcium
    (labelled voxels at or above ``threshold_hu``). Slices holding calls the model was
    unsure of (``unsure`` mask) come first, most unsure voxels first: they are what a
    reviewer must see. Without any calcium, the middle slice, so a flagged scan still
    gets a picture."""
    calcium = (np.asarray(labels) > 0) & (np.asarray(hu) >= threshold_hu)
    per_slice = calcium.reshape(calcium.shape[0], -1).sum(axis=1)
    unsure_per_slice = (np.zeros_like(per_slice) if unsure is None
                        else np.asarray(unsure, dtype=bool).reshape(calcium.shape[0], -1).sum(axis=1))
    candidates = np.flatnonzero(per_slice + unsure_per_slice)
    if candidates.size == 0:
        return [int(calcium.shape[0] // 2)]
    # Stable sort, unsure count first, then labelled: ties go to the more inferior slice.
    order = np.lexsort((-per_slice[candidates], -unsure_per_slice[candidates]))
    best = candidates[order[:n]]
    return sorted(int(i) for i in best)


def select_overlay_scans(scans: pd.DataFrame, *, n_high: int = 12, n_review: int = 50) -> list[ScanKey]:
    """Scans worth a visual check: every one with a problem (failed, or QC warning or
    failure on a scored scan); then up to ``n_review`` whose risk category hangs on
    calls the model was unsure of, widest score range first (all are listed in the
    review table; a cohort can hold thousands); then the ``n_high`` highest scores."""
    problem = _has_problem(scans)
    review = scans[~problem & (scans["status"] == "scored") & _category_uncertain(scans)]
    width = _column(review, "agatston_range_high").astype(float) - _column(review, "agatston_range_low").astype(float)
    review = review.assign(_width=width.to_numpy()).sort_values("_width", ascending=False, kind="stable")
    scored = scans[(scans["status"] == "scored") & ~_is_flagged(scans)]
    high = scored.sort_values("agatston_total", ascending=False, na_position="last").head(n_high)
    return list(dict.fromkeys(_keys(scans[problem]) + _keys(review.head(n_review)) + _keys(high)))


def _keys(scans: pd.DataFrame) -> list[ScanKey]:
    return [(str(p), str(v)) for p, v in zip(scans["participant_id"], scans["visit"])]


def _has_problem(scans: pd.DataFrame) -> pd.Series:
    qc = _column(scans, "qc_status")
    return (scans["status"] == "failed") | ((scans["status"] == "scored") & qc.isin(["warn", "fail"]))


def _is_flagged(scans: pd.DataFrame) -> pd.Series:
    return _has_problem(scans) | ((scans["status"] == "scored") & _category_uncertain(scans))


def _category_uncertain(scans: pd.DataFrame) -> pd.Series:
    """True where flagged; false where assessed and not flagged, or not assessed (null)."""
    return _column(scans, "risk_category_uncertain").astype("boolean").fillna(False).astype(bool)


# --------------------------------------------------------------------------- report


def render_report(
    scans: pd.DataFrame,
    series: pd.DataFrame,
    lesions: pd.DataFrame,
    out_html: str | os.PathLike,
    *,
    overlays: dict[ScanKey, list[bytes] | None] | None = None,
    title: str = "cacflow cohort report",
    run_info: dict | None = None,
) -> Path:
    """Write the cohort QC report to ``out_html`` (atomically) and return its path."""
    sections = [
        _run_section(run_info),
        _summary_section(scans),
        _not_scored_section(scans),
        _scores_section(scans, lesions),
        _review_section(scans),
        _acquisition_section(scans),
        _series_qc_section(series),
        _reference_section(scans),
        _overlay_section(scans, overlays or {}),
    ]
    return write_html_page(title, [s for s in sections if s is not None], out_html)


def write_html_page(title: str, sections: list[tuple[str, str, str]], out_html: str | os.PathLike) -> Path:
    """One self-contained HTML page: a title, a navigation bar and the given
    (anchor id, heading, HTML content) sections, written atomically."""
    nav = " ".join(f'<a href="#{sid}">{_e(heading)}</a>' for sid, heading, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{_e(heading)}</h2>\n{content}</section>'
        for sid, heading, content in sections
    )
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<h1>{_e(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n"
    )
    with atomic_write(out_html) as handle:
        handle.write(document.encode("utf-8"))
    return Path(out_html)


Section = tuple[str, str, str]  # (anchor id, heading, HTML content)


def _run_section(run_info: dict | None) -> Section | None:
    if not run_info:
        return None
    rows = [(str(k), str(v)) for k, v in run_info.items()]
    return "run", "Run", _table("run-info", ["item", "value"], rows)


def _summary_section(scans: pd.DataFrame) -> Section:
    status = _counts(scans["status"], STATUS_VALUES)
    headline = f"<div>scans<b>{len(scans)}</b></div>" + "".join(
        f"<div>{_e(label)}<b>{count}</b></div>" for label, count in status
    )
    reasons = (
        scans.assign(reason=_column(scans, "status_reason").fillna("(none)"))
        .groupby(["status", "reason"], sort=True)
        .size()
        .reset_index(name="n")
        .sort_values(["status", "n"], ascending=[True, False], kind="stable")
    )
    content = (
        f'<div class="headline">{headline}</div>'
        + _table("status-counts", ["status", "scans", "%"], _with_percent(status))
        + "<h3>By status and reason</h3>"
        + _table(
            "status-reason-counts",
            ["status", "reason", "scans"],
            list(reasons.itertuples(index=False, name=None)),
        )
    )
    return "summary", "Summary", content


def _not_scored_section(scans: pd.DataFrame) -> Section:
    rows = scans[scans["status"] != "scored"].sort_values(["status", "participant_id", "visit"])
    if rows.empty:
        return "not-scored", "Scans not scored", '<p class="muted">Every scan was scored.</p>'
    data = [
        (r.participant_id, r.visit, r.status, _text(r.status_reason), _text(r.qc_reasons))
        for r in rows.assign(
            status_reason=_column(rows, "status_reason"), qc_reasons=_column(rows, "qc_reasons")
        ).itertuples(index=False)
    ]
    content = f"<p>{len(rows)} scan(s) have no score.</p>" + _table(
        "not-scored", ["participant_id", "visit", "status", "reason", "QC reasons"], data
    )
    return "not-scored", "Scans not scored", content


def _scores_section(scans: pd.DataFrame, lesions: pd.DataFrame) -> Section:
    scored = scans[scans["status"] == "scored"]
    totals = scored["agatston_total"].dropna().to_numpy(dtype=float)
    risk = _counts(_column(scored, "risk_category"), RISK_CATEGORY_VALUES)
    drs = _counts(_column(scored, "cac_drs"), ())
    charts = (
        '<div class="charts">'
        + _histogram_svg(totals)
        + _bar_svg(risk, "scans per risk category")
        + "</div>"
    )
    content = (
        f"<p>{len(totals)} scored scan(s); "
        f"{int((totals == 0).sum())} with an Agatston score of 0.</p>"
        + charts
        + _table("risk-counts", ["risk category", "scans", "%"], _with_percent(risk))
        + _table("cac-drs-counts", ["CAC-DRS", "scans"], drs)
        + "<h3>Per vessel</h3>"
        + _vessel_table(scored, lesions)
    )
    return "scores", "Score distribution", content


def _review_section(scans: pd.DataFrame) -> Section:
    """Scored scans whose risk category hangs on calcium the model was unsure about."""
    scored = scans[scans["status"] == "scored"]
    assessed = _column(scored, "risk_category_uncertain").notna()
    rows = scored[_category_uncertain(scored)].sort_values(["participant_id", "visit"])
    rows = rows[_column(rows, "agatston_range_low").notna() & _column(rows, "agatston_range_high").notna()]
    not_assessed = ""
    if not assessed.all():
        not_assessed = (f"<p>{int((~assessed).sum())} scored scan(s) have no range (inferred by an older "
                        "version of cacflow): rerun `snakemake --forcerun infer` to assess them.</p>")
    intro = not_assessed + ("<p>The model votes each calcium candidate coronary or not. Where that vote was close (coronary "
             "share 0.1-0.9: the other answer had at least a 10 % chance), agatston_range_low and "
             "agatston_range_high give the score with every such candidate left out or counted. ")
    if rows.empty:
        none = "No assessed scan's" if not_assessed else "No scored scan's"
        return "review", "Scans to review", intro + f"{none} risk category depends on them.</p>"
    data = [
        (r.participant_id, r.visit, _fmt(r.agatston_total), f"{_fmt(r.agatston_range_low)}-{_fmt(r.agatston_range_high)}",
         f"{risk_category(r.agatston_range_low)} to {risk_category(r.agatston_range_high)}")
        for r in rows.itertuples(index=False)
    ]
    content = intro + (
        f"In {len(rows)} of {int(assessed.sum())} assessed scan(s) the risk category depends on them: check "
        "them before using their category (the overlays below show up to 50, widest range first, with the "
        "unsure calls boxed).</p>"
    ) + _table("review", ["participant_id", "visit", "Agatston", "range", "risk category"], data)
    return "review", "Scans to review", content


def _vessel_table(scored: pd.DataFrame, lesions: pd.DataFrame) -> str:
    rows = []
    for vessel in VESSEL_LABELS.values():
        scores = _column(scored, f"agatston_{vessel}").dropna()
        positive = scores[scores > 0]
        vessel_lesions = lesions[lesions["vessel"] == vessel] if "vessel" in lesions else lesions.iloc[:0]
        rows.append(
            (
                vessel.upper(),
                int(positive.size),
                int(len(vessel_lesions)),
                _fmt(positive.median()) if positive.size else "",
            )
        )
    headers = ["vessel", "scans with calcium", "lesions", "median Agatston (if > 0)"]
    return _table("vessel-counts", headers, rows)


MODEL_RANGE_INSIDE = "inside the model's training range"
MODEL_RANGE_OUTSIDE = "outside the model's training range"
MODEL_RANGE_UNKNOWN = "not assessed (the model records no training range)"


def _acquisition_section(scans: pd.DataFrame) -> Section:
    scan_type = _counts(_column(scans, "scan_type"), ())
    manufacturer = _column(scans, "manufacturer").fillna(_MISSING)
    scanner = _counts(manufacturer + " / " + _column(scans, "scanner_model").fillna(_MISSING), ())
    kvp = _counts(_column(scans, "kvp").map(_fmt, na_action="ignore"), ())
    # Scored scans only: the verdict is made at inference.
    outside = _column(scans[scans["status"] == "scored"], "outside_model_range")
    verdict = outside.map({True: MODEL_RANGE_OUTSIDE, False: MODEL_RANGE_INSIDE}, na_action="ignore")
    model_range = _counts(verdict.astype("object").where(verdict.notna(), MODEL_RANGE_UNKNOWN),
                          (MODEL_RANGE_INSIDE, MODEL_RANGE_OUTSIDE))
    content = (
        '<div class="charts">'
        + _bar_svg(scan_type, "scans per scan type")
        + _bar_svg(kvp, "scans per tube voltage (kV)")
        + "</div>"
        + _table("scan-type-counts", ["scan type", "scans"], scan_type)
        + _table("scanner-counts", ["manufacturer / model", "scans"], scanner)
        + _table("kvp-counts", ["kVp", "scans"], kvp)
        + "<p>Scored scans against the pixel spacing the model was trained on "
        "(<code>outside_model_range</code>; its agreement is lower outside: model card).</p>"
        + _table("model-range-counts", ["pixel spacing", "scored scans"], model_range)
    )
    return "acquisition", "Scanners and protocols", content


def _series_qc_section(series: pd.DataFrame) -> Section:
    if series.empty:
        return "series-qc", "Series QC", '<p class="muted">No series were discovered.</p>'
    status = _counts(series["qc_status"], QC_STATUS_VALUES)
    code_status = [
        (code.strip(), qc_status)
        for reasons, qc_status in zip(_column(series, "qc_reasons"), series["qc_status"])
        if isinstance(reasons, str)
        for code in reasons.split(LIST_SEPARATOR.strip())  # tolerant of ';' without a space
        if code.strip()
    ]
    per_code, per_code_status = Counter(code for code, _ in code_status), Counter(code_status)
    by_code = sorted(
        (
            (code, n, per_code_status[(code, "fail")], per_code_status[(code, "warn")])
            for code, n in per_code.items()
        ),
        key=lambda row: (-row[1], row[0]),
    )
    chosen = _column(series, "chosen").eq(True)
    not_chosen = _counts(_column(series[~chosen], "not_chosen_reason"), ())
    content = (
        f"<p>{len(series)} series discovered, {int(chosen.sum())} chosen for scoring.</p>"
        + _bar_svg(status, "series per QC status")
        + _table("qc-status-counts", ["QC status", "series", "%"], _with_percent(status))
        + _table("qc-reason-counts", ["reason code", "series", "of which fail", "of which warn"], by_code)
        + "<h3>Why series were not chosen</h3>"
        + _table("not-chosen-counts", ["reason", "series"], not_chosen)
    )
    return "series-qc", "Series QC", content


def _reference_section(scans: pd.DataFrame) -> Section | None:
    if "reference_agatston_total" not in scans or scans["reference_agatston_total"].isna().all():
        return None
    pairs = scans[scans["status"] == "scored"].dropna(subset=["agatston_total", "reference_agatston_total"])
    pairs = pairs.assign(
        risk_category=_column(pairs, "risk_category"),
        reference_risk_category=_column(pairs, "reference_risk_category"),
    )
    predicted = pairs["agatston_total"].to_numpy(dtype=float)
    reference = pairs["reference_agatston_total"].to_numpy(dtype=float)
    categories = pairs.dropna(subset=["risk_category", "reference_risk_category"])
    same_category = pairs["risk_category"].eq(pairs["reference_risk_category"])
    n_agree, n_cat = int(same_category.sum()), len(categories)
    confusion = confusion_matrix(
        categories["reference_risk_category"], categories["risk_category"], RISK_CATEGORY_VALUES
    )
    kappa = cohen_kappa(confusion)
    difference = predicted - reference
    summary = [
        ("scans with a reference score", str(len(pairs))),
        ("risk category agreement", f"{n_agree} / {n_cat} ({_pct(n_agree, n_cat)})"),
        ("Cohen's kappa (risk categories, unweighted)", _fmt(kappa) if kappa is not None else "n/a"),
        ("mean difference (predicted - reference)", _fmt(difference.mean()) if len(pairs) else "n/a"),
        ("SD of difference", _fmt(difference.std(ddof=1)) if len(pairs) > 1 else "n/a"),
    ]
    confusion_rows = [
        [f"reference {ref}", *(int(v) for v in confusion[i])] for i, ref in enumerate(RISK_CATEGORY_VALUES)
    ]
    detection = [_detection_row(t, predicted, reference) for t in AGREEMENT_THRESHOLDS]
    per_scan = [
        (r.participant_id, r.visit, _fmt(r.agatston_total), _fmt(r.reference_agatston_total),
         _text(r.risk_category), _text(r.reference_risk_category))
        for r in pairs.sort_values(["participant_id", "visit"]).itertuples(index=False)
    ]
    content = (
        _table("reference-summary", ["measure", "value"], summary)
        + _scatter_svg(reference, predicted, same_category=same_category.to_numpy())
        + "<h3>Risk categories (rows: reference, columns: predicted)</h3>"
        + _table("risk-confusion", ["", *RISK_CATEGORY_VALUES], confusion_rows)
        + "<h3>Detection at CAC thresholds (score &gt;= t)</h3>"
        + _table("detection", ["threshold", "TP", "FP", "FN", "TN", "sensitivity", "specificity"], detection)
        + "<h3>Per scan</h3>"
        + _table(
            "reference-per-scan",
            ["participant_id", "visit", "Agatston", "reference Agatston",
             "risk category", "reference risk category"],
            per_scan,
        )
    )
    return "reference", "Predicted vs reference", content


def confusion_matrix(
    reference: Iterable[str], predicted: Iterable[str], categories: Sequence[str]
) -> np.ndarray:
    """Counts [reference category, predicted category]; pairs outside ``categories`` are ignored."""
    index = {category: i for i, category in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)), dtype=np.int64)
    for ref, pred in zip(reference, predicted):
        if ref in index and pred in index:
            table[index[ref], index[pred]] += 1
    return table


def cohen_kappa(confusion: np.ndarray) -> float | None:
    """Unweighted Cohen's kappa of a square confusion matrix; None when undefined
    (no pairs, or all pairs in one category so chance agreement is 1)."""
    table = np.asarray(confusion, dtype=float)
    n = table.sum()
    if n == 0:
        return None
    observed = np.trace(table) / n
    expected = float(table.sum(axis=1) @ table.sum(axis=0)) / n**2
    if expected == 1.0:
        return None
    return float((observed - expected) / (1.0 - expected))


def _detection_row(threshold: float, predicted: np.ndarray, reference: np.ndarray) -> tuple:
    pred, ref = predicted >= threshold, reference >= threshold
    tp, fp = int((pred & ref).sum()), int((pred & ~ref).sum())
    fn, tn = int((~pred & ref).sum()), int((~pred & ~ref).sum())
    return (f">= {threshold}", tp, fp, fn, tn, _pct(tp, tp + fn), _pct(tn, tn + fp))


def _overlay_section(scans: pd.DataFrame, overlays: dict[ScanKey, list[bytes] | None]) -> Section:
    if not overlays:
        return "overlays", "Overlays", '<p class="muted">No overlay images were provided.</p>'
    rows = dict(zip(_keys(scans), scans.to_dict("records")))
    flagged = set(_keys(scans[_is_flagged(scans)]))
    groups: dict[str, list[str]] = {"Flagged scans": [], "High-score and other scans": []}
    for key in sorted(overlays, key=lambda k: -_score_of(rows.get(k))):
        group = "Flagged scans" if key in flagged else "High-score and other scans"
        groups[group].append(_overlay_figures(key, overlays[key], rows.get(key)))
    content = (
        "<p>Axial slices with the most labelled calcium; colours: "
        + ", ".join(
            f'<span style="color:rgb{colour}">&#9632;</span> {VESSEL_LABELS[v].upper()}'
            for v, colour in VESSEL_COLOURS.items()
        )
        + ". Image left is patient right.</p>"
    )
    for heading, figures in groups.items():
        if figures:
            content += f"<h3>{_e(heading)}</h3>" + "".join(figures)
    return "overlays", "Overlays", content


def _score_of(row: dict | None) -> float:
    value = None if row is None else row.get("agatston_total")
    return -1.0 if value is None or pd.isna(value) else float(value)


def _overlay_figures(key: ScanKey, images: list[bytes] | None, row: dict | None) -> str:
    participant, visit = key
    if row is not None:
        details = (
            f"{_text(row.get('status'))}, Agatston {_fmt(row.get('agatston_total'))}, "
            f"risk {_text(row.get('risk_category'))}, QC {_text(row.get('qc_status'))}"
            + (f" ({_text(row.get('qc_reasons'))})" if pd.notna(row.get("qc_reasons")) else "")
        )
    else:
        details = "not in the scans table"
    caption = f"{participant} / {visit}: {details}"
    if not images:
        return f'<figure><figcaption>{_e(caption)}; no image available.</figcaption></figure>'
    tags = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{_e(f"{participant} / {visit}, slice {i + 1}")}">'
        for i, png in enumerate(images)
    )
    return f"<figure>{tags}<figcaption>{_e(caption)}</figcaption></figure>"


# --------------------------------------------------------------------------- SVG charts


def _bar_svg(items: list[tuple[str, int]], title: str) -> str:
    """Horizontal bar chart: one row per category, count at the bar's end."""
    if not items:
        return ""
    label_w, bar_w, row_h, top = 170, 260, 20, 22
    height = top + row_h * len(items) + 6
    peak = max(count for _, count in items) or 1
    parts = [f'<text x="0" y="14" font-weight="bold">{_e(title)}</text>']
    for i, (label, count) in enumerate(items):
        y = top + i * row_h
        width = bar_w * count / peak
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(_shorten(label, 28))}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 6}" fill="#4c78a8"/>'
            f'<text x="{label_w + width + 4:.1f}" y="{y + 14}">{count}</text>'
        )
    return _svg(label_w + bar_w + 50, height, title, parts)


def _histogram_svg(totals: np.ndarray) -> str:
    """Histogram of ln(1 + Agatston): a bar for exactly 0, then bins of equal width."""
    logs = np.log1p(totals[totals > 0])
    n_bins = max(1, math.ceil(logs.max() / _HISTOGRAM_BIN)) if logs.size else 1
    counts = np.bincount(np.minimum((logs // _HISTOGRAM_BIN).astype(int), n_bins - 1), minlength=n_bins)
    labels = ["=0"] + [f"{i * _HISTOGRAM_BIN:g}" for i in range(n_bins)]
    values = [int((totals == 0).sum())] + [int(c) for c in counts]
    left, bottom, top, plot_h = 36, 40, 24, 150
    bar_w = max(8, min(32, 420 // len(values)))
    width, height = left + bar_w * len(values) + 10, top + plot_h + bottom
    peak = max(values) or 1
    title = "scored scans by ln(1 + Agatston)"
    parts = [
        f'<text x="0" y="14" font-weight="bold">{_e(title)}</text>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#999"/>',
    ]
    for i, (label, value) in enumerate(zip(labels, values)):
        x, h = left + i * bar_w, plot_h * value / peak
        colour = "#f58518" if i == 0 else "#4c78a8"
        parts.append(
            f'<rect x="{x + 1}" y="{top + plot_h - h:.1f}" width="{bar_w - 2}" height="{h:.1f}" '
            f'fill="{colour}"><title>{_e(label)}: {value}</title></rect>'
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 12}" text-anchor="middle" '
            f'font-size="9">{_e(label)}</text>'
        )
    parts.append(
        f'<text x="{left + (width - left) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        "bin start, ln(1 + Agatston); first bar: score exactly 0</text>"
    )
    return _svg(width, height, title, parts)


def _scatter_svg(reference: np.ndarray, predicted: np.ndarray, *, same_category: np.ndarray) -> str:
    """Predicted vs reference on ln(1 + Agatston) axes, with the identity line."""
    size, margin = 300, 40
    x, y = np.log1p(reference), np.log1p(predicted)
    limit = max(1.0, float(np.max(np.concatenate([x, y]))) * 1.05)

    def px(v: float) -> float:
        return margin + (size - margin - 10) * v / limit

    def py(v: float) -> float:
        return size - margin - (size - margin - 10) * v / limit

    title = "predicted vs reference, ln(1 + Agatston)"
    parts = [
        f'<text x="0" y="14" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(limit):.1f}" y2="{py(limit):.1f}" '
        'stroke="#999" stroke-dasharray="4 3"/>',
        f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(limit):.1f}" y2="{py(0):.1f}" stroke="#333"/>',
        f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(0):.1f}" y2="{py(limit):.1f}" stroke="#333"/>',
        f'<text x="{px(limit / 2):.1f}" y="{size - 10}" text-anchor="middle">reference</text>',
        f'<text x="12" y="{py(limit / 2):.1f}" transform="rotate(-90 12 {py(limit / 2):.1f})" '
        'text-anchor="middle">predicted</text>',
    ]
    for xi, yi, same in zip(x, y, same_category):
        colour = "#4c78a8" if same else "#e45756"
        parts.append(
            f'<circle cx="{px(xi):.1f}" cy="{py(yi):.1f}" r="3" fill="{colour}" fill-opacity="0.8"/>'
        )
    parts.append(f'<text x="{margin}" y="30" font-size="10">red: risk category differs</text>')
    return _svg(size, size, title, parts)


def _svg(width: float, height: float, label: str, parts: list[str]) -> str:
    return (
        f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'role="img" aria-label="{_e(label)}">' + "".join(parts) + "</svg>"
    )


# --------------------------------------------------------------------------- helpers


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when the frame lacks it (optional columns)."""
    if name in df:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype="object")


def _counts(values: pd.Series, order: Sequence[str]) -> list[tuple[str, int]]:
    """(value, count) pairs: the values of ``order`` first (zeros included), then any
    others by decreasing count; missing values are counted as '(missing)'."""
    counts = values.astype("object").where(values.notna(), _MISSING).astype(str).value_counts()
    ordered = [(value, int(counts.get(value, 0))) for value in order]
    rest = sorted(
        ((str(v), int(c)) for v, c in counts.items() if v not in order),
        key=lambda item: (-item[1], item[0]),
    )
    return ordered + rest


def _with_percent(items: list[tuple[str, int]]) -> list[tuple[str, int, str]]:
    total = sum(count for _, count in items)
    return [(label, count, _pct(count, total)) for label, count in items]


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _fmt(value) -> str:
    if value is None or pd.isna(value):
        return ""
    value = float(value)
    return f"{value:.0f}" if value.is_integer() else f"{value:.2f}"


def _text(value) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """An HTML table; numbers are right-aligned, every cell escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{cell}</td>' if isinstance(cell, (int, np.integer)) else f"<td>{_e(cell)}</td>"
            for cell in row
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
