"""Evaluation statistics, hand-checked: kappa worked out by hand, ICC(2,1) from the
ANOVA formulas and the Shrout & Fleiss (1979) example, Wilson and t intervals
against their formulas and scipy; matching, the report, the tables and the CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from cacflow import cli, evaluation, report, tables
from cacflow.evaluation import (
    bland_altman,
    bootstrap_sums,
    icc_2_1,
    kappa_weights,
    match_tables,
    threshold_metrics,
    weighted_kappa,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[2]
Z = 1.959963984540054
EVIL_ID = "<script>alert('x')</script>"


# --------------------------------------------------------------------------- helpers


def make_pairs(predicted, reference, participants=None, **vessels) -> pd.DataFrame:
    """Pairs in match_tables' form from two lists of totals."""
    predicted, reference = np.asarray(predicted, float), np.asarray(reference, float)
    n = len(predicted)
    frame = pd.DataFrame({
        "participant_id": participants or [f"P{i:03d}" for i in range(n)],
        "visit": ["baseline"] * n,
        "scan_type": pd.array([pd.NA] * n, dtype="string"),
        "predicted_agatston_total": predicted,
        "reference_agatston_total": reference,
    })
    for vessel in ("lm", "lad", "lcx", "rca"):
        pred, ref = vessels.get(vessel, (predicted / 4, reference / 4))
        frame[f"predicted_agatston_{vessel}"] = np.asarray(pred, float)
        frame[f"reference_agatston_{vessel}"] = np.asarray(ref, float)
    frame["predicted_risk_category"] = [evaluation._risk(v) for v in predicted]
    frame["reference_risk_category"] = [evaluation._risk(v) for v in reference]
    return frame


def scans_rows(n: int = 16, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small predicted scans table and its reference, both scan types, every category."""
    rng = np.random.default_rng(seed)
    reference = np.array([0, 0, 0, 5, 8, 40, 60, 90, 150, 250, 380, 500, 900, 0, 30, 700][:n], float)
    predicted = np.round(reference * rng.uniform(0.8, 1.2, n) + (reference > 0) * rng.normal(0, 3, n), 1).clip(0)
    predicted[1] = 4.0  # a false positive
    rows, refs = [], []
    for i in range(n):
        pid = f"P{i:03d}"
        split = rng.dirichlet(np.ones(4))
        rows.append({"participant_id": pid, "visit": "baseline", "status": "scored", "agatston_total": predicted[i],
                     **{f"agatston_{v}": predicted[i] * s for v, s in zip(("lm", "lad", "lcx", "rca"), split)},
                     "scan_type": "gated" if i % 3 else "nongated", "risk_category": evaluation._risk(predicted[i])})
        refs.append({"participant_id": pid, "visit": "baseline", "agatston_total": reference[i],
                     **{f"agatston_{v}": reference[i] * s for v, s in zip(("lm", "lad", "lcx", "rca"), split)},
                     "risk_category": evaluation._risk(reference[i])})
    return pd.DataFrame(rows), pd.DataFrame(refs)


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("x, n", [(0, 10), (3, 10), (10, 10), (47, 50), (1, 1)])
def test_wilson_interval_matches_formula_and_scipy(x, n):
    p = x / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    low, high = wilson_interval(x, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    scipy_ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((scipy_ci.low, scipy_ci.high), abs=1e-9)


def test_wilson_interval_of_nothing_is_null():
    assert wilson_interval(0, 0) == (None, None)


def test_bootstrap_keeps_a_participants_visits_together_and_is_seeded():
    # P1 has two visits, both positive: every resample counts an even number of them.
    features = np.array([[1.0], [1.0], [0.0], [0.0]])
    groups = ["P1", "P1", "P2", "P3"]
    sums = bootstrap_sums(features, groups, 500, seed=7)
    assert sums.shape == (500, 1)
    assert np.all(sums[:, 0] % 2 == 0)
    assert np.array_equal(sums, bootstrap_sums(features, groups, 500, seed=7))
    assert not np.array_equal(sums, bootstrap_sums(features, groups, 500, seed=8))
    # Each resample draws as many participants as there are: 3 (of 4 rows' worth).
    counts = bootstrap_sums(np.ones((4, 1)), groups, 200, seed=1)[:, 0]
    assert counts.min() >= 3 and counts.max() <= 6
    assert bootstrap_sums(features, groups, 0, seed=1).shape == (0, 1)


# --------------------------------------------------------------------------- kappa


def test_two_by_two_kappa_by_hand():
    # rows reference (no, yes), columns predicted; n = 50
    confusion = np.array([[20, 5], [10, 15]])
    observed = (20 + 15) / 50  # 0.7
    expected = (25 * 30 + 25 * 20) / 50**2  # marginals: rows 25, 25; columns 30, 20 -> 0.5
    by_hand = (observed - expected) / (1 - expected)  # 0.4
    assert by_hand == pytest.approx(0.4)
    assert float(weighted_kappa(confusion, kappa_weights(2))) == pytest.approx(by_hand)
    assert report.cohen_kappa(confusion) == pytest.approx(by_hand)


def test_vessel_any_calcium_kappa_is_the_two_by_two_kappa():
    # 50 scans: 20 both negative, 5 predicted-only, 10 reference-only, 15 both positive.
    ref = [0] * 20 + [0] * 5 + [3] * 10 + [3] * 15
    pred = [0] * 20 + [2] * 5 + [0] * 10 + [4] * 15
    pairs = make_pairs(np.array(pred) * 4, np.array(ref) * 4, lad=(pred, ref))
    lad = next(v for v in evaluation.vessel_agreement(pairs, n_bootstrap=200, seed=1) if v["vessel"] == "lad")
    assert lad["confusion"].tolist() == [[20, 5], [10, 15]]
    assert lad["any_calcium_kappa"]["estimate"] == pytest.approx(0.4)
    assert lad["any_calcium_agreement"]["estimate"] == pytest.approx(0.7)
    low, high = lad["any_calcium_kappa"]["ci_low"], lad["any_calcium_kappa"]["ci_high"]
    assert low < 0.4 < high


def test_linear_weighted_kappa_by_hand():
    confusion = np.array([[10, 2, 0], [3, 8, 1], [0, 2, 4]], float)
    n, k = confusion.sum(), 3
    rows, cols = confusion.sum(axis=1), confusion.sum(axis=0)
    # Disagreement-weight form: kappa_w = 1 - sum(w_ij o_ij) / sum(w_ij e_ij), w_ij = |i - j| / (k - 1).
    disagreement_observed = sum(abs(i - j) / (k - 1) * confusion[i, j] for i in range(k) for j in range(k))
    disagreement_expected = sum(abs(i - j) / (k - 1) * rows[i] * cols[j] / n for i in range(k) for j in range(k))
    by_hand = 1 - disagreement_observed / disagreement_expected
    assert float(weighted_kappa(confusion, kappa_weights(3, "linear"))) == pytest.approx(by_hand)
    # Linear weights never lower kappa here (near misses earn partial credit).
    assert by_hand > float(weighted_kappa(confusion, kappa_weights(3)))


def test_kappa_is_null_when_undefined():
    assert math.isnan(float(weighted_kappa(np.array([[5, 0], [0, 0]]), kappa_weights(2))))
    assert math.isnan(float(weighted_kappa(np.zeros((2, 2)), kappa_weights(2))))
    pairs = make_pairs([0, 0, 0], [0, 0, 0])
    risk = evaluation.risk_category_agreement(pairs, n_bootstrap=50, seed=1)
    assert risk["kappa"]["estimate"] is None and risk["kappa"]["ci_low"] is None
    assert risk["agreement"]["estimate"] == 1.0


def test_risk_category_agreement_confusion_and_batch_kappa_agree_with_report_helpers():
    predicted, reference = scans_rows()
    pairs = match_tables(predicted, reference).pairs
    risk = evaluation.risk_category_agreement(pairs, n_bootstrap=300, seed=2)
    expected = report.confusion_matrix(pairs["reference_risk_category"], pairs["predicted_risk_category"],
                                       tables.RISK_CATEGORY_VALUES)
    assert np.array_equal(risk["confusion"], expected)
    assert risk["kappa"]["estimate"] == pytest.approx(report.cohen_kappa(expected))
    assert risk["kappa"]["estimate"] == pytest.approx(float(weighted_kappa(expected, kappa_weights(5))))
    assert risk["agreement"]["count"] == np.trace(expected)
    for key in ("kappa", "kappa_linear"):
        value = risk[key]
        assert value["ci_low"] <= value["estimate"] <= value["ci_high"]
        assert "bootstrap" in value["ci_method"]
    again = evaluation.risk_category_agreement(pairs, n_bootstrap=300, seed=2)
    assert again["kappa"]["ci_low"] == risk["kappa"]["ci_low"]


# --------------------------------------------------------------------------- thresholds


def test_threshold_metrics_counts_and_zero_denominators():
    reference = [0, 0, 0, 5, 20, 150]
    predicted = [0, 3, 0, 0, 25, 90]
    (ge1, ge10, ge100, ge400) = threshold_metrics(make_pairs(predicted, reference), n_bootstrap=200, seed=1)
    assert (ge1["tp"], ge1["fp"], ge1["tn"], ge1["fn"]) == (2, 1, 2, 1)
    assert ge1["sensitivity"]["estimate"] == pytest.approx(2 / 3)
    assert ge1["specificity"]["estimate"] == pytest.approx(2 / 3)
    assert ge1["ppv"]["estimate"] == pytest.approx(2 / 3)
    assert ge1["npv"]["estimate"] == pytest.approx(2 / 3)
    assert ge1["f1"]["estimate"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (ge1["sensitivity"]["ci_low"], ge1["sensitivity"]["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert ge1["f1"]["ci_low"] <= ge1["f1"]["estimate"] <= ge1["f1"]["ci_high"]
    assert (ge100["tp"], ge100["fn"]) == (0, 1)  # 90 < 100 <= 150
    assert ge100["ppv"]["estimate"] is None and ge100["ppv"]["n"] == 0  # nothing predicted positive
    assert ge100["f1"]["estimate"] == 0.0
    # Nobody >= 400 on either side: sensitivity, PPV and F1 undefined, specificity 1.
    assert ge400["sensitivity"]["estimate"] is None and ge400["sensitivity"]["ci_low"] is None
    assert ge400["f1"]["estimate"] is None and ge400["f1"]["ci_low"] is None
    assert ge400["specificity"]["estimate"] == 1.0
    assert ge10["tp"] == 2 and ge10["tn"] == 4


# --------------------------------------------------------------------------- ICC


def _icc_by_hand(y: np.ndarray) -> float:
    """ICC(2,1) from the two-way ANOVA table, written out with loops."""
    n, k = y.shape
    grand = sum(y[i, j] for i in range(n) for j in range(k)) / (n * k)
    row_means = [sum(y[i]) / k for i in range(n)]
    col_means = [sum(y[:, j]) / n for j in range(k)]
    ss_total = sum((y[i, j] - grand) ** 2 for i in range(n) for j in range(k))
    ss_rows = k * sum((m - grand) ** 2 for m in row_means)
    ss_cols = n * sum((m - grand) ** 2 for m in col_means)
    ms_rows, ms_cols = ss_rows / (n - 1), ss_cols / (k - 1)
    ms_error = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    return (ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n)


def test_icc_shrout_fleiss_example():
    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; ICC(2,1) = 0.29, and
    # the F-based 95 % interval 0.019-0.76 (as the psych and pingouin packages report).
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    result = icc_2_1(ratings)
    assert result["estimate"] == pytest.approx(_icc_by_hand(ratings))
    assert round(result["estimate"], 2) == 0.29
    assert result["ci_low"] == pytest.approx(0.019, abs=0.001)
    assert result["ci_high"] == pytest.approx(0.76, abs=0.005)


def test_icc_two_raters_matches_anova_by_hand_and_bias_lowers_it():
    rng = np.random.default_rng(4)
    truth = rng.gamma(1.0, 100.0, 30)
    y = np.abs(np.column_stack([truth + rng.normal(0, 10, 30), truth + rng.normal(0, 10, 30)]))
    result = icc_2_1(y)
    assert result["estimate"] == pytest.approx(_icc_by_hand(y))
    assert result["ci_low"] < result["estimate"] < result["ci_high"] <= 1
    # Absolute agreement: a constant offset between raters lowers ICC(2,1).
    assert icc_2_1(y + np.array([0.0, 50.0]))["estimate"] < result["estimate"]
    # pairs-level wrapper, and the log scale
    pairs = make_pairs(y[:, 0], y[:, 1])
    assert evaluation.icc(pairs)["estimate"] == pytest.approx(result["estimate"])
    assert evaluation.icc(pairs, log=True)["estimate"] == pytest.approx(_icc_by_hand(np.log1p(y)))


def test_icc_degenerate_inputs():
    assert icc_2_1(np.array([[1.0, 1.0]]))["estimate"] is None  # one subject
    assert icc_2_1(np.full((4, 2), 3.0))["estimate"] is None  # no variance at all
    perfect = icc_2_1(np.array([[1, 1], [5, 5], [9, 9]], float))
    assert perfect["estimate"] == 1.0 and perfect["ci_low"] is None


# --------------------------------------------------------------------------- Bland-Altman


def test_bland_altman_against_formulas_and_scipy():
    predicted = np.array([12.0, 0.0, 105.0, 380.0, 41.0, 7.0, 220.0])
    reference = np.array([10.0, 0.0, 100.0, 400.0, 35.0, 9.0, 200.0])
    d = predicted - reference
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    result = bland_altman(make_pairs(predicted, reference))
    assert result["mean_difference"]["estimate"] == pytest.approx(mean)
    assert result["sd_difference"]["estimate"] == pytest.approx(sd)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    bias = result["mean_difference"]
    assert (bias["ci_low"], bias["ci_high"]) == pytest.approx((ci.low, ci.high))
    t = stats.t.ppf(0.975, n - 1)
    for key, limit in (("loa_lower", mean - Z * sd), ("loa_upper", mean + Z * sd)):
        assert result[key]["estimate"] == pytest.approx(limit)
        half = t * math.sqrt(3 * sd**2 / n)
        assert (result[key]["ci_low"], result[key]["ci_high"]) == pytest.approx((limit - half, limit + half))
    log = bland_altman(make_pairs(predicted, reference), log=True)
    assert log["mean_difference"]["estimate"] == pytest.approx((np.log1p(predicted) - np.log1p(reference)).mean())
    one = bland_altman(make_pairs([3.0], [1.0]))
    assert one["mean_difference"]["estimate"] == 2.0 and one["sd_difference"]["estimate"] is None


# --------------------------------------------------------------------------- matching


def test_match_tables_accounts_for_every_row():
    predicted, reference = scans_rows()
    predicted.loc[2, ["status", "agatston_total"]] = ["failed", np.nan]
    predicted.loc[2, "status_reason"] = "conversion failed"
    predicted.loc[3, "status"] = "not_scorable"
    predicted.loc[3, "agatston_total"] = np.nan
    reference.loc[3, "agatston_total"] = np.nan  # nothing to score on either side
    reference.loc[4, "agatston_total"] = np.nan  # scored, but no reference score
    predicted = pd.concat([predicted, pd.DataFrame([{"participant_id": "P900", "visit": "baseline",
                                                     "status": "scored", "agatston_total": 1.0}])])
    reference = pd.concat([reference, pd.DataFrame([{"participant_id": "P901", "visit": "baseline",
                                                     "agatston_total": 3.0}])])
    match = match_tables(predicted, reference)
    counts = match.counts
    assert counts["matched"] == 16 and counts["compared"] == 13
    assert counts["not scored"] == 2
    assert counts["not scored, reference has a score"] == 1
    assert counts["not scored, reference has no score either"] == 1
    assert counts["scored, reference has no score"] == 1
    assert counts["predicted rows without reference"] == 1 and counts["reference rows without prediction"] == 1
    assert match.not_scored["participant_id"].tolist() == ["P002", "P003"]
    assert match.not_scored["status_reason"].iloc[0] == "conversion failed"
    assert match.reference_without_score["participant_id"].tolist() == ["P004"]
    assert match.predicted_unmatched["participant_id"].tolist() == ["P900"]
    assert match.reference_unmatched["participant_id"].tolist() == ["P901"]
    assert not match.pairs["participant_id"].isin(["P002", "P003", "P004", "P900"]).any()
    assert set(evaluation.strata(match.pairs)) == {"all", "gated", "nongated"}


def test_match_tables_accepts_coca_reference_without_visit():
    predicted = pd.DataFrame({"participant_id": ["123", "124", "125", "125"], "visit": ["ct", "ct", "a", "b"],
                              "status": "scored", "agatston_total": [0.0, 50.0, 3.0, 4.0]})
    reference = pd.DataFrame({"coca_id": ["123", "124", "125", "126"], "series": "s",
                              "status": ["ok", "failed", "ok", "ok"], "agatston_total": [0.0, 48.0, 3.0, 1.0]})
    match = match_tables(predicted, reference)
    assert match.pairs["participant_id"].tolist() == ["123"]
    assert match.reference_without_score["participant_id"].tolist() == ["124"]  # COCA row failed
    reasons = dict(zip(match.reference_unmatched["participant_id"], match.reference_unmatched["reason"]))
    assert reasons["125"].startswith("no visit in the reference and several")
    assert reasons["126"] == "no predicted row"
    assert match.counts["predicted rows without reference"] == 2  # 125's two visits


def test_match_tables_rejects_duplicate_keys():
    predicted, reference = scans_rows(4)
    with pytest.raises(evaluation.EvaluationInputError, match="duplicated"):
        match_tables(pd.concat([predicted, predicted.iloc[:1]]), reference)
    with pytest.raises(evaluation.EvaluationInputError, match="participant_id"):
        match_tables(predicted, reference.drop(columns="participant_id"))


# --------------------------------------------------------------------------- report and tables


class Sections(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.tables, self.svgs, self.links = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "table":
            self.tables.append(attrs["id"])
        elif tag == "svg":
            self.svgs += 1
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])


def test_report_renders_every_section(tmp_path):
    predicted, reference = scans_rows()
    predicted.loc[0, ["participant_id", "status", "agatston_total"]] = [EVIL_ID, "failed", np.nan]
    reference.loc[0, "participant_id"] = EVIL_ID
    results = evaluation.evaluate(predicted, reference, n_bootstrap=200, seed=1, run_info={"cohort": "test"})
    path = evaluation.render_evaluation(results, tmp_path / "report.html")
    text = path.read_text()
    parser = Sections()
    parser.feed(text)
    assert parser.sections == ["run", "matching", "risk", "thresholds", "continuous", "vessels", "noncoronary",
                               "review", "methods"]
    for table_id in ("match-counts", "not-scored", "risk-summary", "risk-confusion-all", "risk-confusion-gated",
                     "risk-confusion-nongated", "threshold-metrics", "continuous-agreement", "vessel-agreement"):
        assert table_id in parser.tables
    assert parser.svgs == 3  # scatter and two Bland-Altman plots
    assert "Bland-Altman, Agatston, x on ln(1 + mean)" in text and "Bland-Altman, ln(1 + Agatston)" in text
    assert all(link.startswith("#") for link in parser.links)  # self-contained
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "kappa" in text and "Wilson" in text and "ICC(2,1)" in text


def test_noncoronary_calcium_zeros_by_hand(tmp_path):
    # Five scans without coronary calcium: four hold aortic/valve/mitral calcium, one
    # only bone (''), and one of the four was scored 12. A scan with coronary calcium
    # and aortic calcium is not a "non-coronary only" scan.
    predicted, reference = scans_rows()
    reference["noncoronary_calcium"] = ""
    zero_rows = reference.index[reference["agatston_total"] == 0].tolist()  # P000, P001, P002, P013
    assert len(zero_rows) == 4
    reference.loc[zero_rows[:3], "noncoronary_calcium"] = ["aortic_valve", "aortic_wall;mitral_annulus", "aortic_wall"]
    reference.loc[5, "noncoronary_calcium"] = "aortic_wall"  # P005 has coronary calcium too
    predicted.loc[zero_rows, "agatston_total"] = [0.0, 12.0, 0.0, 0.0]  # P001 is called coronary
    results = evaluation.evaluate(predicted, reference, n_bootstrap=50, seed=1)
    zeros = results["strata"]["all"]["noncoronary_zeros"]
    assert (zeros["n"], zeros["count"]) == (3, 2)
    assert zeros["estimate"] == pytest.approx(2 / 3)
    assert (zeros["ci_low"], zeros["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert zeros["not_zero"]["participant_id"].tolist() == ["P001"]
    per_type = {name: r["noncoronary_zeros"]["n"] for name, r in results["strata"].items()}
    assert per_type == {"all": 3, "gated": 2, "nongated": 1}  # scan_type: nongated when index % 3 == 0
    table = evaluation.metrics_table(results)
    row = table[(table["metric"] == "noncoronary_calcium_only.share_scored_zero") & (table["stratum"] == "all")]
    assert row["estimate"].iloc[0] == pytest.approx(2 / 3) and row["n"].iloc[0] == 3
    text = evaluation.render_evaluation(results, tmp_path / "r.html").read_text()
    assert 'id="noncoronary-zeros"' in text and 'id="noncoronary-misses"' in text and "aortic_wall;mitral_annulus" in text
    assert any("only non-coronary calcium: 2/3 scored 0" in line for line in evaluation.summary_lines(results))


def test_noncoronary_calcium_zeros_absent_without_the_reference_column(tmp_path):
    predicted, reference = scans_rows()
    results = evaluation.evaluate(predicted, reference, n_bootstrap=0)
    assert results["strata"]["all"]["noncoronary_zeros"] is None
    assert "noncoronary_calcium_only.share_scored_zero" not in set(evaluation.metrics_table(results)["metric"])
    assert "cannot be picked out" in evaluation.render_evaluation(results, tmp_path / "r.html").read_text()


def test_review_flags_by_hand(tmp_path):
    # Exact scores except two disagreements: P001 called 4 (reference 0) and P008
    # called 90 (reference 150). Flagged: P001 (a caught disagreement) and P005 (an
    # agreement). All three are gated scans (index % 3 != 0).
    predicted, reference = scans_rows()
    predicted["agatston_total"] = reference["agatston_total"]
    predicted.loc[1, "agatston_total"], predicted.loc[8, "agatston_total"] = 4.0, 90.0
    predicted["risk_category_uncertain"] = False
    predicted.loc[[1, 5], "risk_category_uncertain"] = True
    results = evaluation.evaluate(predicted, reference, n_bootstrap=0)
    review = results["strata"]["all"]["review"]
    assert (review["flagged"]["count"], review["flagged"]["n"]) == (2, 16)
    assert review["flagged"]["estimate"] == pytest.approx(2 / 16)
    assert (review["disagreements_flagged"]["count"], review["disagreements_flagged"]["n"]) == (1, 2)
    assert (review["disagreements_flagged"]["ci_low"], review["disagreements_flagged"]["ci_high"]) == pytest.approx(
        wilson_interval(1, 2))
    assert review["agreements_flagged"] == 1
    nongated = results["strata"]["nongated"]["review"]
    assert (nongated["flagged"]["count"], nongated["disagreements_flagged"]["n"]) == (0, 0)
    table = evaluation.metrics_table(results)
    row = table[(table["metric"] == "review_flag.share_of_disagreements_flagged") & (table["stratum"] == "gated")]
    assert row["estimate"].iloc[0] == pytest.approx(0.5) and row["n"].iloc[0] == 2
    text = evaluation.render_evaluation(results, tmp_path / "r.html").read_text()
    assert 'id="review-flags"' in text and "1 of 2" in text
    assert any("flagged for review 2/16, of them 1 of the 2 risk-category disagreement(s)" in line
               for line in evaluation.summary_lines(results))
    # a scan not assessed (null flag) is left out of the shares, not counted as unflagged
    predicted["risk_category_uncertain"] = predicted["risk_category_uncertain"].astype(object)
    predicted.loc[8, "risk_category_uncertain"] = None  # the uncaught disagreement
    partial = evaluation.evaluate(predicted, reference, n_bootstrap=0)["strata"]["all"]["review"]
    assert partial["not_assessed"] == 1
    assert (partial["flagged"]["n"], partial["disagreements_flagged"]["count"], partial["disagreements_flagged"]["n"]) == (
        15, 1, 1)
    predicted.loc[8, "risk_category_uncertain"] = "maybe"
    with pytest.raises(evaluation.EvaluationInputError, match="risk_category_uncertain must hold true/false/null"):
        evaluation.evaluate(predicted, reference, n_bootstrap=0)
    predicted.loc[8, "risk_category_uncertain"] = False
    # another tool's table, without the flag: the section says so and no metric is made up
    plain = evaluation.evaluate(predicted.drop(columns="risk_category_uncertain"), reference, n_bootstrap=0)
    assert plain["strata"]["all"]["review"] is None
    assert not any(m.startswith("review_flag.") for m in evaluation.metrics_table(plain)["metric"])
    assert "has no risk_category_uncertain column" in evaluation.render_evaluation(plain, tmp_path / "p.html").read_text()


def test_report_with_no_pairs(tmp_path):
    predicted, reference = scans_rows(3)
    predicted["status"] = "not_scorable"
    results = evaluation.evaluate(predicted, reference, n_bootstrap=50, seed=1)
    assert results["match"].counts["compared"] == 0
    text = evaluation.render_evaluation(results, tmp_path / "r.html").read_text()
    assert "no pairs" in text
    table = evaluation.metrics_table(results)
    assert set(table["stratum"]) == {"all"}
    assert table.loc[table["metric"] == "risk_category.kappa", "estimate"].isna().all()


def test_metrics_tables_are_tidy(tmp_path):
    predicted, reference = scans_rows()
    results = evaluation.evaluate(predicted, reference, n_bootstrap=100, seed=1)
    paths = evaluation.write_evaluation_tables(results, tmp_path)
    csv = pd.read_csv(paths["csv"])
    parquet = pq.read_table(paths["parquet"]).to_pandas()
    assert list(csv.columns) == list(evaluation.METRICS_COLUMNS) == list(parquet.columns)
    assert len(csv) == len(parquet) and not csv.duplicated(["metric", "stratum"]).any()
    assert set(csv["stratum"]) == {"all", "gated", "nongated"}
    row = parquet[(parquet["metric"] == "risk_category.kappa") & (parquet["stratum"] == "all")].iloc[0]
    assert row["estimate"] == pytest.approx(results["strata"]["all"]["risk"]["kappa"]["estimate"])
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"] and row["n"] == 16
    for metric in ("cac_ge_1.sensitivity", "cac_ge_400.f1", "agatston_total.icc", "log1p_agatston_total.icc",
                   "agatston_total.loa_upper", "agatston_lad.any_calcium_kappa", "agatston_rca.icc",
                   "risk_category.kappa_linear", "count.not_scored"):
        assert metric in set(csv["metric"]), metric
    assert pd.read_csv(paths["pairs"])["participant_id"].tolist() == sorted(predicted["participant_id"])


# --------------------------------------------------------------------------- command line


def test_cli_evaluate_on_two_small_tables(tmp_path, capsys):
    predicted, reference = scans_rows()
    predicted.loc[5, ["status", "agatston_total"]] = ["not_scorable", np.nan]
    predicted = predicted.drop(columns=["risk_category"]).assign(
        risk_category=[evaluation._risk(v) if v == v else None for v in predicted["agatston_total"]])
    for v in ("lm", "lad", "lcx", "rca"):
        predicted.loc[5, f"agatston_{v}"] = np.nan
    tables.write_table("scans", predicted, tmp_path / "scans.parquet")
    reference.to_csv(tmp_path / "reference.tsv", sep="\t", index=False)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--predicted", str(tmp_path / "scans.parquet"), "--reference",
                     str(tmp_path / "reference.tsv"), "--out-dir", str(out), "--bootstrap", "100",
                     "--seed", "3", "--run-info", "cohort=unit test"]) == 0
    printed = capsys.readouterr().out
    assert "compared 15 scan(s); not scored 1" in printed
    assert re.search(r"\[all\] n=15; risk-category kappa \d\.\d{3} \[", printed)
    assert "CAC>=1 sensitivity" in printed and "specificity" in printed
    for name in ("report.html", "metrics.csv", "metrics.parquet", "pairs.csv"):
        assert (out / name).is_file()
    assert "unit test" in (out / "report.html").read_text()


def test_cli_evaluate_with_coca_reference_parquet(tmp_path, capsys):
    predicted = pd.DataFrame({"participant_id": ["101", "102", "103"], "visit": "ct", "status": "scored",
                              "agatston_total": [0.0, 12.0, 450.0]})
    predicted.to_csv(tmp_path / "predicted.csv", index=False)
    reference = pd.DataFrame({"coca_id": ["101", "102", "103"], "status": "ok",
                              "agatston_total": [0.0, 15.0, 420.0], "agatston_lad": [0.0, 15.0, 400.0]})
    reference.to_parquet(tmp_path / "coca.parquet")
    assert cli.main(["evaluate", "--predicted", str(tmp_path / "predicted.csv"), "--reference",
                     str(tmp_path / "coca.parquet"), "--out-dir", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    assert "compared 3 scan(s)" in capsys.readouterr().out


def test_cli_evaluate_against_the_image_based_reference(tmp_path, capsys):
    """--image-reference compares with the image_agatston_* columns: here the one miss
    against the noise-free scores (a 1.8 speck scored 0) is a speck the image does not
    show (image-based 0), so sensitivity goes from 2 of 3 to 2 of 2."""
    predicted = pd.DataFrame({"participant_id": ["1", "2", "3", "4"], "visit": "baseline", "status": "scored",
                              "agatston_total": [0.0, 0.0, 12.0, 450.0], "agatston_lad": [0.0, 0.0, 12.0, 450.0]})
    predicted.to_csv(tmp_path / "predicted.csv", index=False)
    reference = pd.DataFrame({"participant_id": ["1", "2", "3", "4"], "visit": "baseline",
                              "agatston_total": [0.0, 1.8, 11.0, 430.0], "agatston_lad": [0.0, 1.8, 11.0, 430.0],
                              "image_agatston_total": [0.0, 0.0, 12.5, 445.0],
                              "image_agatston_lad": [0.0, 0.0, 12.5, 445.0],
                              "risk_category": ["0", "1-10", "11-100", ">400"], "volume_mm3": [0.0, 1.0, 9.0, 300.0],
                              "image_risk_category": ["0", "0", "11-100", ">400"]})
    reference.to_csv(tmp_path / "reference.tsv", sep="\t", index=False)
    for flag, out, sensitivity in (([], "primary", 2 / 3), (["--image-reference"], "image", 1.0)):
        assert cli.main(["evaluate", "--predicted", str(tmp_path / "predicted.csv"), "--reference",
                         str(tmp_path / "reference.tsv"), "--out-dir", str(tmp_path / out), "--bootstrap", "0",
                         *flag]) == 0
        metrics = pd.read_csv(tmp_path / out / "metrics.csv")
        row = metrics[(metrics["metric"] == "cac_ge_1.sensitivity") & (metrics["stratum"] == "all")]
        assert row["estimate"].item() == pytest.approx(sensitivity)
    pairs = pd.read_csv(tmp_path / "image" / "pairs.csv")
    assert pairs["reference_agatston_total"].tolist() == [0.0, 0.0, 12.5, 445.0]
    assert pairs["reference_agatston_lad"].tolist() == [0.0, 0.0, 12.5, 445.0]
    assert "image-based" in (tmp_path / "image" / "report.html").read_text()
    swapped = evaluation.image_based_reference(reference)
    assert swapped["risk_category"].tolist() == ["0", "0", "11-100", ">400"]  # the image's, not the primary's
    assert "volume_mm3" not in swapped and not any(c.startswith("image_") for c in swapped)
    capsys.readouterr()
    # a reference without image-based scores (COCA, an older cohort) is refused, saying why
    reference.drop(columns=["image_agatston_total"]).to_csv(tmp_path / "old.tsv", sep="\t", index=False)
    assert cli.main(["evaluate", "--predicted", str(tmp_path / "predicted.csv"), "--reference",
                     str(tmp_path / "old.tsv"), "--out-dir", str(tmp_path / "old"), "--image-reference"]) == 2
    assert "image_agatston_total" in capsys.readouterr().err


def test_cli_evaluate_reports_bad_input(tmp_path, capsys):
    pd.DataFrame({"participant_id": ["1"], "visit": ["a"]}).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"participant_id": ["1"], "agatston_total": [1.0]}).to_csv(tmp_path / "r.csv", index=False)
    code = cli.main(["evaluate", "--predicted", str(tmp_path / "p.csv"), "--reference", str(tmp_path / "r.csv"),
                     "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "agatston_total" in capsys.readouterr().err


def test_command_defaults_match_the_library():
    from cacflow.commands import evaluate as command

    assert (command.DEFAULT_BOOTSTRAP, command.DEFAULT_SEED) == (evaluation.DEFAULT_BOOTSTRAP, evaluation.DEFAULT_SEED)


# --------------------------------------------------------------------------- held out


def test_evaluation_cohort_seeds_are_held_out_from_training_and_demo():
    """The workflow's evaluation cohort draws each patient's phantom seed from
    (seed, participant); none may equal a seed of a training phantom, nor the demo's."""
    from cacflow.synth.cohort import _visit_seed
    from cacflow.training import TrainingConfig, randomised_phantom_settings

    rule_text = (REPO / "workflow/rules/evaluate.smk").read_text()
    seed = int(re.search(r'"seed": (\d+)', rule_text).group(1))
    participants = int(re.search(r'"participants": (\d+)', rule_text).group(1))
    training = TrainingConfig(work_dir="", model_dir="")
    training_seeds = set()
    for index in range(training.n_volumes):
        rng = np.random.default_rng([training.seed, index])
        randomised_phantom_settings(rng)
        training_seeds.add(int(rng.integers(2**31)))
    evaluation_seeds = {_visit_seed(seed, f"P{i:03d}") for i in range(1, participants + 1)}
    demo_seeds = {_visit_seed(2026, f"P{i:03d}") for i in range(1, participants + 1)}
    assert seed not in (2026, training.seed)
    assert len(evaluation_seeds) == participants
    assert not evaluation_seeds & training_seeds
    assert not evaluation_seeds & demo_seeds


def test_score_manifest_writes_a_scans_table_and_survives_a_failing_visit(tmp_path, monkeypatch):
    from cacflow.commands import score_scan as score_scan_module

    (tmp_path / "empty").mkdir()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("participant_id\tvisit\tdicom_dir\n"
                        f"P1\tbaseline\t{tmp_path / 'empty'}\nP2\tbaseline\t{tmp_path / 'boom'}\n")
    real = score_scan_module.score_scan

    def flaky(dicom_dir, *args, **kwargs):
        if str(dicom_dir).endswith("boom"):
            raise RuntimeError("engine crashed")
        return real(dicom_dir, *args, **kwargs)

    monkeypatch.setattr(score_scan_module, "score_scan", flaky)
    path = evaluation.score_manifest(manifest, tmp_path / "scans.parquet", engine="onnxruntime")
    table = pq.read_table(path)
    tables.validate("scans", table)
    rows = {row["participant_id"]: row for row in table.to_pylist()}
    assert rows["P1"]["status"] == "not_scorable" and "empty" in rows["P1"]["status_reason"]
    assert rows["P2"]["status"] == "failed" and "engine crashed" in rows["P2"]["status_reason"]


def test_score_manifest_refuses_a_model_that_cannot_run_before_scoring_any_visit(tmp_path):
    from cacflow.config import load_config

    (tmp_path / "empty").mkdir()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(f"participant_id\tvisit\tdicom_dir\nP1\tbaseline\t{tmp_path / 'empty'}\n")
    config = {**load_config(), "model": str(tmp_path / "empty")}  # a folder with no model in it
    with pytest.raises(ValueError, match="lacks model.json"):  # not a 'failed' row per visit
        evaluation.score_manifest(manifest, tmp_path / "scans.parquet", engine="onnxruntime", config=config)
    assert not (tmp_path / "scans.parquet").exists()
    code = subprocess.run([sys.executable, "-m", "cacflow", "evaluate", "--score-manifest", str(manifest),
                           "--predicted", str(tmp_path / "scans.parquet"), "--model", str(tmp_path / "empty")],
                          capture_output=True, text=True)
    assert code.returncode != 0 and "cacflow evaluate:" in code.stderr and "Traceback" not in code.stderr
