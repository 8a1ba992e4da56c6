"""How often a cohort of a given size can meet must-hold 4's CAC >= 1 targets
(docs/evaluation.md, "What the targets allow on cohorts of this size").

    python tests/benchmarks/target_reach.py b.jsonl c.jsonl d.jsonl e*.jsonl \
        --model-pairs E1=e1/pairs.csv --model-pairs E2=e2/pairs.csv

Reads tables of ``place_ceiling.py`` (one per cohort, scans of record in participant
order) and, for three oracles, prints CAC >= 1 sensitivity and specificity pooled over
the tables with Wilson 95 % intervals, and how many cohorts meet both targets: each
table whole, and every full block of ``--block`` participants (1-120, 121-240, ... of
each table, a participant's visits together; a table no larger than a block is one). ``--model-pairs NAME=pairs.csv``
(``cacflow evaluate``'s pairs) counts a model the same way on its own cohort.

Then, for each oracle and the pooled model, the chance that a cohort of the blocks'
median size meets both targets if each positive is missed and each negative called
independently at the pooled rates (binomial). Positive is a score >= 1, on both sides,
as ``cacflow evaluate`` counts it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from statistics import median

from cacflow.evaluation import wilson_interval

TARGET = 0.98  # must-hold 4: CAC >= 1 sensitivity and specificity
BLOCK_PARTICIPANTS = 120  # cohort B's size


# Each oracle's options to place_ceiling.oracle_calls (candidates on an artery, 0 mm).
ORACLES = {
    "place_and_kind": {},
    "place_and_kind_peak150": {"peak_floor": 150.0},
    "place_only": {"knows_kind": False},
}


def scans_of(path: str) -> list[dict]:
    return [row for row in map(json.loads, open(path)) if row["type"] == "scan"]


def oracle_outcomes(scans: list[dict], options: dict) -> list[tuple[str, bool, bool]]:
    """(participant, reference positive, called positive) per scan."""
    from place_ceiling import called_positive, oracle_calls  # beside this script, first on sys.path when it runs

    return [(scan["participant_id"], scan["reference_agatston"] >= 1.0, called_positive(oracle_calls(scan, **options)))
            for scan in scans]


def model_outcomes(pairs_csv: str) -> list[tuple[str, bool, bool]]:
    with open(pairs_csv, newline="") as handle:
        return [(row["participant_id"], float(row["reference_agatston_total"]) >= 1.0,
                 float(row["predicted_agatston_total"]) >= 1.0) for row in csv.DictReader(handle)]


def confusion(outcomes) -> dict:
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    for _, positive, called in outcomes:
        counts[("tp" if called else "fn") if positive else ("fp" if called else "tn")] += 1
    return counts


def meets_targets(counts: dict) -> bool:
    """Both rates at or above the target; a rate without scans to measure it fails."""
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    return (positives > 0 and negatives > 0
            and counts["tp"] >= TARGET * positives and counts["tn"] >= TARGET * negatives)


def blocks(outcomes, size: int) -> list[list]:
    """Consecutive full blocks of ``size`` participants (numbered P001, P002, ...)."""
    by_block: dict[int, list] = {}
    for outcome in outcomes:
        by_block.setdefault((int(outcome[0].lstrip("P")) - 1) // size, []).append(outcome)
    last_participant = max(int(o[0].lstrip("P")) for o in outcomes)
    return [by_block[b] for b in sorted(by_block) if (b + 1) * size <= max(last_participant, size)]


def binomial_at_most(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def pass_chance(miss_rate: float, false_rate: float, positives: int, negatives: int) -> float:
    """P(misses <= 2 % of positives and false calls <= 2 % of negatives), independent scans."""
    allowed_misses = math.floor((1 - TARGET) * positives + 1e-9)
    allowed_false = math.floor((1 - TARGET) * negatives + 1e-9)
    return binomial_at_most(allowed_misses, positives, miss_rate) * binomial_at_most(allowed_false, negatives, false_rate)


def summary(name: str, cohorts: dict[str, list], block: int) -> dict:
    pooled = confusion([o for outcomes in cohorts.values() for o in outcomes])
    positives, negatives = pooled["tp"] + pooled["fn"], pooled["tn"] + pooled["fp"]
    whole = {cohort: meets_targets(confusion(outcomes)) for cohort, outcomes in cohorts.items()}
    block_counts = [confusion(b) for outcomes in cohorts.values() for b in blocks(outcomes, block)]
    typical_positives = int(median(c["tp"] + c["fn"] for c in block_counts))
    typical_negatives = int(median(c["tn"] + c["fp"] for c in block_counts))
    return {
        "who": name, **pooled,
        "sensitivity": pooled["tp"] / positives, "sensitivity_ci": wilson_interval(pooled["tp"], positives),
        "specificity": pooled["tn"] / negatives, "specificity_ci": wilson_interval(pooled["tn"], negatives),
        "cohorts_meeting_targets": whole,
        "blocks": len(block_counts), "blocks_meeting_targets": sum(map(meets_targets, block_counts)),
        "block_median_positives": typical_positives, "block_median_negatives": typical_negatives,
        "binomial_chance_block_meets": pass_chance(pooled["fn"] / positives, pooled["fp"] / negatives,
                                                   typical_positives, typical_negatives),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", help="place_ceiling.py cohort tables")
    parser.add_argument("--model-pairs", action="append", default=[], metavar="NAME=PAIRS_CSV")
    parser.add_argument("--block", type=int, default=BLOCK_PARTICIPANTS)
    args = parser.parse_args(argv)
    tables = {path: scans_of(path) for path in args.tables}
    for name, options in ORACLES.items():
        cohorts = {path: oracle_outcomes(scans, options) for path, scans in tables.items()}
        print(json.dumps(summary(name, cohorts, args.block)))
    if args.model_pairs:
        cohorts = dict(item.split("=", 1) for item in args.model_pairs)
        print(json.dumps(summary("model", {n: model_outcomes(p) for n, p in cohorts.items()}, args.block)))


if __name__ == "__main__":
    main()
