"""Reruns as a cohort grows and shrinks: new participants only add work, finished
shards are left alone, withdrawals remove every trace from the outputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cacflow.manifest import write_manifest

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(workdir: Path, *config: str, dry_run: bool = False) -> str:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", "--config", *config] + (["-n"] if dry_run else [])
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_jobs(log: str) -> set[tuple[str, str]]:
    """(rule, shard) of every per-shard job Snakemake ran, from its job log blocks."""
    import re

    jobs = set()
    for block in re.split(r"\n(?=\[[A-Z][a-z]{2} )", log):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        shard = re.search(r"wildcards: shard=(\w+)", block)
        if rule and shard:
            jobs.add((rule.group(1), shard.group(1)))
    return jobs


def keys(table: Path) -> set[tuple[str, str]]:
    return set(duckdb.sql(f"select participant_id, visit from read_parquet('{table}')").fetchall())


@pytest.fixture(scope="module")
def grown_cohort(tmp_path_factory):
    from cacflow.synth.cohort import generate_cohort

    workdir = tmp_path_factory.mktemp("incremental")
    full = generate_cohort(workdir / "cohort", seed=5, size="tiny")
    with open(full, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    first = write_manifest(workdir / "first.tsv", rows[:3])
    snakemake(workdir, f"manifest={first}")
    return workdir, rows


def test_adding_participants_only_processes_them(grown_cohort):
    workdir, rows = grown_cohort
    shard_one = workdir / "results/shards/s000001"
    before = mtimes(shard_one)
    grown = write_manifest(workdir / "grown.tsv", rows)
    log = snakemake(workdir, f"manifest={grown}")
    assert mtimes(shard_one) == before  # the finished shard was not touched
    assert (workdir / "results/shards/s000002/members.tsv").read_text().count("\n") == 2  # header + 1 new visit
    assert shard_jobs(log) == {(rule, "s000002") for rule in ("discover", "select_series", "convert", "infer", "score")}
    cohort = workdir / "results/cohort"
    assert keys(cohort / "scans.parquet") == {(r["participant_id"], r["visit"]) for r in rows}
    runs = duckdb.sql(f"select n_added, n_rescored, added_scans from read_parquet('{cohort}/runs.parquet') "
                      "order by run_id").fetchall()
    new = rows[3]
    assert runs == [(3, 0, runs[0][2]), (1, 0, f"{new['participant_id']}/{new['visit']}")]
    assert "Nothing to be done" in snakemake(workdir, f"manifest={grown}", dry_run=True)


def test_withdrawals_remove_every_trace(grown_cohort):
    workdir, rows = grown_cohort
    grown = workdir / "grown.tsv"
    withdrawn = rows[0]["participant_id"]
    withdrawals = workdir / "withdrawals.txt"
    withdrawals.write_text(f"participant_id\n{withdrawn}\n")
    snakemake(workdir, f"manifest={grown}", f"withdrawals={withdrawals}")
    results = workdir / "results"
    for table in ("scans", "lesions", "series"):
        assert all(pid != withdrawn for pid, _ in keys(results / "cohort" / f"{table}.parquet"))
    runs = duckdb.sql(f"select n_withdrawn, removed_scans from read_parquet('{results}/cohort/runs.parquet') "
                      "order by run_id").fetchall()
    assert runs[-1] == (1, None)
    # No derived file of the participant remains: not in the shard tables, the images or the history.
    leftovers = []
    for path in results.rglob("*"):
        if path.is_file() and "logs" not in path.parts and withdrawn.encode() in path.read_bytes():
            leftovers.append(str(path))
        if path.is_file() and path.name.startswith(f"{withdrawn}_"):
            leftovers.append(str(path))
    assert leftovers == []
    aggregate_log = (results / "logs" / "aggregate.log").read_text()
    assert "withdrawals: 1 withdrawn participants listed" in aggregate_log and withdrawn not in aggregate_log
    assert "Nothing to be done" in snakemake(workdir, f"manifest={grown}", f"withdrawals={withdrawals}",
                                              dry_run=True)
