"""Per-series quality control: can this series be calcium-scored, and if not, why.

Each check gives ``pass``, ``warn`` (scorable, but flagged) or ``fail`` (not
scorable), a machine-readable code and a sentence an epidemiologist can act on.
The series status is the worst check. Every check, code and threshold is listed in
docs/qc.md.

Gating is inferred from several fields with a confidence and the evidence, because
de-identified gated scans often have their ECG tags blanked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from cacflow.discover import SeriesRecord

PASS, WARN, FAIL = "pass", "warn", "fail"
LIST_SEPARATOR = "; "  # as cacflow.tables: codes and evidence items
MESSAGE_SEPARATOR = " | "  # sentences
_SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class QCSettings:
    """QC thresholds (mm, degrees, kVp). Defaults follow the Agatston protocol."""

    scoring_thickness_mm: tuple[float, float] = (2.5, 3.0)  # standard calcium-scoring slices
    max_thickness_mm: float = 5.0  # thicker slices are not scored (non-gated chest CT up to here)
    preferred_thickness_mm: float = 3.0  # selection prefers the series closest to this
    expected_kvp: float = 120.0  # the 130 HU threshold is defined at 120 kVp
    max_tilt_deg: float = 0.5
    min_slices: int = 10
    min_fov_mm: float = 100.0  # the heart is ~120 mm across; zoomed cardiac FOVs are >= ~150 mm
    min_z_extent_mm: float = 80.0  # a heart is ~120 mm long; less coverage may cut it
    blood_pool_contrast_hu: float = 200.0  # aortic blood pool above this means contrast
    # Image noise (cacflow.pixel_noise) above which noise alone lifts specks over 130 HU on
    # the arteries of some scans, so that small scores are less certain (docs/qc.md).
    max_image_noise_hu: float = 30.0


DEFAULT_SETTINGS = QCSettings()


@dataclass(frozen=True)
class Check:
    name: str  # what was checked
    status: str  # pass | warn | fail
    code: str  # machine-readable; "ok" when passed
    message: str  # plain-English sentence: what is wrong and what to do


@dataclass(frozen=True)
class GatingEvidence:
    gated: bool | None  # None: no evidence either way
    confidence: str  # high | medium | low
    # "field:value" items, e.g. "series_description:CaSc", "scan_options:TP70PC";
    # evidence against gating is prefixed "against:".
    evidence: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesQC:
    series_uid: str
    checks: list[Check]
    gating: GatingEvidence
    scan_type: str  # gated | nongated

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=_SEVERITY.__getitem__, default=PASS)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status != PASS]

    @property
    def qc_reasons(self) -> str:
        """Codes of the checks that did not pass, in check order, joined by "; "."""
        return LIST_SEPARATOR.join(c.code for c in self.problems)

    def codes(self, status: str | None = None) -> list[str]:
        return [c.code for c in self.problems if status is None or c.status == status]

    def with_check(self, check: Check) -> SeriesQC:
        """A copy with one more check (e.g. the blood-pool check run at conversion)."""
        return replace(self, checks=[*self.checks, check])

    def to_row(self) -> dict:
        """QC columns of the cohort ``series`` table (``cacflow.tables``); empty lists are null."""
        contrast = next((c for c in self.checks if c.name == "contrast"), None)
        return {
            "series_uid": self.series_uid,
            "qc_status": self.status,
            "qc_reasons": self.qc_reasons or None,
            "qc_messages": MESSAGE_SEPARATOR.join(c.message for c in self.problems) or None,
            "contrast_agent_tag": contrast is not None and contrast.code in ("contrast_tag", "oral_contrast"),
            "scan_type": self.scan_type,
            "gated": self.gating.gated,
            "gating_confidence": self.gating.confidence,
            "gating_evidence": LIST_SEPARATOR.join(self.gating.evidence) or None,
        }


# --- gating inference ---

# Evidence weights: strong 3, medium 2, weak 1. A positive net score means gated,
# negative non-gated, zero unknown; the margin sets the confidence (>= 3 high,
# 2 medium, 1 low), and words in descriptions alone never give more than medium.
_TAG_KINDS = {"technique", "phase_tag", "trigger_time", "heart_rate", "scan_option_phase", "scan_option_rate",
              "scan_option_cardiac"}
_GATED_TECHNIQUES = {"PROSPECTIVE", "RETROSPECTIVE", "PACED"}
_UNGATED_TECHNIQUES = {"NONE", "REALTIME"}
_SCAN_OPTION_PHASE = re.compile(r"(?:TP|BESTPH\w*?)0*(\d{1,3})PC", re.I)  # Siemens TP70PC
_SCAN_OPTION_RATE = re.compile(r"OSCRATE(?:AVG|MIN|MAX)0*(\d{2,3})BPM", re.I)  # Siemens
_SCAN_OPTION_CARDIAC = re.compile(r"CARD|ECG|EKG|GATE|GATING|TRIGGER", re.I)  # GE, Philips, Canon wording

# Description keywords; "letters" boundaries so "CaSc_3.0" and "CS 3.0" both match.
_NEGATED_GATING = re.compile(r"(?<![a-z])(?:non|un|not|no)[\s_-]*(?:ecg[\s_-]*)?(?:gated|gating|triggered)", re.I)
_GATED_WORD = re.compile(r"(?<![a-z])(?:gated|gating|ecg|ekg|triggered|prospective|retrospective)(?![a-z])", re.I)
_CALCIUM_SCORE = re.compile(
    r"(?<![a-z])(?:casc|cascor(?:e|ing)|ca[\s_-]*scor(?:e|ing)|calcium|calc[\s_-]*score|smart[\s_-]*score|cac|agatston"
    r"|cs(?=[\s_-]*\d))(?![a-z])",
    re.I,
)
_CARDIAC_WORD = re.compile(r"(?<![a-z])(?:cardiac|cardio|heart|coronary|coronaries)(?![a-z])", re.I)
# "70%" is a cardiac phase, unless it is an iterative-reconstruction strength ("ASiR 40%").
_PHASE_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s*%")
_IR_STRENGTH = re.compile(r"(?:asir|asir-?v|veo|admire|safire|idose|aidr|ir)[\s_-]*$", re.I)
_CHEST_WORD = re.compile(r"(?<![a-z])(?:chest|thorax|thoracic|lung|lungs|pulmonary|abdomen|body)(?![a-z])", re.I)


def infer_gating(record: SeriesRecord) -> GatingEvidence:
    """Whether the series was ECG-gated, from tags and (blanked tags are common) descriptions."""
    positive: dict[str, tuple[int, str]] = {}  # kind -> (weight, evidence); each kind counts once
    negative: dict[str, tuple[int, str]] = {}

    technique = record.cardiac_sync_technique
    if technique in _GATED_TECHNIQUES:
        positive["technique"] = (3, f"cardiac_sync_technique:{technique}")
    elif technique in _UNGATED_TECHNIQUES:
        negative["technique"] = (3, f"cardiac_sync_technique:{technique}")
    if record.nominal_cardiac_phase_pct is not None:
        positive["phase_tag"] = (3, f"nominal_cardiac_phase_pct:{record.nominal_cardiac_phase_pct:g}")
    if record.trigger_time_ms:  # 0 is written by some scanners for ungated scans
        positive["trigger_time"] = (2, f"trigger_time_ms:{record.trigger_time_ms:g}")
    if record.heart_rate_bpm:
        positive["heart_rate"] = (2, f"heart_rate_bpm:{record.heart_rate_bpm:g}")

    options = record.scan_options or ""
    if match := _SCAN_OPTION_PHASE.search(options):
        positive["scan_option_phase"] = (3, f"scan_options:{match.group(0)}")
    if match := _SCAN_OPTION_RATE.search(options):
        positive["scan_option_rate"] = (2, f"scan_options:{match.group(0)}")
    if "scan_option_phase" not in positive and (match := _SCAN_OPTION_CARDIAC.search(options)):
        positive["scan_option_cardiac"] = (2, f"scan_options:{options}")

    for label, text in (("series_description", record.series_description), ("protocol_name", record.protocol_name)):
        if text:
            _description_evidence(label, text, positive, negative)
    if "calcium_word" in positive or "gated_word" in positive:
        negative.pop("chest_word", None)  # "Chest CaSc" is a calcium score, not a chest CT

    pos = sum(w for w, _ in positive.values())
    neg = sum(w for w, _ in negative.values())
    evidence = [e for _, e in positive.values()] + [f"against:{e}" for _, e in negative.values()]
    if pos == neg:
        return GatingEvidence(None, "low", evidence)
    margin = abs(pos - neg)
    confidence = "high" if margin >= 3 else "medium" if margin == 2 else "low"
    if confidence == "high" and not (_TAG_KINDS & (positive.keys() | negative.keys())):
        confidence = "medium"
    return GatingEvidence(pos > neg, confidence, evidence)


def _description_evidence(label: str, text: str, positive: dict, negative: dict) -> None:
    # Each kind of word counts once, from whichever field names it first.
    if match := _NEGATED_GATING.search(text):
        negative.setdefault("negated_word", (2, f"{label}:{match.group(0)}"))
        text = _NEGATED_GATING.sub(" ", text)
    if match := _GATED_WORD.search(text):
        positive.setdefault("gated_word", (2, f"{label}:{match.group(0)}"))
    if match := _CALCIUM_SCORE.search(text):
        positive.setdefault("calcium_word", (2, f"{label}:{match.group(0)}"))
    elif match := _CARDIAC_WORD.search(text):
        positive.setdefault("cardiac_word", (1, f"{label}:{match.group(0)}"))
    for match in _PHASE_PERCENT.finditer(text):
        if float(match.group(1)) <= 100 and not _IR_STRENGTH.search(text[: match.start()]):
            positive.setdefault("phase_word", (1, f"{label}:{match.group(0)}"))
            break
    if match := _CHEST_WORD.search(text):
        negative.setdefault("chest_word", (1, f"{label}:{match.group(0)}"))


# --- checks ---

_LOCALIZER_WORDS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM", "SCANOSCOPE"}
_LOCALIZER_TEXT = re.compile(r"(?<![a-z])(?:localizer|localiser|scout|topogram|surview|scanogram|scano)(?![a-z])", re.I)
_PROJECTION_WORDS = {"MIP", "MINIP", "MNIP", "MAXIP", "PROJECTION IMAGE", "VOLUME RENDERING", "VRT", "CPR", "CURVED"}
_NO_CONTRAST = re.compile(
    r"^(?:none|no|n|nil|non|0|without|native|no contrast|non[\s_-]*contrast|not applicable|n/?a|-)$", re.I
)
_CONTRAST_TEXT = re.compile(
    r"(?<![a-z])(?:cta|ccta|angio\w*|contrast|arterial|venous|portal|c\+|w[\s/]*contrast|with contrast)(?![a-z])",
    re.I,
)
_NO_CONTRAST_TEXT = re.compile(
    r"(?:non[\s_-]*contrast|without contrast|no contrast|w/?o[\s_-]*contrast|non[\s_-]*con(?![a-z])|native"
    r"|(?<![a-z])c-(?![a-z\d]))",
    re.I,
)


def scan_type_of(gated: bool) -> str:
    """The scan type recorded with each result: "gated" or "nongated" chest CT."""
    return "gated" if gated else "nongated"


def qc_series(record: SeriesRecord, settings: QCSettings = DEFAULT_SETTINGS) -> SeriesQC:
    """Run every check on one series.

    A series that is not a CT reconstruction at all (other modality, screenshot,
    localizer, projection) gets only those verdicts: thickness or spacing findings on
    a scout would only bury the reason that matters.
    """
    gating = infer_gating(record)
    scan_type = scan_type_of(gating.gated)
    identity = [*_check_modality(record), *_check_image_type(record)]
    if any(c.status == FAIL for c in identity):
        return SeriesQC(record.series_uid, [c for c in identity if c.status == FAIL], gating, scan_type)
    checks = [
        *identity,
        *_check_contrast(record),
        *_check_consistency(record),
        *_check_geometry(record, settings),
        *_check_thickness(record, settings),
        *_check_slices(record, settings),
        *_check_files(record),
        *_check_kvp(record, settings),
        *_check_rescale(record),
        _check_gating(gating),
    ]
    return SeriesQC(record.series_uid, checks, gating, scan_type)


def blood_pool_contrast_check(mean_hu: float | None, settings: QCSettings = DEFAULT_SETTINGS) -> Check:
    """Contrast from the image itself: mean HU of the aortic blood pool (measured at conversion)."""
    limit = settings.blood_pool_contrast_hu
    if mean_hu is None or mean_hu != mean_hu:
        return Check("blood_pool", WARN, "blood_pool_unmeasured",
                     "The aortic blood pool could not be measured, so contrast enhancement was not ruled out "
                     "from the image; check the tags-based contrast result.")
    if mean_hu > limit:
        return Check("blood_pool", FAIL, "contrast_blood_pool",
                     f"The aortic blood pool measures {mean_hu:.0f} HU (above {limit:.0f} HU): the scan is "
                     "contrast-enhanced, and contrast makes calcium scoring invalid. Use a non-contrast scan.")
    return Check("blood_pool", PASS, "ok", f"The aortic blood pool measures {mean_hu:.0f} HU: no contrast.")


def image_noise_check(noise_hu: float | None, settings: QCSettings = DEFAULT_SETTINGS) -> Check:
    """Pixel noise of the converted image (``cacflow.pixel_noise``, measured at conversion)."""
    limit = settings.max_image_noise_hu
    if noise_hu is None or noise_hu != noise_hu:
        return Check("image_noise", PASS, "ok", "The image noise could not be measured (too little soft tissue).")
    if noise_hu > limit:
        return Check("image_noise", WARN, "noisy_image",
                     f"The image noise measures {noise_hu:.0f} HU (above {limit:.0f} HU): noise this high lifts "
                     "specks of soft tissue over the 130 HU threshold, so small scores (Agatston under about 10) "
                     "are less certain, in both directions. The scan is scored.")
    return Check("image_noise", PASS, "ok", f"The image noise measures {noise_hu:.0f} HU.")


def _ok(name: str, message: str) -> list[Check]:
    return [Check(name, PASS, "ok", message)]


def _check_modality(r: SeriesRecord) -> list[Check]:
    checks = []
    if r.modality != "CT":
        checks.append(Check("modality", FAIL, "not_ct",
                            f"The series modality is {r.modality or 'missing'}, not CT; only CT can be "
                            "calcium-scored."))
    sop = r.sop_class_uid or ""
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        checks.append(Check("sop_class", FAIL, "secondary_capture",
                            "The series is a secondary capture (a screenshot or exported picture), which has no "
                            "Hounsfield units; use the original CT images."))
    elif sop and sop not in CT_SOP_CLASSES and r.modality == "CT":
        checks.append(Check("sop_class", FAIL, "unsupported_sop_class",
                            f"The series is stored as DICOM object type {sop}, not as CT images; use the "
                            "original CT image series."))
    return checks or _ok("modality", "The series holds CT images.")


def _check_image_type(r: SeriesRecord) -> list[Check]:
    values = set(r.image_type)
    if values & _LOCALIZER_WORDS or (r.series_description and _LOCALIZER_TEXT.search(r.series_description)):
        return [Check("image_type", FAIL, "localizer",
                      "The series is a localizer (scout/topogram) used to plan the scan, not a CT "
                      "reconstruction; it cannot be scored.")]
    if values & _PROJECTION_WORDS:
        return [Check("image_type", FAIL, "projection_image",
                      f"The series is a projection or rendering ({'/'.join(sorted(values & _PROJECTION_WORDS))}), "
                      "whose pixel values are not per-slice Hounsfield units; use the axial reconstruction.")]
    if r.image_type and r.image_type[0] == "DERIVED":
        return [Check("image_type", WARN, "derived_image",
                      f"The images are DERIVED ({'/'.join(r.image_type)}), i.e. reformatted or post-processed "
                      "rather than the scanner's original reconstruction; scored, but an ORIGINAL series is "
                      "preferred when one exists.")]
    return _ok("image_type", "The images are original CT reconstructions.")


def _check_contrast(r: SeriesRecord) -> list[Check]:
    agent = r.contrast_agent if r.contrast_agent and not _NO_CONTRAST.match(r.contrast_agent.strip()) else None
    route = r.contrast_route if r.contrast_route and not _NO_CONTRAST.match(r.contrast_route.strip()) else None
    if route and not agent and "ORAL" in route.upper():
        return [Check("contrast", WARN, "oral_contrast",
                      f"Oral contrast is recorded (route '{route}'); it does not reach the coronary arteries, "
                      "but dense bowel contrast near the heart can be mistaken for calcium. Review the result.")]
    if agent or route:
        found = ", ".join(f"{k} '{v}'" for k, v in (("ContrastBolusAgent", agent), ("ContrastBolusRoute", route)) if v)
        return [Check("contrast", FAIL, "contrast_tag",
                      f"The header records contrast ({found}). Calcium scoring needs a non-contrast scan "
                      "because contrast-filled vessels exceed the 130 HU calcium threshold.")]
    description = r.series_description or ""
    if (match := _CONTRAST_TEXT.search(description)) and not _NO_CONTRAST_TEXT.search(description):
        return [Check("contrast", WARN, "contrast_description",
                      f"The series description '{description}' suggests a contrast scan ('{match.group(0)}') "
                      "although no contrast tag is set; scored, but confirm it is non-contrast (the blood-pool "
                      "check at conversion will also test this).")]
    return _ok("contrast", "No contrast agent is recorded.")


def _check_consistency(r: SeriesRecord) -> list[Check]:
    problems = [
        (r.mixed_orientation, "mixed_orientation", "slices with different orientations"),
        (r.mixed_image_type, "mixed_image_type", "images of different types (e.g. localizer and axial)"),
        (r.mixed_matrix, "mixed_matrix", "images with different matrix sizes or pixel spacings"),
    ]
    return [
        Check("consistency", FAIL, code,
              f"One series UID holds {what}; it cannot be converted into one volume. Split the series in the "
              "archive or export the reconstructions separately.")
        for present, code, what in problems if present
    ] or _ok("consistency", "All images of the series share orientation, type and matrix.")


def _check_geometry(r: SeriesRecord, s: QCSettings) -> list[Check]:
    checks = []
    if r.n_missing_position or r.orientation is None:
        checks.append(Check("geometry", FAIL, "missing_geometry",
                            f"{r.n_missing_position or 'All'} slice(s) lack position or orientation tags, so the "
                            "slices cannot be ordered or spaced; re-export the series with full headers."))
    if r.pixel_spacing_row_mm is None:
        checks.append(Check("geometry", FAIL, "missing_pixel_spacing",
                            "Pixel spacing is missing, so lesion areas in mm² cannot be computed."))
    if r.orientation is not None and r.orientation not in ("axial", "tilted_axial"):
        checks.append(Check("orientation", FAIL, "not_axial",
                            f"The slices are {r.orientation} (slice normal {r.normal_angle_deg:.0f}° from the "
                            "feet-head axis); Agatston scoring needs axial slices. Use the axial series."))
    if r.fov_mm is not None and r.fov_mm < s.min_fov_mm:
        checks.append(Check("field_of_view", FAIL, "small_field_of_view",
                            f"The image is only {r.fov_mm:.0f} mm wide (minimum {s.min_fov_mm:g} mm); it cannot hold "
                            "the heart. This is not a diagnostic axial reconstruction."))
    if r.tilt_deg is not None and r.tilt_deg > s.max_tilt_deg:
        checks.append(Check("tilt", FAIL, "gantry_tilt",
                            f"The gantry was tilted by {r.tilt_deg:.1f}° (limit {s.max_tilt_deg:g}°); tilted slices "
                            "distort lesion areas. Use a non-tilted series or reslice it to true axial."))
    return checks or _ok("geometry", "Slices are axial, untilted and fully positioned.")


def _check_thickness(r: SeriesRecord, s: QCSettings) -> list[Check]:
    low, high = s.scoring_thickness_mm
    thickness = r.slice_thickness_mm
    eps = 0.01  # "3.000" vs 3.0 and similar rounding in headers
    if thickness is None:
        return [Check("slice_thickness", WARN, "missing_slice_thickness",
                      "Slice thickness is not recorded; the measured slice increment "
                      f"({_mm(r.slice_increment_mm)}) is used instead.")]
    if thickness > s.max_thickness_mm + eps:
        return [Check("slice_thickness", FAIL, "slice_thickness_out_of_range",
                      f"Slices are {thickness:g} mm thick (limit {s.max_thickness_mm:g} mm); small calcifications "
                      "are averaged away at this thickness. Use a thinner reconstruction.")]
    if thickness > high + eps:
        return [Check("slice_thickness", WARN, "thick_slices",
                      f"Slices are {thickness:g} mm thick, above the {low:g}-{high:g} mm calcium-scoring standard; "
                      "scores are comparable only with caution (typical for non-gated chest CT).")]
    if thickness < low - eps:
        return [Check("slice_thickness", WARN, "thin_slices",
                      f"Slices are {thickness:g} mm thick, thinner than the {low:g}-{high:g} mm standard; thin "
                      "slices detect more small calcium, so scores run higher than standard Agatston.")]
    return _ok("slice_thickness", f"Slice thickness {thickness:g} mm is standard for calcium scoring.")


def _check_slices(r: SeriesRecord, s: QCSettings) -> list[Check]:
    checks = []
    if r.n_slices < s.min_slices:
        checks.append(Check("slice_count", FAIL, "too_few_slices",
                            f"The series has {r.n_slices} usable slice(s) (minimum {s.min_slices}); it cannot "
                            "cover the heart."))
    elif r.z_extent_mm is not None and r.z_extent_mm < s.min_z_extent_mm:
        checks.append(Check("slice_count", WARN, "short_coverage",
                            f"The series covers only {r.z_extent_mm:.0f} mm along the body axis (expected at least "
                            f"{s.min_z_extent_mm:g} mm); part of the heart may be missing."))
    if r.n_gaps:
        checks.append(Check("slice_spacing", FAIL, "missing_slices",
                            f"{r.n_gaps} gap(s) in the slice positions (largest step {_mm(r.increment_max_mm)}, "
                            f"usual {_mm(r.slice_increment_mm)}): slices are missing, so calcium there would be "
                            "missed. Re-export the complete series."))
    if r.n_duplicate_positions:
        checks.append(Check("slice_spacing", FAIL, "duplicate_slices",
                            f"{r.n_duplicate_positions} slice(s) share a position with another slice (different "
                            "images at the same place, e.g. two phases or reconstructions in one series); the "
                            "volume is ambiguous."))
    if r.uneven_spacing:
        checks.append(Check("slice_spacing", WARN, "uneven_spacing",
                            f"Slice spacing varies from {_mm(r.increment_min_mm)} to {_mm(r.increment_max_mm)} "
                            f"({r.spacing_deviation_pct:.0f}% from the median); the slices are scored as stored, "
                            "placed at their mean spacing, so lesion positions along the body axis are "
                            "approximate and the score may shift slightly."))
    increment, thickness = r.slice_increment_mm, r.slice_thickness_mm
    if increment and thickness and not r.n_gaps:
        if increment > thickness * 1.1:
            checks.append(Check("slice_spacing", WARN, "noncontiguous_slices",
                                f"Slices are {thickness:g} mm thick but {increment:g} mm apart, leaving tissue "
                                "between slices unimaged; calcium there is missed."))
        elif increment < thickness * 0.9:
            checks.append(Check("slice_spacing", WARN, "overlapping_slices",
                                f"Slices are {thickness:g} mm thick but only {increment:g} mm apart (overlapping); "
                                "the score is corrected by the increment and differs from contiguous-slice "
                                "Agatston."))
    return checks or _ok("slice_spacing", f"{r.n_slices} evenly spaced slices at {_mm(r.slice_increment_mm)}.")


def _check_files(r: SeriesRecord) -> list[Check]:
    checks = []
    if r.n_unreadable_files:
        checks.append(Check("files", WARN, "unreadable_files",
                            f"{r.n_unreadable_files} file(s) of this series are truncated (pixel data cut short) "
                            "and were left out; the archive copy is incomplete."))
    if r.n_duplicate_files:
        checks.append(Check("files", WARN, "duplicate_files",
                            f"{r.n_duplicate_files} file(s) are exact copies of other files of this series "
                            "(same SOPInstanceUID) and were counted once."))
    return checks or _ok("files", "Every file of the series was readable and unique.")


def _check_kvp(r: SeriesRecord, s: QCSettings) -> list[Check]:
    if r.kvp is None:
        return [Check("kvp", WARN, "missing_kvp",
                      f"The tube voltage (KVP) is not recorded; the {s.expected_kvp:g} kVp threshold of 130 HU "
                      "is assumed.")]
    if abs(r.kvp - s.expected_kvp) > 0.5:
        return [Check("kvp", WARN, "kvp_not_120",
                      f"The scan used {r.kvp:g} kVp, not {s.expected_kvp:g} kVp; calcium's HU values depend on "
                      "kVp, so standard Agatston scores are biased (kVp-adjusted thresholds are optional).")]
    return _ok("kvp", f"Tube voltage is {r.kvp:g} kVp.")


def _check_rescale(r: SeriesRecord) -> list[Check]:
    if r.n_missing_rescale:
        return [Check("rescale", FAIL, "missing_rescale",
                      f"{r.n_missing_rescale} file(s) lack RescaleSlope/RescaleIntercept, so stored pixel values "
                      "cannot be converted to Hounsfield units reliably.")]
    if r.rescale_varies:
        return [Check("rescale", WARN, "rescale_varies",
                      "The Hounsfield-unit scaling differs between slices; conversion must apply it per slice.")]
    return _ok("rescale", "Pixel values convert to Hounsfield units with one scaling.")


def _check_gating(g: GatingEvidence) -> Check:
    evidence = ", ".join(g.evidence) or "no gating information in the headers"
    if g.gated and g.confidence == "low":
        return Check("gating", WARN, "gating_uncertain",
                     f"ECG gating is likely but weakly supported ({evidence}); scored as gated, please confirm.")
    if g.gated:
        return Check("gating", PASS, "ok", f"ECG-gated ({g.confidence} confidence: {evidence}).")
    why = "the headers say it is not" if g.gated is False else "no header shows ECG gating"
    return Check("gating", WARN, "not_gated",
                 f"The series is treated as non-gated ({why}: {evidence}); it is scored with the non-gated "
                 "chest-CT method, which agrees less well with gated Agatston scores.")


def _mm(value: float | None) -> str:
    return f"{value:g} mm" if value is not None else "unknown"
