"""Cohort report: sections, counts, self-containment, escaping, overlay images."""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cacflow import report, tables

EVIL_ID = "<script>alert('x')</script>"


class TableReader(HTMLParser):
    """Collects every <table id=...> as rows of cell texts (entities decoded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.section_ids: list[str] = []
        self.image_sources: list[str] = []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section_ids.append(attrs["id"])
        elif tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.image_sources.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def scans_frame() -> pd.DataFrame:
    scored = [
        # participant, visit, agatston, risk, drs, reference, reference risk, scan type, kvp, qc
        ("P01", "v1", 0.0, "0", "A0", 0.0, "0", "gated", 120.0, "pass"),
        ("P02", "v1", 5.0, "1-10", "A1/N1", 12.0, "11-100", "gated", 120.0, "pass"),
        ("P03", "v1", 150.0, "101-400", "A2/N2", 140.0, "101-400", "gated", 120.0, "warn"),
        ("P04", "v1", 900.0, ">400", "A3/N4", 850.0, ">400", "nongated", 100.0, "pass"),
        (EVIL_ID, "v2", 45.0, "11-100", "A1/N2", 40.0, "11-100", "gated", 120.0, "pass"),
    ]
    rows = [
        {
            "participant_id": p, "visit": v, "status": "scored", "status_reason": None,
            "agatston_total": a, "agatston_lad": a, "risk_category": r, "cac_drs": d,
            "reference_agatston_total": ra, "reference_risk_category": rr, "scan_type": st,
            "kvp": kvp, "qc_status": qc, "qc_reasons": "kvp_not_120" if qc == "warn" else None,
            "manufacturer": "SIEMENS", "scanner_model": "SOMATOM Force",
            "agatston_range_low": a, "agatston_range_high": a, "risk_category_uncertain": False,
            "outside_model_range": st == "nongated",
        }
        for p, v, a, r, d, ra, rr, st, kvp, qc in scored
    ]
    rows[4]["outside_model_range"] = None  # scored by a model that records no training range
    # P02's category hangs on an unsure 7.5-Agatston candidate the model left out.
    rows[1].update(agatston_range_high=12.5, risk_category_uncertain=True)
    contrast = "Only contrast-enhanced series were found; calcium scoring needs a non-contrast scan."
    rows += [
        {"participant_id": "P05", "visit": "v1", "status": "not_scorable", "status_reason": contrast,
         "qc_status": "fail", "qc_reasons": "contrast"},
        {"participant_id": "P06", "visit": "v1", "status": "not_scorable", "status_reason": contrast,
         "qc_status": "fail", "qc_reasons": "contrast"},
        {"participant_id": "P07", "visit": "v1", "status": "failed",
         "status_reason": "dcm2niix wrote two volumes for one series; check for mixed reconstructions.",
         "manufacturer": "GE MEDICAL SYSTEMS", "scanner_model": "Revolution", "kvp": 120.0},
    ]
    return pd.DataFrame(rows)


def series_frame() -> pd.DataFrame:
    rows = [
        ("P01", "pass", None, True, None),
        ("P02", "pass", None, True, None),
        ("P03", "warn", "kvp_not_120", True, None),
        ("P03", "fail", "localizer", False, "Localizer images cannot be scored."),
        ("P04", "pass", None, True, None),
        ("P05", "fail", "contrast; thin_slices", False, "Contrast-enhanced series."),
        ("P06", "fail", "contrast", False, "Contrast-enhanced series."),
        ("P07", "warn", "uneven_spacing", True, None),
    ]
    return pd.DataFrame(
        [
            {"participant_id": p, "visit": "v1", "series_instance_uid": f"1.2.{i}", "qc_status": q,
             "qc_reasons": r, "chosen": c, "not_chosen_reason": why}
            for i, (p, q, r, c, why) in enumerate(rows)
        ]
    )


def lesions_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"participant_id": "P02", "visit": "v1", "lesion_id": 1, "vessel": "lad", "agatston": 5.0},
            {"participant_id": "P03", "visit": "v1", "lesion_id": 1, "vessel": "lad", "agatston": 150.0},
            {"participant_id": "P04", "visit": "v1", "lesion_id": 1, "vessel": "rca", "agatston": 900.0},
        ]
    )


def phantom():
    hu = np.full((6, 32, 32), -50.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[4, 10:14, 10:14], labels[4, 10:14, 10:14] = 500.0, 2  # biggest: LAD on slice 4
    hu[1, 20:23, 5:8], labels[1, 20:23, 5:8] = 300.0, 4  # RCA on slice 1
    hu[2, 5:7, 20:22], labels[2, 5:7, 20:22] = 200.0, 1  # LM on slice 2
    labels[3, 0:10, 0:10] = 3  # labelled but below threshold: no calcium
    return hu, labels


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    hu, labels = phantom()
    slices = report.pick_overlay_slices(hu, labels, n=2)
    pngs = [report.overlay_png(hu[z], labels[z]) for z in slices]
    overlays = {("P04", "v1"): pngs, ("P03", "v1"): pngs[:1], (EVIL_ID, "v2"): None}
    out = tmp_path_factory.mktemp("report") / "report.html"
    report.render_report(
        scans_frame(), series_frame(), lesions_frame(), out,
        overlays=overlays, title="Test cohort <b>", run_info={"pipeline_version": "0.1.0"},
    )
    text = out.read_text(encoding="utf-8")
    reader = TableReader()
    reader.feed(text)
    return text, reader


def body_rows(reader: TableReader, table_id: str) -> list[list[str]]:
    return reader.tables[table_id][1:]


def test_all_sections_render(rendered):
    _, reader = rendered
    assert reader.section_ids == [
        "run", "summary", "not-scored", "scores", "review", "acquisition", "series-qc", "reference", "overlays",
    ]


def test_status_and_reason_counts(rendered):
    _, reader = rendered
    scans = scans_frame()
    expected = scans["status"].value_counts()
    got = {row[0]: int(row[1]) for row in body_rows(reader, "status-counts")}
    assert got == {status: int(expected.get(status, 0)) for status in ("scored", "not_scorable", "failed")}
    reasons = {(row[0], row[1]): int(row[2]) for row in body_rows(reader, "status-reason-counts")}
    expected_reasons = Counter(zip(scans["status"], scans["status_reason"].fillna("(none)")))
    assert reasons == dict(expected_reasons)


def test_every_not_scored_scan_is_listed_with_its_reason(rendered):
    _, reader = rendered
    scans = scans_frame()
    listed = {(row[0], row[1]): row[3] for row in body_rows(reader, "not-scored")}
    expected = scans[scans["status"] != "scored"]
    assert listed == dict(zip(zip(expected["participant_id"], expected["visit"]), expected["status_reason"]))


def test_scans_whose_category_hangs_on_unsure_calcium_are_listed_for_review(rendered):
    _, reader = rendered
    assert body_rows(reader, "review") == [["P02", "v1", "5", "5-12.50", "1-10 to 11-100"]]


def test_review_section_says_when_no_scan_needs_it(tmp_path):
    scans = scans_frame().assign(risk_category_uncertain=False)
    text = report.render_report(scans, series_frame(), lesions_frame(), tmp_path / "r.html").read_text()
    assert "No scored scan's risk category depends on them." in text


def test_score_and_acquisition_counts(rendered):
    _, reader = rendered
    scans = scans_frame()
    scored = scans[scans["status"] == "scored"]
    risk = {row[0]: int(row[1]) for row in body_rows(reader, "risk-counts")}
    assert risk == {c: int((scored["risk_category"] == c).sum()) for c in tables.RISK_CATEGORY_VALUES}
    scan_type = {row[0]: int(row[1]) for row in body_rows(reader, "scan-type-counts")}
    assert scan_type == {"gated": 4, "nongated": 1, "(missing)": 3}
    kvp = {row[0]: int(row[1]) for row in body_rows(reader, "kvp-counts")}
    assert kvp == {"120": 5, "100": 1, "(missing)": 2}
    model_range = {row[0]: int(row[1]) for row in body_rows(reader, "model-range-counts")}
    assert model_range == {report.MODEL_RANGE_INSIDE: 3, report.MODEL_RANGE_OUTSIDE: 1, report.MODEL_RANGE_UNKNOWN: 1}
    scanners = {row[0]: int(row[1]) for row in body_rows(reader, "scanner-counts")}
    assert scanners["SIEMENS / SOMATOM Force"] == 5
    assert scanners["GE MEDICAL SYSTEMS / Revolution"] == 1
    vessels = {row[0]: row[1:3] for row in body_rows(reader, "vessel-counts")}
    assert vessels["LAD"] == [str(int((scored["agatston_lad"] > 0).sum())), "2"]
    assert vessels["RCA"] == ["0", "1"]


def test_series_qc_counts(rendered):
    _, reader = rendered
    series = series_frame()
    status = {row[0]: int(row[1]) for row in body_rows(reader, "qc-status-counts")}
    assert status == series["qc_status"].value_counts().to_dict()
    codes = Counter(code for reasons in series["qc_reasons"].dropna() for code in reasons.split("; "))
    got = {row[0]: int(row[1]) for row in body_rows(reader, "qc-reason-counts")}
    assert got == dict(codes)
    contrast = next(row for row in body_rows(reader, "qc-reason-counts") if row[0] == "contrast")
    assert contrast[2:] == ["2", "0"]  # both contrast series failed, none warned
    not_chosen = {row[0]: int(row[1]) for row in body_rows(reader, "not-chosen-counts")}
    assert not_chosen == {"Contrast-enhanced series.": 2, "Localizer images cannot be scored.": 1}


def test_reference_agreement(rendered):
    _, reader = rendered
    summary = dict(map(tuple, body_rows(reader, "reference-summary")))
    assert summary["scans with a reference score"] == "5"
    assert summary["risk category agreement"] == "4 / 5 (80.0%)"
    # 5 pairs, 4 on the diagonal; marginals give chance agreement 5/25.
    assert summary["Cohen's kappa (risk categories, unweighted)"] == f"{(0.8 - 0.2) / 0.8:.2f}"
    confusion = {row[0]: [int(c) for c in row[1:]] for row in body_rows(reader, "risk-confusion")}
    assert confusion["reference 11-100"] == [0, 1, 1, 0, 0]
    detection = {row[0]: row[1:5] for row in body_rows(reader, "detection")}
    assert detection[">= 10"] == ["3", "0", "1", "1"]  # P02 scored 5 against a reference of 12
    assert len(body_rows(reader, "reference-per-scan")) == 5


def test_reference_section_is_left_out_without_reference_data(tmp_path):
    scans = scans_frame().drop(columns=["reference_agatston_total", "reference_risk_category"])
    out = report.render_report(scans, series_frame(), lesions_frame(), tmp_path / "r.html")
    reader = TableReader()
    reader.feed(out.read_text(encoding="utf-8"))
    assert "reference" not in reader.section_ids
    assert "summary" in reader.section_ids


def test_self_contained(rendered):
    text, _ = rendered
    for forbidden in ("http://", "https://", 'src="/', "src='/", "<link", "@import", "url("):
        assert forbidden not in text
    assert text.count("<svg") >= 4


def test_images_are_embedded_decodable_pngs(rendered):
    _, reader = rendered
    assert len(reader.image_sources) == 3
    for source in reader.image_sources:
        assert source.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        image.verify()
        assert image.format == "PNG"


def test_text_is_escaped(rendered):
    text, reader = rendered
    assert "<script>" not in text
    assert "&lt;script&gt;" in text
    assert "Test cohort <b>" not in text and "Test cohort &lt;b&gt;" in text
    listed = [row[0] for row in body_rows(reader, "reference-per-scan")]
    assert EVIL_ID in listed  # decoded by the parser: shown, not executed


def test_no_uids_in_report(rendered):
    text, _ = rendered
    assert not re.search(r"1\.2\.\d", text)


def test_pick_overlay_slices_orders_by_labelled_calcium():
    hu, labels = phantom()
    assert report.pick_overlay_slices(hu, labels, n=1) == [4]
    assert report.pick_overlay_slices(hu, labels, n=2) == [1, 4]
    assert report.pick_overlay_slices(hu, labels, n=10) == [1, 2, 4]
    assert report.pick_overlay_slices(hu, np.zeros_like(labels)) == [3]


def test_slices_with_unsure_calls_come_first():
    hu, labels = phantom()
    unsure = np.zeros(hu.shape, bool)
    hu[0, 28:30, 28:30] = 180.0  # a small unsure candidate on slice 0, labelled nowhere
    unsure[0, 28:30, 28:30] = True
    assert report.pick_overlay_slices(hu, labels, n=1, unsure=unsure) == [0]
    assert report.pick_overlay_slices(hu, labels, n=2, unsure=unsure) == [0, 4]
    assert report.pick_overlay_slices(hu, np.zeros_like(labels), unsure=unsure) == [0]


def test_overlay_png_boxes_unsure_calls():
    hu, labels = phantom()
    unsure = np.zeros(hu.shape[1:], bool)
    unsure[20:22, 20:24] = True  # rows 20-21, columns 20-23
    plain = Image.open(io.BytesIO(report.overlay_png(hu[4], labels[4]))).convert("RGB")
    boxed = Image.open(io.BytesIO(report.overlay_png(hu[4], labels[4], unsure=unsure))).convert("RGB")
    scale = boxed.width // 32
    # the box runs 4 pixels outside the group: its top-left corner is at (16, 16)
    assert boxed.getpixel((16 * scale, 16 * scale)) == report.UNSURE_COLOUR
    assert plain.getpixel((16 * scale, 16 * scale)) != report.UNSURE_COLOUR
    assert boxed.getpixel((21 * scale, 21 * scale)) == plain.getpixel((21 * scale, 21 * scale))  # inside untouched
    legend_plain = {plain.getpixel((x, plain.height - 10)) for x in range(plain.width)}
    legend_boxed = {boxed.getpixel((x, boxed.height - 10)) for x in range(boxed.width)}
    assert report.UNSURE_COLOUR in legend_boxed - legend_plain
    with pytest.raises(ValueError, match="unsure mask shape"):
        report.overlay_png(hu[4], labels[4], unsure=unsure[:5])


def test_overlay_png_colours_each_vessel_and_has_a_legend():
    hu, labels = phantom()
    png = report.overlay_png(hu[4], labels[4])
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = image.width // 32
    assert scale >= 2 and image.height > image.width  # enlarged, legend strip below
    grey = image.getpixel((1 * scale, 1 * scale))
    assert grey[0] == grey[1] == grey[2]
    lad = image.getpixel((11 * scale, 11 * scale))
    assert lad[0] > lad[1] > lad[2]  # vermillion blend over bright calcium
    legend = {image.getpixel((x, image.height - 10)) for x in range(image.width)}
    assert set(report.VESSEL_COLOURS.values()) <= legend


def test_select_overlay_scans_puts_flagged_first():
    keys = report.select_overlay_scans(scans_frame(), n_high=2)
    # problems (QC warning, failure) in table order, then the scans to review, then the highest
    assert keys == [("P03", "v1"), ("P07", "v1"), ("P02", "v1"), ("P04", "v1"), (EVIL_ID, "v2")]


def test_review_overlays_are_capped_widest_range_first():
    scans = scans_frame()
    scans.loc[scans["participant_id"] == "P01", ["agatston_range_high", "risk_category_uncertain"]] = [30.0, True]
    # P01's range (0-30) is wider than P02's (5-12.5)
    assert report.select_overlay_scans(scans, n_high=0, n_review=1) == [("P03", "v1"), ("P07", "v1"), ("P01", "v1")]
    assert report.select_overlay_scans(scans, n_high=0) == [("P03", "v1"), ("P07", "v1"), ("P01", "v1"), ("P02", "v1")]


def test_review_section_counts_scans_not_assessed(tmp_path):
    scans = scans_frame()
    scans["risk_category_uncertain"] = scans["risk_category_uncertain"].astype(object)
    scans.loc[scans["participant_id"] == "P04", "risk_category_uncertain"] = None  # an older shard's row
    text = report.render_report(scans, series_frame(), lesions_frame(), tmp_path / "r.html").read_text()
    assert "1 scored scan(s) have no range" in text and "--forcerun infer" in text
    assert "In 1 of 4 assessed scan(s)" in text
