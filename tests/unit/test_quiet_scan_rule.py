"""The sixteenth candidate's rule counts (tests/benchmarks/quiet_scan_rule.py) on
hand-made tables whose answers are counted by hand."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def quiet_scan_rule():
    return load_benchmark("quiet_scan_rule")


def _candidate(share, artery_share, area=1.5):
    return {"share": share, "artery_share": artery_share, "area": area, "coronary": True}


def _scan(name, reference, predicted, noise, *candidates):
    return {"scan": name, "reference": reference, "predicted": predicted, "image_noise_hu": noise,
            "candidates": list(candidates)}


SCANS = [
    _scan("quiet speck", 1.3, 0.0, 20.0, _candidate(0.3, 0.6)),           # added: found
    _scan("noisy speck", 1.3, 0.0, 40.0, _candidate(0.3, 0.6)),           # noise at the cut or above: not added
    _scan("speck off the map", 1.3, 0.0, 20.0, _candidate(0.3, 0.4)),     # artery share under 0.5
    _scan("tiny speck", 1.3, 0.0, 20.0, _candidate(0.3, 0.9, area=0.9)),  # under 1 mm^2: scores 0
    _scan("found already", 50.0, 48.0, 40.0),
    _scan("quiet zero", 0.0, 0.0, 29.9, _candidate(0.1, 0.5)),            # both bounds inclusive: a false call
    _scan("zero, share too low", 0.0, 0.0, 20.0, _candidate(0.09, 0.9)),
    _scan("zero, share already coronary", 0.0, 0.0, 20.0, _candidate(0.5, 0.9)),  # the model's own call, not added
    _scan("unmeasured noise", 0.0, 0.0, None, _candidate(0.3, 0.9)),
]


def test_rule_adds_only_unsure_candidates_on_the_map_in_quiet_scans(quiet_scan_rule):
    counts = quiet_scan_rule.rule_counts(SCANS, quiet_scan_rule.RULE)
    assert counts["found"] == 2 and counts["positives"] == 5
    assert counts["found_added"] == ["quiet speck"]
    assert counts["false"] == 1 and counts["negatives"] == 4
    assert counts["false_added"] == ["quiet zero"]


def test_shipped_counts_and_a_wider_noise_cut(quiet_scan_rule):
    shipped = quiet_scan_rule.rule_counts(SCANS, None)
    assert (shipped["found"], shipped["false"]) == (1, 0)
    no_cut = quiet_scan_rule.rule_counts(SCANS, (float("inf"), 0.1, 0.5))
    assert no_cut["found_added"] == ["quiet speck", "noisy speck"]
