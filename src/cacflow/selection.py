"""Choose the one series of a visit to score, and say why every other series lost.

Order of preference (first difference decides; see docs/qc.md):
  1. QC not failed
  2. ECG-gated before non-gated (non-gated chest CT is scored only when no gated
     series passes QC, and the visit is flagged)
  3. the expected kVp (120) before other or unknown kVp
  4. slice thickness closest to 3 mm (increment when thickness is missing)
  5. native (ORIGINAL) before derived images
  6. fewer remaining QC warnings
  7. larger z coverage, then 8. more slices
  9. deterministic tie-break: lower SeriesNumber, then SeriesInstanceUID
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from cacflow.discover import SeriesRecord
from cacflow.qc import DEFAULT_SETTINGS, FAIL, WARN, QCSettings, SeriesQC

SCORABLE, NOT_SCORABLE = "scorable", "not_scorable"

# Warnings already ranked by their own criterion, so not counted again in "fewer warnings".
_RANKED_WARNINGS = {"not_gated", "gating_uncertain", "kvp_not_120", "missing_kvp", "thin_slices",
                    "thick_slices", "missing_slice_thickness", "derived_image"}


class RankedSeries(NamedTuple):
    series_uid: str
    rank: int | None  # 1 = most preferred among series that passed QC; None when QC failed
    chosen: bool
    reason_not_chosen: str | None  # None for the chosen series


@dataclass(frozen=True)
class Selection:
    chosen_uid: str | None
    ranked: list[RankedSeries]
    visit_status: str  # scorable | not_scorable
    visit_reason: str | None  # None when a gated series was chosen without QC warnings
    scan_type: str | None  # gated | nongated, of the chosen series

    def to_rows(self) -> list[dict]:
        """Selection columns of the cohort ``series`` table, one dict per series."""
        return [{"series_uid": r.series_uid, "chosen": r.chosen, "selection_rank": r.rank,
                 "not_chosen_reason": r.reason_not_chosen} for r in self.ranked]


def select_series(series: list[tuple[SeriesRecord, SeriesQC]], prefer_gated: bool = True,
                  settings: QCSettings = DEFAULT_SETTINGS) -> Selection:
    """Rank the visit's series and choose the best one that did not fail QC.

    ``ranked`` lists every series, best first; series that failed QC come last with
    rank None.
    """
    if not series:
        return Selection(None, [], NOT_SCORABLE, "no scorable series: no CT series found in the visit folder", None)

    candidates = sorted(series, key=lambda pair: _preference(*pair, prefer_gated, settings))
    best_record, best_qc = candidates[0]
    chosen = best_qc.status != FAIL
    best_key = _preference(best_record, best_qc, prefer_gated, settings)

    ranked = []
    for position, (record, qc) in enumerate(candidates, start=1):
        is_chosen = chosen and position == 1
        rank = position if qc.status != FAIL else None
        reason = None if is_chosen else _reason_lost(record, qc, best_record, best_key, prefer_gated, settings)
        ranked.append(RankedSeries(record.series_uid, rank, is_chosen, reason))

    if not chosen:
        codes = Counter(code for _, qc in series for code in qc.codes(FAIL))
        listing = "; ".join(code for code, _ in codes.most_common())
        return Selection(None, ranked, NOT_SCORABLE,
                         f"no scorable series: {len(series)} series, all failed QC ({listing}); "
                         "each series' reason is in the series table", None)
    return Selection(best_record.series_uid, ranked, SCORABLE, _flags(best_qc, prefer_gated), best_qc.scan_type)


def _thickness(record: SeriesRecord) -> float | None:
    return record.slice_thickness_mm if record.slice_thickness_mm is not None else record.slice_increment_mm


def _kvp_off(record: SeriesRecord, settings: QCSettings) -> bool:
    return record.kvp is None or abs(record.kvp - settings.expected_kvp) > 0.5


def _other_warnings(qc: SeriesQC) -> list[str]:
    return [code for code in qc.codes(WARN) if code not in _RANKED_WARNINGS]


def _preference(record: SeriesRecord, qc: SeriesQC, prefer_gated: bool, settings: QCSettings) -> tuple:
    """Sort key: smaller is better, one element per criterion of the module docstring."""
    thickness = _thickness(record)
    return (
        qc.status == FAIL,
        prefer_gated and qc.scan_type != "gated",
        _kvp_off(record, settings),
        round(abs(thickness - settings.preferred_thickness_mm), 2) if thickness is not None else math.inf,
        not record.native,
        len(_other_warnings(qc)),
        -(record.z_extent_mm or 0.0),
        -record.n_slices,
        record.series_number if record.series_number is not None else math.inf,
        record.series_uid,
    )


def _reason_lost(record: SeriesRecord, qc: SeriesQC, best: SeriesRecord, best_key: tuple,
                 prefer_gated: bool, settings: QCSettings) -> str:
    if qc.status == FAIL:
        return f"failed QC: {'; '.join(qc.codes(FAIL))}"
    key = _preference(record, qc, prefer_gated, settings)
    criterion = next(i for i, (mine, theirs) in enumerate(zip(key, best_key)) if mine != theirs)
    if criterion == 1:
        return "lower preference: non-gated while a gated series exists"
    if criterion == 2:
        kvp = f"{record.kvp:g} kVp" if record.kvp is not None else "kVp not recorded"
        return f"lower preference: {kvp}; {settings.expected_kvp:g} kVp preferred"
    if criterion == 3:
        thickness = _thickness(record)
        if thickness is None:
            return f"lower preference: slice thickness unknown; {settings.preferred_thickness_mm:g} mm preferred"
        kind = "thin" if thickness < settings.preferred_thickness_mm else "thick"
        return f"lower preference: {thickness:g} mm {kind} recon; {settings.preferred_thickness_mm:g} mm preferred"
    if criterion == 4:
        return "lower preference: derived image; a native (ORIGINAL) series is preferred"
    if criterion == 5:
        return f"lower preference: more QC warnings ({', '.join(_other_warnings(qc))})"
    if criterion == 6:
        return (f"lower preference: less z coverage ({record.z_extent_mm or 0:.0f} mm vs "
                f"{best.z_extent_mm or 0:.0f} mm)")
    if criterion == 7:
        return f"lower preference: fewer slices ({record.n_slices} vs {best.n_slices})"
    return "same preference as the chosen series; chosen by lower SeriesNumber/SeriesInstanceUID"


def _flags(qc: SeriesQC, prefer_gated: bool) -> str:
    parts = []
    if prefer_gated and qc.scan_type != "gated":
        parts.append("scored on a non-gated series: no gated series passed QC")
    warnings = qc.codes(WARN)
    if warnings:
        parts.append(f"chosen series has QC warnings ({', '.join(warnings)})")
    return "; ".join(parts) or None
