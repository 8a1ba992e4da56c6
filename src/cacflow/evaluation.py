"""Agreement of predicted calcium scores with reference scores, in the form of the
reference system's paper (Eng et al., npj Digital Medicine 2021).

Everything works on pandas DataFrames keyed by (participant_id, visit):

* ``match_tables`` pairs the predicted scans table with a reference table and
  accounts for every row that is not compared (unmatched, not scored, no
  reference score);
* ``risk_category_agreement``, ``threshold_metrics``, ``icc``, ``bland_altman`` and
  ``vessel_agreement`` compute the statistics on the matched pairs;
* ``evaluate`` runs them all, overall and per scan type ('gated' / 'nongated');
* ``metrics_table`` / ``write_evaluation_tables`` give one tidy table
  (metric, stratum, estimate, ci_low, ci_high, n, ci_method);
* ``render_evaluation`` writes one self-contained HTML report;
* ``score_manifest`` scores every visit of a manifest with ``score-scan``'s logic,
  for the held-out evaluation cohort of the workflow.

Confidence intervals (all 95 %): Wilson score intervals for proportions; a
participant-level (cluster) percentile bootstrap, seeded, for Cohen's kappa and F1;
the F-distribution interval of McGraw & Wong (1996) for ICC(2,1); t-based
intervals of Bland & Altman (1986, 1999) for the mean difference and the limits of
agreement. docs/evaluation.md has the definitions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from cacflow import VESSEL_NAMES, __version__
from cacflow.report import (
    AGREEMENT_THRESHOLDS,
    _e,
    _scatter_svg,
    _svg,
    _table,
    cohen_kappa,
    confusion_matrix,
    write_html_page,
)
from cacflow.tables import RISK_CATEGORY_VALUES, SCAN_TYPE_VALUES, atomic_write

log = logging.getLogger("cacflow.evaluation")

KEYS = ("participant_id", "visit")
SCORE_COLUMNS = ("agatston_total", *(f"agatston_{v}" for v in VESSEL_NAMES))
CONFIDENCE = 0.95
Z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))  # 1.959964...
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 0
METRICS_COLUMNS = ("metric", "stratum", "estimate", "ci_low", "ci_high", "n", "ci_method")
# Reference column listing non-coronary calcium in the scan (';'-joined kinds, '' for
# none), as the generated cohorts' reference_scores.tsv has it.
NONCORONARY_COLUMN = "noncoronary_calcium"
NONCORONARY_ZERO_TARGET = 0.95  # issue: >= 95 % of such scans without coronary calcium score 0
ALL = "all"
# Predicted column flagging scans whose risk category hangs on calls the model was
# unsure about (cacflow's scans table has it; other tools' tables need not).
REVIEW_COLUMN = "risk_category_uncertain"

CI_WILSON = "Wilson score"
CI_BOOTSTRAP = "participant-level percentile bootstrap"
CI_ICC = "F-based (McGraw & Wong 1996)"
CI_T = "t-based (Bland & Altman)"
_BOOTSTRAP_CHUNK = 250
_MIN_VALID_RESAMPLES = 0.5  # fewer defined resample statistics than this share: no CI


class EvaluationInputError(ValueError):
    """A predicted or reference table that cannot be evaluated (the message says why)."""


# --------------------------------------------------------------------------- reading


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A predicted or reference table from Parquet, TSV or CSV. Keys are read as text;
    empty cells are missing values."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    elif suffix in (".tsv", ".tab", ".txt", ".csv"):
        frame = pd.read_csv(path, sep="," if suffix == ".csv" else "\t",
                            dtype={k: "string" for k in (*KEYS, "coca_id")}, keep_default_na=True)
    else:
        raise EvaluationInputError(f"{path}: expected a .parquet, .tsv or .csv file")
    return frame


def normalise_reference(reference: pd.DataFrame) -> pd.DataFrame:
    """The reference in the evaluation's form: ``participant_id``, ``visit`` (null when
    the reference has none, as in ``cacflow coca-reference`` output whose key is
    ``coca_id``) and the score columns; rows whose reference failed (COCA ``status``
    other than 'ok') get no score, so they are reported, never compared."""
    frame = reference.copy()
    if "participant_id" not in frame:
        if "coca_id" not in frame:
            raise EvaluationInputError("reference table needs a participant_id (or coca_id) column")
        frame = frame.rename(columns={"coca_id": "participant_id"})
    if "visit" not in frame:
        frame["visit"] = pd.NA
    if "agatston_total" not in frame:
        raise EvaluationInputError("reference table needs an agatston_total column")
    for column in SCORE_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else np.nan
    if "status" in frame and "coca_id" in reference:
        failed = frame["status"].astype("string").fillna("") != "ok"
        frame.loc[failed, list(SCORE_COLUMNS)] = np.nan
    frame["participant_id"] = _key_text(frame["participant_id"])
    frame["visit"] = _key_text(frame["visit"])
    if frame["participant_id"].isna().any():
        raise EvaluationInputError("reference table has rows without a participant_id")
    return frame.reset_index(drop=True)


# Generated references (cacflow synth) also hold image-based scores under this prefix:
# what the scored series shows of the coronary plaques (noise included), as a reader
# would score it (cacflow.synth.phantom.image_reference).
IMAGE_REFERENCE_PREFIX = "image_"


def image_based_reference(reference: pd.DataFrame) -> pd.DataFrame:
    """The reference with its image-based scores (``image_agatston_*``,
    ``image_risk_category``) in place of its primary ones, so every statistic compares
    with what the scan shows. The primary's other score columns (volume, lesion count,
    CAC-DRS), which have no image-based counterpart, are dropped rather than mixed in."""
    if f"{IMAGE_REFERENCE_PREFIX}agatston_total" not in reference:
        raise EvaluationInputError(
            f"reference table has no {IMAGE_REFERENCE_PREFIX}agatston_total column: image-based scores come with "
            "cohorts generated by cacflow synth since 2026-12-04; generate the cohort again (the same seed gives "
            "the same scans: `snakemake evaluate --forcerun evaluation_cohort`, or `cacflow synth`)")
    image_columns = {f"{IMAGE_REFERENCE_PREFIX}{column}": column
                     for column in (*SCORE_COLUMNS, "risk_category") if f"{IMAGE_REFERENCE_PREFIX}{column}" in reference}
    primary_only = [*SCORE_COLUMNS, "risk_category", "cac_drs", "volume_mm3", "lesion_count"]
    return reference.drop(columns=[c for c in primary_only if c in reference]).rename(columns=image_columns)


def normalise_predicted(predicted: pd.DataFrame) -> pd.DataFrame:
    frame = predicted.copy()
    missing = [c for c in (*KEYS, "agatston_total") if c not in frame]
    if missing:
        raise EvaluationInputError(f"predicted table lacks column(s) {missing}")
    for column in SCORE_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else np.nan
    if "status" not in frame:  # a plain table of scores: a row with a total is scored
        frame["status"] = np.where(frame["agatston_total"].notna(), "scored", "not_scorable")
    frame["participant_id"] = _key_text(frame["participant_id"])
    frame["visit"] = _key_text(frame["visit"])
    if frame["participant_id"].isna().any() or frame["visit"].isna().any():
        raise EvaluationInputError("predicted table has rows without participant_id or visit")
    return frame.reset_index(drop=True)


def _key_text(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return text.where(text != "", pd.NA)


# --------------------------------------------------------------------------- matching


@dataclass
class Match:
    """Result of ``match_tables``: the compared pairs and every row left out, by reason."""

    pairs: pd.DataFrame  # one row per compared scan
    not_scored: pd.DataFrame  # matched, but the predicted row is not 'scored'
    reference_without_score: pd.DataFrame  # matched and scored, but the reference has no score
    predicted_unmatched: pd.DataFrame  # predicted keys absent from the reference
    reference_unmatched: pd.DataFrame  # reference keys absent from the predictions (or ambiguous)
    counts: dict = field(default_factory=dict)


def match_tables(predicted: pd.DataFrame, reference: pd.DataFrame) -> Match:
    """Inner join of predicted and reference on (participant_id, visit).

    A reference row without a visit (``coca-reference`` output) matches the single
    predicted row of its participant; with several, it is reported as ambiguous.
    Matched predicted rows that are not 'scored' are reported as 'not scored' and
    left out of every statistic, as are matched rows whose reference has no score.
    Risk categories are derived from ``agatston_total`` on both sides with
    ``cacflow.scoring.risk_category``, so both use the same boundaries.
    """
    pred = normalise_predicted(predicted)
    ref = normalise_reference(reference)
    _check_unique(pred, list(KEYS), "predicted")
    _check_unique(ref[ref["visit"].notna()], list(KEYS), "reference")
    _check_unique(ref[ref["visit"].isna()], ["participant_id"], "reference (rows without visit)")

    pred = pred.assign(_pred_row=np.arange(len(pred)))
    ref = ref.assign(_ref_row=np.arange(len(ref)))
    with_visit = ref[ref["visit"].notna()]
    joined = pred.merge(with_visit.drop(columns=[c for c in ref if c not in (*KEYS, "_ref_row")]),
                        on=list(KEYS), how="inner")[["_pred_row", "_ref_row"]]
    ambiguous = []
    without_visit = ref[ref["visit"].isna()]
    if len(without_visit):
        free = pred[~pred["_pred_row"].isin(joined["_pred_row"])]
        candidates = free.merge(without_visit[["participant_id", "_ref_row"]], on="participant_id")
        per_ref = candidates.groupby("_ref_row")["_pred_row"].transform("size")
        ambiguous = sorted(set(candidates.loc[per_ref > 1, "_ref_row"]))
        joined = pd.concat([joined, candidates.loc[per_ref == 1, ["_pred_row", "_ref_row"]]], ignore_index=True)

    matched = pred.loc[joined["_pred_row"].to_numpy()].reset_index(drop=True)
    matched_ref = ref.loc[joined["_ref_row"].to_numpy()].reset_index(drop=True)
    scored = ((matched["status"].astype("string") == "scored").fillna(False).to_numpy(dtype=bool)
              & matched["agatston_total"].notna().to_numpy(dtype=bool))
    has_reference = matched_ref["agatston_total"].notna().to_numpy()

    pairs = pd.DataFrame({"participant_id": matched["participant_id"], "visit": matched["visit"]})
    pairs["scan_type"] = matched["scan_type"].astype("string") if "scan_type" in matched else pd.NA
    for column in SCORE_COLUMNS:
        pairs[f"predicted_{column}"] = matched[column].astype(float)
        pairs[f"reference_{column}"] = matched_ref[column].astype(float)
    if NONCORONARY_COLUMN in matched_ref:  # generated references record it; others may not
        pairs[f"reference_{NONCORONARY_COLUMN}"] = matched_ref[NONCORONARY_COLUMN].astype("string").fillna("")
    if REVIEW_COLUMN in matched:  # cacflow's own scans tables flag scans for review
        try:  # null: not assessed (e.g. inferred by an older version), kept apart from "not flagged"
            pairs[f"predicted_{REVIEW_COLUMN}"] = matched[REVIEW_COLUMN].astype("boolean")
        except (TypeError, ValueError) as error:
            raise EvaluationInputError(f"predicted column {REVIEW_COLUMN} must hold true/false/null: {error}") from error
    compared = scored & has_reference
    pairs = pairs[compared].reset_index(drop=True)
    pairs["predicted_risk_category"] = [_risk(v) for v in pairs["predicted_agatston_total"]]
    pairs["reference_risk_category"] = [_risk(v) for v in pairs["reference_agatston_total"]]
    pairs = pairs.sort_values(list(KEYS), kind="stable").reset_index(drop=True)

    def listing(mask: np.ndarray) -> pd.DataFrame:
        rows = matched[mask]
        return pd.DataFrame({
            "participant_id": rows["participant_id"].to_numpy(),
            "visit": rows["visit"].to_numpy(),
            "status": rows["status"].astype("string").to_numpy(),
            "status_reason": _optional(rows, "status_reason").to_numpy(),
            "predicted_agatston_total": rows["agatston_total"].to_numpy(dtype=float),
            "reference_agatston_total": matched_ref.loc[mask, "agatston_total"].to_numpy(dtype=float),
        }).sort_values(list(KEYS), kind="stable").reset_index(drop=True)

    not_scored = listing(~scored)
    reference_without_score = listing(scored & ~has_reference)
    predicted_unmatched = pred[~pred["_pred_row"].isin(joined["_pred_row"])]
    predicted_unmatched = pd.DataFrame({
        "participant_id": predicted_unmatched["participant_id"], "visit": predicted_unmatched["visit"],
        "status": predicted_unmatched["status"].astype("string"),
    }).reset_index(drop=True)
    unmatched_ref = ref[~ref["_ref_row"].isin(joined["_ref_row"])]
    reference_unmatched = pd.DataFrame({
        "participant_id": unmatched_ref["participant_id"], "visit": unmatched_ref["visit"],
        "reason": np.where(unmatched_ref["_ref_row"].isin(ambiguous),
                           "no visit in the reference and several predicted visits", "no predicted row"),
    }).reset_index(drop=True)
    counts = {
        "predicted rows": len(pred),
        "reference rows": len(ref),
        "matched": len(matched),
        "compared": len(pairs),
        "not scored": len(not_scored),
        "not scored, reference has a score": int((~scored & has_reference).sum()),
        "not scored, reference has no score either": int((~scored & ~has_reference).sum()),
        "scored, reference has no score": len(reference_without_score),
        "predicted rows without reference": len(predicted_unmatched),
        "reference rows without prediction": len(reference_unmatched),
    }
    return Match(pairs, not_scored, reference_without_score, predicted_unmatched, reference_unmatched, counts)


def _check_unique(frame: pd.DataFrame, keys: list[str], name: str) -> None:
    duplicated = frame.duplicated(keys, keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, keys].iloc[0].to_dict()
        raise EvaluationInputError(f"{name} table has duplicated key(s) {keys}, e.g. {example}")


def _optional(frame: pd.DataFrame, column: str) -> pd.Series:
    if column in frame:
        return frame[column].astype("string")
    return pd.Series(pd.NA, index=frame.index, dtype="string")


def _risk(score: float) -> str:
    from cacflow.scoring import risk_category

    return risk_category(float(score))


# --------------------------------------------------------------------------- interval helpers


def wilson_interval(successes: int, n: int, z: float = Z) -> tuple[float | None, float | None]:
    """Wilson score interval of a binomial proportion; (None, None) when n == 0."""
    if n == 0:
        return None, None
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    # Exact at the ends (the formula lands a rounding error short of 0 or 1).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_sums(features: np.ndarray, groups: Sequence, n_bootstrap: int, seed: int) -> np.ndarray:
    """Column sums of ``features`` (rows x m) over ``n_bootstrap`` resamples that draw
    participants (``groups``) with replacement, keeping all of a participant's rows
    together (visits of one person are not independent). Shape (n_bootstrap, m).
    The same seed and groups give the same resamples for every statistic. With
    fewer than two participants there is nothing to resample: no rows."""
    features = np.asarray(features, dtype=float)
    if n_bootstrap <= 0 or len(features) == 0:
        return np.empty((0, features.shape[1] if features.ndim == 2 else 0))
    codes, uniques = pd.factorize(pd.Series(list(groups), dtype="object"), sort=True)
    if len(uniques) < 2:  # one participant: every resample is the sample itself
        return np.empty((0, features.shape[1]))
    per_group = np.zeros((len(uniques), features.shape[1]))
    np.add.at(per_group, codes, features)
    rng = np.random.default_rng(seed)
    n_groups = len(uniques)
    chunks = []
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
        chunks.append(weights @ per_group)
    return np.concatenate(chunks)


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile interval of bootstrap statistics; undefined (NaN) resamples are
    dropped, and with fewer than half defined there is no interval."""
    values = np.asarray(values, dtype=float)
    valid = values[np.isfinite(values)]
    if values.size == 0 or valid.size < _MIN_VALID_RESAMPLES * values.size:
        return None, None
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(valid, [alpha, 1 - alpha])
    return float(low), float(high)


# --------------------------------------------------------------------------- kappa


def kappa_weights(k: int, kind: str = "none") -> np.ndarray:
    """Agreement weights: identity (unweighted) or linear, 1 - |i - j| / (k - 1)."""
    if kind == "none":
        return np.eye(k)
    if kind == "linear":
        i, j = np.indices((k, k))
        return 1.0 - np.abs(i - j) / (k - 1)
    raise ValueError(f"unknown kappa weighting {kind!r}")


def weighted_kappa(confusion: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cohen's (weighted) kappa of one (k x k) or many (B x k x k) confusion matrices:
    (p_o - p_e) / (1 - p_e) with agreement weights; NaN where undefined."""
    table = np.asarray(confusion, dtype=float)
    n = table.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = table / n[..., None, None]
        observed = (p * weights).sum(axis=(-2, -1))
        rows, cols = p.sum(axis=-1), p.sum(axis=-2)
        expected = np.einsum("...i,ij,...j->...", rows, weights, cols)
        kappa = (observed - expected) / (1.0 - expected)
    return np.where((n > 0) & ~np.isclose(expected, 1.0), kappa, np.nan)


def _kappa_with_ci(confusion: np.ndarray, codes_ref, codes_pred, groups, k: int, kind: str,
                   n_bootstrap: int, seed: int) -> dict:
    weights = kappa_weights(k, kind)
    if kind == "none":
        estimate = cohen_kappa(confusion)  # the cohort report's helper: one definition
    else:
        value = float(weighted_kappa(confusion, weights))
        estimate = None if math.isnan(value) else value
    codes_ref, codes_pred = np.asarray(codes_ref, dtype=int), np.asarray(codes_pred, dtype=int)
    cells = np.zeros((len(codes_ref), k * k))
    cells[np.arange(len(codes_ref)), codes_ref * k + codes_pred] = 1
    sums = bootstrap_sums(cells, groups, n_bootstrap, seed)
    low, high = (None, None)
    if estimate is not None:
        low, high = percentile_interval(weighted_kappa(sums.reshape(-1, k, k), weights))
    return {"estimate": estimate, "ci_low": low, "ci_high": high, "n": int(confusion.sum()),
            "ci_method": f"{CI_BOOTSTRAP} ({n_bootstrap} resamples)" if low is not None else None}


def risk_category_agreement(pairs: pd.DataFrame, *, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                            seed: int = DEFAULT_SEED) -> dict:
    """Risk categories 0, 1-10, 11-100, 101-400, >400: confusion matrix (rows
    reference, columns predicted), percent agreement (Wilson CI), Cohen's kappa
    unweighted and linearly weighted (participant-level bootstrap CI)."""
    categories = list(RISK_CATEGORY_VALUES)
    reference, predicted = pairs["reference_risk_category"], pairs["predicted_risk_category"]
    confusion = confusion_matrix(reference, predicted, categories)
    n = int(confusion.sum())
    agree = int(np.trace(confusion))
    index = {c: i for i, c in enumerate(categories)}
    codes_ref = [index[c] for c in reference]
    codes_pred = [index[c] for c in predicted]
    low, high = wilson_interval(agree, n)
    common = (codes_ref, codes_pred, pairs["participant_id"], len(categories))
    return {
        "categories": categories,
        "confusion": confusion,
        "n": n,
        "agreement": {"estimate": agree / n if n else None, "ci_low": low, "ci_high": high, "n": n,
                      "ci_method": CI_WILSON if n else None, "count": agree},
        "kappa": _kappa_with_ci(confusion, *common, "none", n_bootstrap, seed),
        "kappa_linear": _kappa_with_ci(confusion, *common, "linear", n_bootstrap, seed),
    }


# --------------------------------------------------------------------------- thresholds


def _proportion(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"estimate": successes / n if n else None, "ci_low": low, "ci_high": high, "n": n,
            "ci_method": CI_WILSON if n else None}


def _f1(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def threshold_metrics(pairs: pd.DataFrame, cutoffs: Iterable[float] = AGREEMENT_THRESHOLDS, *,
                      n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> list[dict]:
    """Detection of CAC >= t for each cutoff t (positive: score >= t, on both sides):
    TP/FP/TN/FN, sensitivity, specificity, PPV, NPV (Wilson CIs) and F1 (bootstrap CI).
    A proportion whose denominator is zero is null."""
    predicted = pairs["predicted_agatston_total"].to_numpy(dtype=float)
    reference = pairs["reference_agatston_total"].to_numpy(dtype=float)
    results = []
    for cutoff in cutoffs:
        pred, ref = predicted >= cutoff, reference >= cutoff
        tp, fp = int((pred & ref).sum()), int((pred & ~ref).sum())
        fn, tn = int((~pred & ref).sum()), int((~pred & ~ref).sum())
        f1 = float(_f1(tp, fp, fn))
        sums = bootstrap_sums(np.column_stack([pred & ref, pred & ~ref, ~pred & ref]),
                              pairs["participant_id"], n_bootstrap, seed)
        low, high = percentile_interval(_f1(*sums.T)) if not math.isnan(f1) else (None, None)
        results.append({
            "cutoff": cutoff, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(pairs),
            "sensitivity": _proportion(tp, tp + fn),
            "specificity": _proportion(tn, tn + fp),
            "ppv": _proportion(tp, tp + fp),
            "npv": _proportion(tn, tn + fn),
            "f1": {"estimate": None if math.isnan(f1) else f1, "ci_low": low, "ci_high": high,
                   "n": 2 * tp + fp + fn,
                   "ci_method": f"{CI_BOOTSTRAP} ({n_bootstrap} resamples)" if low is not None else None},
        })
    return results


def noncoronary_calcium_zeros(pairs: pd.DataFrame) -> dict | None:
    """Scans whose reference has no coronary calcium but some other calcium (aortic
    wall or valve, mitral annulus; bone is in every scan): the share the model scored
    0 (Wilson CI), and the scans it did not. None when the reference does not record
    non-coronary calcium."""
    column = f"reference_{NONCORONARY_COLUMN}"
    if column not in pairs:
        return None
    kinds = pairs[column].astype("string").fillna("")
    subset = pairs[(pairs["reference_agatston_total"] == 0) & (kinds != "")]
    zero = subset["predicted_agatston_total"].to_numpy(dtype=float) == 0
    result = _proportion(int(zero.sum()), len(subset))
    result["count"] = int(zero.sum())
    result["target"] = NONCORONARY_ZERO_TARGET
    result["not_zero"] = subset.loc[~zero, [*KEYS, column, "predicted_agatston_total"]].reset_index(drop=True)
    return result


def review_flags(pairs: pd.DataFrame) -> dict | None:
    """How useful the review flag is: the share of scans flagged, and how many of the
    scans whose risk category disagrees with the reference were flagged (Wilson CIs).
    None when the predicted table has no flag."""
    column = f"predicted_{REVIEW_COLUMN}"
    if column not in pairs:
        return None
    assessed = pairs[pairs[column].notna()]
    flagged = assessed[column].to_numpy(dtype=bool)
    wrong = (assessed["predicted_risk_category"] != assessed["reference_risk_category"]).to_numpy()
    return {
        "not_assessed": len(pairs) - len(assessed),
        "flagged": {**_proportion(int(flagged.sum()), len(assessed)), "count": int(flagged.sum())},
        "disagreements_flagged": {**_proportion(int((flagged & wrong).sum()), int(wrong.sum())),
                                  "count": int((flagged & wrong).sum())},
        "agreements_flagged": int((flagged & ~wrong).sum()),
    }


# --------------------------------------------------------------------------- ICC


def icc_2_1(ratings: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """ICC(2,1) of an (n subjects x k raters) matrix: two-way random effects, absolute
    agreement, single measure (Shrout & Fleiss 1979 case 2; McGraw & Wong 1996
    ICC(A,1)), from the two-way ANOVA mean squares, with the F-based interval.

        ICC = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)

    The estimate is null when it is undefined (n < 2, or no variance at all); the
    interval is null when MSE is 0 (perfect agreement: no F distribution)."""
    y = np.asarray(ratings, dtype=float)
    if y.ndim != 2 or y.shape[1] < 2:
        raise ValueError("ratings must be an (n subjects x k >= 2 raters) matrix")
    y = y[np.isfinite(y).all(axis=1)]
    n, k = y.shape
    result = {"estimate": None, "ci_low": None, "ci_high": None, "n": n, "ci_method": None}
    if n < 2:
        return result
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc = ss_rows / (n - 1), ss_cols / (k - 1)
    mse = max(ss_error, 0.0) / ((n - 1) * (k - 1))
    result.update(ms_rows=msr, ms_cols=msc, ms_error=mse)
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    if denominator <= 0:
        return result
    icc = (msr - mse) / denominator
    result["estimate"] = float(icc)
    if mse <= 0 or icc >= 1:
        return result
    alpha = 1 - confidence
    a = k * icc / (n * (1 - icc))
    b = 1 + k * icc * (n - 1) / (n * (1 - icc))
    v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1)))
    f_upper = stats.f.ppf(1 - alpha / 2, n - 1, v)
    f_lower = stats.f.ppf(1 - alpha / 2, v, n - 1)
    low = n * (msr - f_upper * mse) / (f_upper * (k * msc + (k * n - k - n) * mse) + n * msr)
    high = n * (f_lower * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_lower * msr)
    result.update(ci_low=float(low), ci_high=float(high), ci_method=CI_ICC, df_v=float(v))
    return result


def icc(pairs: pd.DataFrame, column: str = "agatston_total", *, log: bool = False) -> dict:
    """ICC(2,1) between predicted and reference ``column``; with ``log``, on ln(1 + score)."""
    values = pairs[[f"predicted_{column}", f"reference_{column}"]].to_numpy(dtype=float)
    return icc_2_1(np.log1p(values) if log else values)


# --------------------------------------------------------------------------- Bland-Altman


def bland_altman(pairs: pd.DataFrame, column: str = "agatston_total", *, log: bool = False) -> dict:
    """Differences predicted - reference (with ``log``: of ln(1 + score)): mean,
    SD, 95 % limits of agreement mean +/- 1.96 SD, and t-based CIs: mean +/- t SD/sqrt(n),
    limits +/- t sqrt(3 SD^2 / n) (Bland & Altman 1986, 1999)."""
    values = pairs[[f"predicted_{column}", f"reference_{column}"]].dropna().to_numpy(dtype=float)
    if log:
        values = np.log1p(values)
    difference = values[:, 0] - values[:, 1]
    n = len(difference)
    empty = {"estimate": None, "ci_low": None, "ci_high": None, "n": n, "ci_method": None}
    result = {"n": n, "log": log, "means": values.mean(axis=1) if n else np.empty(0), "differences": difference,
              "mean_difference": dict(empty), "sd_difference": dict(empty),
              "loa_lower": dict(empty), "loa_upper": dict(empty)}
    if n == 0:
        return result
    mean = float(difference.mean())
    result["mean_difference"] = dict(empty, estimate=mean)
    if n < 2:
        return result
    sd = float(difference.std(ddof=1))
    t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1))
    se_mean, se_limit = sd / math.sqrt(n), math.sqrt(3 * sd**2 / n)
    result["mean_difference"] = dict(empty, estimate=mean, ci_low=mean - t * se_mean,
                                     ci_high=mean + t * se_mean, ci_method=CI_T)
    result["sd_difference"] = dict(empty, estimate=sd)
    for name, limit in (("loa_lower", mean - Z * sd), ("loa_upper", mean + Z * sd)):
        result[name] = dict(empty, estimate=limit, ci_low=limit - t * se_limit,
                            ci_high=limit + t * se_limit, ci_method=CI_T)
    return result


# --------------------------------------------------------------------------- per vessel


def vessel_agreement(pairs: pd.DataFrame, vessels: Sequence[str] = VESSEL_NAMES, *,
                     n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> list[dict]:
    """Per vessel: ICC(2,1), Bland-Altman mean difference, and agreement on 'any
    calcium in the vessel' (score > 0): percent agreement (Wilson CI) and Cohen's
    kappa (bootstrap CI). Rows without both vessel scores are left out."""
    results = []
    for vessel in vessels:
        column = f"agatston_{vessel}"
        both = pairs.dropna(subset=[f"predicted_{column}", f"reference_{column}"])
        pred = both[f"predicted_{column}"].to_numpy(dtype=float) > 0
        ref = both[f"reference_{column}"].to_numpy(dtype=float) > 0
        confusion = np.array([[int((~ref & ~pred).sum()), int((~ref & pred).sum())],
                              [int((ref & ~pred).sum()), int((ref & pred).sum())]])
        agree = int(np.trace(confusion))
        results.append({
            "vessel": vessel,
            "n": len(both),
            "reference_positive": int(ref.sum()),
            "predicted_positive": int(pred.sum()),
            "confusion": confusion,
            "icc": icc(both, column),
            "bland_altman": bland_altman(both, column),
            "any_calcium_agreement": _proportion(agree, len(both)),
            "any_calcium_kappa": _kappa_with_ci(confusion, ref.astype(int), pred.astype(int),
                                                both["participant_id"], 2, "none", n_bootstrap, seed),
        })
    return results


# --------------------------------------------------------------------------- everything


def strata(pairs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """'all', then one stratum per scan type present ('gated', 'nongated')."""
    result = {ALL: pairs}
    if "scan_type" in pairs:
        for scan_type in SCAN_TYPE_VALUES:
            subset = pairs[pairs["scan_type"].astype("string") == scan_type]
            if len(subset):
                result[scan_type] = subset.reset_index(drop=True)
    return result


def evaluate_pairs(pairs: pd.DataFrame, *, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> dict:
    """Every statistic for one set of pairs."""
    options = {"n_bootstrap": n_bootstrap, "seed": seed}
    return {
        "n": len(pairs),
        "risk": risk_category_agreement(pairs, **options),
        "thresholds": threshold_metrics(pairs, **options),
        "icc": icc(pairs),
        "icc_log": icc(pairs, log=True),
        "bland_altman": bland_altman(pairs),
        "bland_altman_log": bland_altman(pairs, log=True),
        "vessels": vessel_agreement(pairs, **options),
        "noncoronary_zeros": noncoronary_calcium_zeros(pairs),
        "review": review_flags(pairs),
    }


def evaluate(predicted: pd.DataFrame, reference: pd.DataFrame, *, n_bootstrap: int = DEFAULT_BOOTSTRAP,
             seed: int = DEFAULT_SEED, run_info: dict | None = None) -> dict:
    """Match the tables and compute every statistic, overall and per scan type."""
    match = match_tables(predicted, reference)
    return {
        "match": match,
        "strata": {name: evaluate_pairs(subset, n_bootstrap=n_bootstrap, seed=seed)
                   for name, subset in strata(match.pairs).items()},
        "settings": {"bootstrap resamples": n_bootstrap, "bootstrap seed": seed,
                     "confidence level": CONFIDENCE, "cutoffs": list(AGREEMENT_THRESHOLDS)},
        "run_info": dict(run_info or {}),
    }


# --------------------------------------------------------------------------- tidy table


def metrics_table(results: dict) -> pd.DataFrame:
    """One row per (metric, stratum): estimate, ci_low, ci_high, n, ci_method."""
    rows: list[dict] = []

    def add(metric: str, stratum: str, value: dict | float | int | None, n: int | None = None) -> None:
        if not isinstance(value, dict):
            value = {"estimate": value, "n": n}
        rows.append({"metric": metric, "stratum": stratum, "estimate": value.get("estimate"),
                     "ci_low": value.get("ci_low"), "ci_high": value.get("ci_high"),
                     "n": value.get("n", n), "ci_method": value.get("ci_method")})

    for name, count in results["match"].counts.items():
        add(f"count.{name.replace(', ', '.').replace(' ', '_')}", ALL, count)
    for stratum, result in results["strata"].items():
        if stratum != ALL:  # the overall count is among the matching counts above
            add("count.compared", stratum, result["n"])
        risk = result["risk"]
        add("risk_category.percent_agreement", stratum, risk["agreement"])
        add("risk_category.kappa", stratum, risk["kappa"])
        add("risk_category.kappa_linear", stratum, risk["kappa_linear"])
        for i, ref in enumerate(risk["categories"]):
            for j, pred in enumerate(risk["categories"]):
                add(f"risk_category.confusion.reference_{ref}.predicted_{pred}", stratum,
                    int(risk["confusion"][i, j]), risk["n"])
        for entry in result["thresholds"]:
            prefix = f"cac_ge_{entry['cutoff']:g}"
            for count in ("tp", "fp", "tn", "fn"):
                add(f"{prefix}.{count}", stratum, entry[count], entry["n"])
            for measure in ("sensitivity", "specificity", "ppv", "npv", "f1"):
                add(f"{prefix}.{measure}", stratum, entry[measure])
        add("agatston_total.icc", stratum, result["icc"])
        add("log1p_agatston_total.icc", stratum, result["icc_log"])
        for key, ba in (("agatston_total", result["bland_altman"]),
                        ("log1p_agatston_total", result["bland_altman_log"])):
            for measure in ("mean_difference", "sd_difference", "loa_lower", "loa_upper"):
                add(f"{key}.{measure}", stratum, ba[measure])
        if result.get("noncoronary_zeros") is not None:
            add("noncoronary_calcium_only.share_scored_zero", stratum, result["noncoronary_zeros"])
        if result.get("review") is not None:
            add("review_flag.share_of_scans_flagged", stratum, result["review"]["flagged"])
            add("review_flag.share_of_disagreements_flagged", stratum, result["review"]["disagreements_flagged"])
        for vessel in result["vessels"]:
            prefix = f"agatston_{vessel['vessel']}"
            add(f"{prefix}.icc", stratum, vessel["icc"])
            add(f"{prefix}.mean_difference", stratum, vessel["bland_altman"]["mean_difference"])
            add(f"{prefix}.any_calcium_agreement", stratum, vessel["any_calcium_agreement"])
            add(f"{prefix}.any_calcium_kappa", stratum, vessel["any_calcium_kappa"])
    table = pd.DataFrame(rows, columns=list(METRICS_COLUMNS))
    for column in ("estimate", "ci_low", "ci_high"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Float64")
    table["n"] = pd.to_numeric(table["n"], errors="coerce").astype("Int64")
    for column in ("metric", "stratum", "ci_method"):
        table[column] = table[column].astype("string")
    return table


def write_evaluation_tables(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """metrics.csv and metrics.parquet (tidy, one row per metric and stratum) and
    pairs.csv (the compared scans), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    table = metrics_table(results)
    paths = {"csv": out_dir / "metrics.csv", "parquet": out_dir / "metrics.parquet", "pairs": out_dir / "pairs.csv"}
    with atomic_write(paths["csv"]) as handle:
        handle.write(table.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({"cacflow.table": "evaluation_metrics", "cacflow.version": __version__})
    with atomic_write(paths["parquet"]) as handle:
        pq.write_table(arrow, handle)
    with atomic_write(paths["pairs"]) as handle:
        handle.write(results["match"].pairs.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return paths


def summary_lines(results: dict) -> list[str]:
    """A few lines for the terminal: counts, kappa, sensitivity/specificity at >= 1."""
    counts = results["match"].counts
    lines = [f"compared {counts['compared']} scan(s); not scored {counts['not scored']}; "
             f"unmatched: {counts['predicted rows without reference']} predicted, "
             f"{counts['reference rows without prediction']} reference; "
             f"reference without score {counts['scored, reference has no score']}"]
    for stratum, result in results["strata"].items():
        risk = result["risk"]
        first = next((t for t in result["thresholds"] if t["cutoff"] == 1), None)
        parts = [f"[{stratum}] n={result['n']}",
                 f"risk-category kappa {_estimate_ci(risk['kappa'])}",
                 f"linear {_estimate_ci(risk['kappa_linear'])}"]
        if first:
            parts += [f"CAC>=1 sensitivity {_estimate_ci(first['sensitivity'], percent=True)}",
                      f"specificity {_estimate_ci(first['specificity'], percent=True)}"]
        zeros = result.get("noncoronary_zeros")
        if zeros is not None and zeros["n"]:
            parts.append(f"only non-coronary calcium: {zeros['count']}/{zeros['n']} scored 0 "
                         f"({_estimate_ci(zeros, percent=True)})")
        review = result.get("review")
        if review is not None:
            parts.append(f"flagged for review {review['flagged']['count']}/{review['flagged']['n']}, of them "
                         f"{review['disagreements_flagged']['count']} of the "
                         f"{review['disagreements_flagged']['n']} risk-category disagreement(s)")
        lines.append("; ".join(parts))
    return lines


# --------------------------------------------------------------------------- HTML


def render_evaluation(results: dict, out_html: str | os.PathLike, *,
                      title: str = "cacflow evaluation: predicted vs reference") -> Path:
    """Write the evaluation report (one self-contained HTML file, inline CSS and SVG)."""
    match = results["match"]
    overall = results["strata"][ALL]
    sections = [
        ("run", "Run", _run_html(results)),
        ("matching", "Matching", _matching_html(match)),
        ("risk", "Risk-category agreement", _risk_html(results)),
        ("thresholds", "Detection at CAC thresholds", _thresholds_html(results)),
        ("continuous", "ICC and Bland-Altman", _continuous_html(results, overall, match.pairs)),
        ("vessels", "Per-vessel agreement", _vessels_html(results)),
        ("noncoronary", "Calcium outside the coronary arteries", _noncoronary_html(results)),
        ("review", "Scans flagged for review", _review_html(results)),
        ("methods", "Methods", _methods_html(results)),
    ]
    return write_html_page(title, sections, out_html)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _estimate_ci(value: dict, *, percent: bool = False, digits: int = 3) -> str:
    if value.get("estimate") is None:
        return "n/a"
    scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", digits)

    def fmt(x: float) -> str:
        return f"{round(x * scale, digits) + 0.0:.{digits}f}"  # + 0.0: no '-0.000'

    text = fmt(value["estimate"]) + unit
    if value.get("ci_low") is not None:
        text += f" [{fmt(value['ci_low'])}, {fmt(value['ci_high'])}]"
    return text


def _stratum_label(stratum: str, result: dict) -> str:
    return f"{stratum} (n = {result['n']})"


def _run_html(results: dict) -> str:
    rows = [(str(k), str(v)) for k, v in results.get("run_info", {}).items()]
    rows += [(k, str(v)) for k, v in results["settings"].items()]
    rows += [("cacflow version", __version__),
             ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    headline = "".join(
        f"<div>{_e(_stratum_label(name, result))}<b>{_e(_estimate_ci(result['risk']['kappa'], digits=2))}</b>"
        "risk-category kappa</div>"
        for name, result in results["strata"].items()
    )
    return f'<div class="headline">{headline}</div>' + _table("run-info", ["item", "value"], rows)


def _matching_html(match: Match) -> str:
    content = ("<p>Rows are paired on (participant_id, visit). Only scans scored by the pipeline "
               "and with a reference score are compared; every other row is listed here.</p>"
               + _table("match-counts", ["rows", "count"], [(k, int(v)) for k, v in match.counts.items()]))

    def listing(table_id: str, heading: str, frame: pd.DataFrame, note: str) -> str:
        if frame.empty:
            return f"<h3>{_e(heading)}</h3><p class=\"muted\">none</p>"
        headers = list(frame.columns)
        rows = [[_cell(v) for v in row] for row in frame.itertuples(index=False, name=None)]
        return (f"<h3>{_e(heading)} ({len(frame)})</h3><p>{_e(note)}</p>" + _table(table_id, headers, rows))

    content += listing("not-scored", "Not scored", match.not_scored,
                       "Matched rows the pipeline did not score; left out of agreement. A missing reference "
                       "score means the reference had nothing to score either.")
    content += listing("reference-without-score", "Scored, but no reference score", match.reference_without_score,
                       "The pipeline scored a scan the reference did not score; left out of agreement.")
    content += listing("predicted-unmatched", "Predicted rows without a reference row", match.predicted_unmatched, "")
    content += listing("reference-unmatched", "Reference rows without a predicted row", match.reference_unmatched, "")
    return content


def _cell(value):
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return _num(value, 2)
    return value if isinstance(value, (int, np.integer)) else str(value)


def _risk_html(results: dict) -> str:
    parts = ["<p>Rumberger categories derived from the Agatston total on both sides. "
             "Kappa CIs: participant-level percentile bootstrap; agreement CI: Wilson.</p>"]
    summary = []
    for name, result in results["strata"].items():
        risk = result["risk"]
        summary.append((name, result["n"], f"{risk['agreement'].get('count', 0)} / {risk['n']}",
                        _estimate_ci(risk["agreement"], percent=True), _estimate_ci(risk["kappa"]),
                        _estimate_ci(risk["kappa_linear"])))
    parts.append(_table("risk-summary", ["stratum", "n", "same category", "agreement (95% CI)",
                                         "kappa (95% CI)", "linear weighted kappa (95% CI)"], summary))
    for name, result in results["strata"].items():
        risk = result["risk"]
        rows = [[f"reference {ref}", *(int(v) for v in risk["confusion"][i]), int(risk["confusion"][i].sum())]
                for i, ref in enumerate(risk["categories"])]
        rows.append(["total", *(int(v) for v in risk["confusion"].sum(axis=0)), int(risk["n"])])
        parts.append(f"<h3>Confusion matrix, {_e(_stratum_label(name, result))} "
                     "(rows: reference, columns: predicted)</h3>")
        parts.append(_table(f"risk-confusion-{name}", ["", *risk["categories"], "total"], rows))
    return "".join(parts)


def _thresholds_html(results: dict) -> str:
    rows = []
    for name, result in results["strata"].items():
        for entry in result["thresholds"]:
            rows.append((name, f"\u2265\u00a0{entry['cutoff']:g}", entry["tp"], entry["fp"], entry["tn"], entry["fn"],
                         *(_estimate_ci(entry[m], percent=True) for m in ("sensitivity", "specificity", "ppv", "npv")),
                         _estimate_ci(entry["f1"])))
    return ("<p>Positive: Agatston score &gt;= cutoff (predicted and reference alike). Proportions with "
            "Wilson 95% CIs; F1 with a participant-level bootstrap CI; n/a where the denominator is 0.</p>"
            + _table("threshold-metrics", ["stratum", "CAC", "TP", "FP", "TN", "FN", "sensitivity", "specificity",
                                           "PPV", "NPV", "F1"], rows))


def _continuous_html(results: dict, overall: dict, pairs: pd.DataFrame) -> str:
    rows = []
    for name, result in results["strata"].items():
        for scale, icc_value, ba in (("Agatston", result["icc"], result["bland_altman"]),
                                     ("ln(1 + Agatston)", result["icc_log"], result["bland_altman_log"])):
            rows.append((name, scale, result["n"], _estimate_ci(icc_value),
                         _estimate_ci(ba["mean_difference"], digits=2),
                         _num(ba["sd_difference"]["estimate"], 2), _estimate_ci(ba["loa_lower"], digits=2),
                         _estimate_ci(ba["loa_upper"], digits=2)))
    charts = '<p class="muted">No compared scans: no pairs to plot.</p>'
    if len(pairs):
        reference = pairs["reference_agatston_total"].to_numpy(dtype=float)
        predicted = pairs["predicted_agatston_total"].to_numpy(dtype=float)
        same = (pairs["reference_risk_category"] == pairs["predicted_risk_category"]).to_numpy()
        charts = ('<div class="charts">'
                  + _scatter_svg(reference, predicted, same_category=same)
                  + bland_altman_svg(overall["bland_altman"], x_log=True)
                  + bland_altman_svg(overall["bland_altman_log"])
                  + "</div>")
    return ("<p>ICC(2,1): two-way random effects, absolute agreement, single measure, with the F-based "
            "95% CI. Differences are predicted minus reference; limits of agreement mean &#177; 1.96 SD "
            "with t-based CIs.</p>"
            + _table("continuous-agreement", ["stratum", "scale", "n", "ICC(2,1) (95% CI)", "mean difference (95% CI)",
                                              "SD of difference", "lower limit (95% CI)", "upper limit (95% CI)"], rows)
            + charts)


def _vessels_html(results: dict) -> str:
    rows = []
    for name, result in results["strata"].items():
        for vessel in result["vessels"]:
            rows.append((name, vessel["vessel"].upper(), vessel["n"], vessel["reference_positive"],
                         vessel["predicted_positive"], _estimate_ci(vessel["icc"]),
                         _estimate_ci(vessel["bland_altman"]["mean_difference"], digits=2),
                         _estimate_ci(vessel["any_calcium_agreement"], percent=True),
                         _estimate_ci(vessel["any_calcium_kappa"])))
    return ("<p>Per-vessel Agatston scores. 'Any calcium' is a vessel score &gt; 0.</p>"
            + _table("vessel-agreement", ["stratum", "vessel", "n", "reference with calcium", "predicted with calcium",
                                          "ICC(2,1) (95% CI)", "mean difference (95% CI)",
                                          "any-calcium agreement (95% CI)", "any-calcium kappa (95% CI)"], rows))


def _review_html(results: dict) -> str:
    if all(result.get("review") is None for result in results["strata"].values()):
        return (f'<p class="muted">The predicted table has no {REVIEW_COLUMN} column (cacflow sets it when a '
                "scan's risk category depends on calcium the model was unsure is coronary).</p>")
    rows = [(name, result["n"], result["review"]["not_assessed"], result["review"]["flagged"]["count"],
             _estimate_ci(result["review"]["flagged"], percent=True),
             f"{result['review']['disagreements_flagged']['count']} of {result['review']['disagreements_flagged']['n']}",
             result["review"]["agreements_flagged"])
            for name, result in results["strata"].items()]
    text = ("<p>A scan is flagged when its risk category depends on calcium the model was unsure is coronary "
            "(the other answer had at least a 10 % chance). A useful flag catches many of the disagreements "
            "with the reference while flagging few scans; errors the model made confidently are not flagged. "
            "Scans without the flag (null: not assessed) are left out of the shares.</p>")
    return text + _table("review-flags", ["stratum", "compared", "not assessed", "flagged",
                                          "share flagged [95 % CI]", "disagreements flagged", "agreements flagged"],
                         rows)


def _noncoronary_html(results: dict) -> str:
    if all(result.get("noncoronary_zeros") is None for result in results["strata"].values()):
        return (f'<p class="muted">The reference table has no {NONCORONARY_COLUMN} column, so scans with '
                "only non-coronary calcium cannot be picked out.</p>")
    rows, misses = [], []
    for name, result in results["strata"].items():
        zeros = result["noncoronary_zeros"]
        rows.append((name, zeros["n"], zeros["count"], _estimate_ci(zeros, percent=True),
                     f"\u2265 {zeros['target']:.0%}"))
        if name == ALL:
            misses = [(r.participant_id, r.visit, getattr(r, f"reference_{NONCORONARY_COLUMN}"),
                       _num(r.predicted_agatston_total, 1)) for r in zeros["not_zero"].itertuples()]
    text = ("<p>Scans whose reference has no coronary calcium but calcium elsewhere (aortic wall or valve, "
            "mitral annulus, besides bone): a model that calls none of it coronary scores them 0. "
            "Share scored 0 with a Wilson 95% CI.</p>"
            + _table("noncoronary-zeros", ["stratum", "scans", "scored 0", "share scored 0 (95% CI)", "target"], rows))
    if misses:
        text += _table("noncoronary-misses", ["participant", "visit", "non-coronary calcium", "predicted Agatston"],
                       misses)
    return text


def _methods_html(results: dict) -> str:
    settings = results["settings"]
    rows = [
        ("percent agreement, sensitivity, specificity, PPV, NPV", CI_WILSON + " interval"),
        ("Cohen's kappa (unweighted, linearly weighted), F1",
         f"{CI_BOOTSTRAP}: {settings['bootstrap resamples']} resamples of participants with replacement "
         f"(seed {settings['bootstrap seed']}), 2.5th and 97.5th percentiles; undefined resamples dropped"),
        ("ICC(2,1)", CI_ICC),
        ("mean difference, limits of agreement", CI_T + ": SE = SD/sqrt(n) and sqrt(3 SD^2/n)"),
    ]
    return (_table("ci-methods", ["statistic", "95% confidence interval"], rows)
            + "<p>Reference: Eng D, et al. Automated coronary calcium scoring using deep learning with "
              "multicenter external validation. npj Digit Med 4, 88 (2021). See docs/evaluation.md.</p>")


def bland_altman_svg(ba: dict, *, x_log: bool = False) -> str:
    """Bland-Altman plot: mean of the pair (x) vs difference predicted - reference (y),
    with the mean difference and the 95 % limits of agreement. ``x_log`` puts x on a
    ln(1 + mean) axis (Agatston scores span four orders of magnitude)."""
    means, differences = np.asarray(ba["means"], float), np.asarray(ba["differences"], float)
    scale = "ln(1 + Agatston)" if ba["log"] else "Agatston"
    title = f"Bland-Altman, {scale}" + (", x on ln(1 + mean)" if x_log else "")
    width, height, left, right, top, bottom = 340, 260, 52, 10, 26, 40
    if means.size == 0:
        return _svg(width, 40, title, [f'<text x="0" y="14">{_e(title)}: no pairs</text>'])
    xs = np.log1p(np.maximum(means, 0)) if x_log else means
    lines = [ba[k]["estimate"] for k in ("mean_difference", "loa_lower", "loa_upper") if ba[k]["estimate"] is not None]
    y_all = np.concatenate([differences, np.asarray(lines, float), [0.0]])
    y_low, y_high = float(y_all.min()), float(y_all.max())
    pad = (y_high - y_low) * 0.08 or 1.0
    y_low, y_high = y_low - pad, y_high + pad
    x_low, x_high = float(min(xs.min(), 0.0)), float(xs.max())
    x_high = x_high if x_high > x_low else x_low + 1.0

    def px(v: float) -> float:
        return left + (width - left - right) * (v - x_low) / (x_high - x_low)

    def py(v: float) -> float:
        return top + (height - top - bottom) * (y_high - v) / (y_high - y_low)

    parts = [
        f'<text x="0" y="14" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{left}" y1="{py(y_low):.1f}" x2="{left}" y2="{py(y_high):.1f}" stroke="#333"/>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{py(0):.1f}" x2="{width - right}" y2="{py(0):.1f}" stroke="#bbb"/>',
        f'<text x="{left - 4}" y="{py(y_high) + 10:.1f}" text-anchor="end">{y_high:.3g}</text>',
        f'<text x="{left - 4}" y="{py(y_low):.1f}" text-anchor="end">{y_low:.3g}</text>',
        f'<text x="{left}" y="{height - bottom + 12}">{x_low:.3g}</text>',
        f'<text x="{width - right}" y="{height - bottom + 12}" text-anchor="end">{x_high:.3g}</text>',
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f'{"ln(1 + mean of pair)" if x_log else f"mean of pair, {scale}"}</text>',
        f'<text x="12" y="{(top + height - bottom) / 2:.1f}" transform="rotate(-90 12 '
        f'{(top + height - bottom) / 2:.1f})" text-anchor="middle">predicted - reference</text>',
    ]
    for key, colour, dash in (("mean_difference", "#4c78a8", ""), ("loa_lower", "#e45756", ' stroke-dasharray="5 3"'),
                              ("loa_upper", "#e45756", ' stroke-dasharray="5 3"')):
        value = ba[key]["estimate"]
        if value is None:
            continue
        parts.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{width - right}" y2="{py(value):.1f}" '
                     f'stroke="{colour}"{dash}><title>{_e(key)}: {value:.3g}</title></line>'
                     f'<text x="{width - right - 2}" y="{py(value) - 3:.1f}" text-anchor="end" '
                     f'font-size="9">{value:.3g}</text>')
    for x, y in zip(xs, differences):
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="#4c78a8" fill-opacity="0.7"/>')
    return _svg(width, height, title, parts)


# --------------------------------------------------------------------------- scoring a manifest


def score_manifest(manifest: str | os.PathLike, out_parquet: str | os.PathLike, engine: str = "auto",
                   config: dict | None = None) -> Path:
    """Score every visit of a manifest with ``cacflow score-scan``'s function and write
    a scans-like Parquet (the scans table contract, cohort-only columns null). A visit
    whose scoring raises gets a 'failed' row with the reason; the others go on."""
    from cacflow import tables
    from cacflow.commands.score_scan import score_scan
    from cacflow.config import load_config
    from cacflow.manifest import read_manifest

    from cacflow.model.engines import ModelFiles

    config = config or load_config()
    ModelFiles.chosen(config.get("model"))  # a model that cannot run stops here, not once per visit
    entries, warnings = read_manifest(manifest)
    for warning in warnings:
        log.warning("manifest: %s", warning)
    rows, loaded = [], {}  # the engine, loaded at the first visit that reaches inference
    for number, entry in enumerate(entries, start=1):
        try:
            row = score_scan(entry.dicom_dir, config, engine=engine,
                             participant_id=entry.participant_id, visit=entry.visit, loaded=loaded)
            row.pop("lesions", None)
        except Exception as error:  # one visit's failure never stops the rest
            log.exception("%s %s: scoring failed", entry.participant_id, entry.visit)
            row = {"participant_id": entry.participant_id, "visit": entry.visit, "status": "failed",
                   "status_reason": f"scoring raised {type(error).__name__}: {error}",
                   "pipeline_version": __version__}
        log.info("%d/%d %s %s: %s %s", number, len(entries), entry.participant_id, entry.visit,
                 row["status"], row.get("agatston_total"))
        rows.append(row)
    return tables.write_table("scans", rows, out_parquet)
