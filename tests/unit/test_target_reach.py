"""The counts of tests/benchmarks/target_reach.py on hand-made tables whose answers are
counted by hand, and its binomial chance against a direct sum."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def target_reach():
    return load_benchmark("target_reach")


def _candidate(what, agatston, distance=0.0, peak=180.0):
    return {"what": what, "agatston": agatston, "distance_mm": distance, "peak_hu": peak, "area_mm2": 1.2}


def _scan(participant, reference, *candidates):
    return {"type": "scan", "participant_id": participant, "reference_agatston": reference,
            "candidates": list(candidates)}


SCANS = [
    _scan("P001", 5.0, _candidate("coronary", 5.0)),                 # found by all three
    _scan("P002", 1.2, _candidate("coronary", 1.2, peak=140.0)),     # missed under the 150 HU floor
    _scan("P003", 2.0, _candidate("coronary", 2.0, distance=0.5)),   # off the artery: missed by all
    _scan("P004", 0.0, _candidate("noncoronary", 8.0)),              # only place_only calls it
    _scan("P005", 0.0, _candidate("noise", 1.1, peak=160.0)),        # noise on the artery: a false call
    _scan("P006", 0.0, _candidate("coronary", 0.6)),                 # under 1: not positive
    _scan("P007", 0.9, _candidate("coronary", 0.5), _candidate("noise", 0.5)),  # reference under 1, calls sum to 1
]


def test_confusion_of_each_oracle(target_reach):
    expected = {  # (tp, fn, tn, fp) counted by hand from the comments above
        "place_and_kind": (2, 1, 2, 2),
        "place_and_kind_peak150": (1, 2, 2, 2),
        "place_only": (2, 1, 1, 3),
    }
    for name, options in target_reach.ORACLES.items():
        counts = target_reach.confusion(target_reach.oracle_outcomes(SCANS, options))
        assert (counts["tp"], counts["fn"], counts["tn"], counts["fp"]) == expected[name], name


def test_targets_need_both_rates_at_98_percent(target_reach):
    assert target_reach.meets_targets({"tp": 49, "fn": 1, "tn": 50, "fp": 1})      # 98 % and 98.04 %
    assert not target_reach.meets_targets({"tp": 48, "fn": 2, "tn": 50, "fp": 0})  # 96 %
    assert not target_reach.meets_targets({"tp": 80, "fn": 0, "tn": 37, "fp": 1})  # 97.4 %: one false call in 38
    assert not target_reach.meets_targets({"tp": 10, "fn": 0, "tn": 0, "fp": 0})   # no negatives to measure


def test_blocks_are_full_runs_of_participants(target_reach):
    outcomes = [(f"P{i:03d}", True, True) for i in range(1, 301) if i != 5]  # P005 has no scan of record
    blocks = target_reach.blocks(outcomes, 120)
    assert [len(b) for b in blocks] == [119, 120]  # 241-300 is not a full block
    assert blocks[1][0][0] == "P121"
    small = [("P001", True, True), ("P002", False, False)]
    assert target_reach.blocks(small, 120) == [small]  # a cohort smaller than a block counts once


def test_pass_chance_is_the_product_of_two_binomial_tails(target_reach):
    # 82 positives allow 1 miss, 38 negatives allow none (floor of 2 %).
    miss, false = 0.02, 0.01
    by_hand = ((1 - miss) ** 82 + 82 * miss * (1 - miss) ** 81) * (1 - false) ** 38
    assert target_reach.pass_chance(miss, false, 82, 38) == pytest.approx(by_hand, rel=1e-12)
    assert target_reach.pass_chance(0.0, 0.0, 82, 38) == 1.0
    assert math.isclose(target_reach.pass_chance(0.0, 0.0, 50, 50), 1.0)


def test_main_prints_one_summary_per_oracle_and_the_model(target_reach, tmp_path, capsys):
    table = tmp_path / "cohort.jsonl"
    table.write_text("".join(json.dumps(s) + "\n" for s in SCANS) + json.dumps({"type": "rule"}) + "\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("participant_id,predicted_agatston_total,reference_agatston_total\n"
                     "P001,4.0,5.0\nP002,0.0,1.2\nP003,0.0,0.0\n")
    target_reach.main([str(table), "--model-pairs", f"X={pairs}"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["who"] for r in rows] == ["place_and_kind", "place_and_kind_peak150", "place_only", "model"]
    assert (rows[3]["tp"], rows[3]["fn"], rows[3]["tn"], rows[3]["fp"]) == (1, 1, 1, 0)
    assert rows[0]["cohorts_meeting_targets"] == {str(table): False} and rows[0]["blocks"] == 1
