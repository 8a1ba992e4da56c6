"""Crash safety: the workflow is killed with SIGKILL at random moments, then resumed
with the command the README gives (``snakemake --unlock``, then the run command with
``--rerun-incomplete``). After every kill the cohort tables that exist must read in
DuckDB, and after every resumed run they must hold exactly one scan row per manifest
visit, no duplicates, and the same numbers as an uninterrupted run.

Each trial forces part of the finished workflow to run again (``--forcerun`` of a
randomly chosen stage, so everything downstream of it reruns, the cohort tables
included) and kills the whole process group (Snakemake and its jobs) at a seeded
random moment: in every other trial anywhere in that run's expected duration, in the
others within the expected time of the aggregate job, which writes the cohort tables
(expected times come from the uninterrupted run's log). A trial whose run finished
before its kill moment does not count. ``CACFLOW_CRASH_TRIALS`` / ``CACFLOW_CRASH_SEED``
change the number of kills and the seed.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
N_KILLS = int(os.environ.get("CACFLOW_CRASH_TRIALS", "10"))
SEED = int(os.environ.get("CACFLOW_CRASH_SEED", "20261127"))
FORCEABLE = ("plan_shards", "discover", "select_series", "convert", "infer", "score", "aggregate")
TABLES = ("scans", "lesions", "series", "runs")
# Columns that legitimately differ between two runs of the same inputs.
RUN_DEPENDENT = {"processed_at"}
KEYS = {"scans": ("participant_id", "visit"), "lesions": ("participant_id", "visit", "lesion_id"),
        "series": ("participant_id", "visit", "series_instance_uid")}


def snakemake_command(workdir: Path, manifest: Path, *args: str) -> list[str]:
    # crash.yaml: infer_threads 1, so both shards infer at once on 2 cores (a shorter test).
    return [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", "--configfile", str(workdir / "crash.yaml"),
            "--config", f"manifest={manifest}", "shard_size=1", *args]


def run(command: list[str], workdir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=ENV)
    assert result.returncode == 0, f"{command[7:]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


_STAMP = r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n"


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%a %b %d %H:%M:%S %Y").timestamp()


def rule_timeline(log: str, launched: float) -> tuple[dict[str, float], float]:
    """From Snakemake's log of a run launched at ``launched`` (time.time()): seconds from
    the launch to each rule's first start, and to the last job's end. The log's clock
    has 1 s steps: a stamp is taken as the middle of its second."""
    starts: dict[str, float] = {}
    for stamp, rule in re.findall(_STAMP + r"(?:local)?(?:rule|checkpoint) (\w+):", log, re.M):
        starts.setdefault(rule, _time(stamp) + 0.5 - launched)
    ends = [_time(stamp) + 0.5 - launched for stamp in re.findall(_STAMP + r"Finished jobid", log, re.M)]
    return starts, max(ends)


def read_tables(results: Path) -> dict[str, list[tuple]]:
    """Every cohort table that exists, through DuckDB, rows sorted, run-dependent columns left out."""
    tables = {}
    for name in TABLES:
        path = results / "cohort" / f"{name}.parquet"
        if not path.exists():
            continue
        relation = duckdb.sql(f"select * from read_parquet('{path}')")  # raises if the file is damaged
        columns = [c for c in relation.columns if c not in RUN_DEPENDENT]
        tables[name] = sorted(relation.select(*columns).fetchall(), key=repr) if name != "runs" else \
            duckdb.sql(f"select run_id from read_parquet('{path}')").fetchall()
        tables[f"{name}_columns"] = columns
    return tables


def check_tables(results: Path, visits: set[tuple[str, str]], baseline: dict | None) -> dict:
    """The invariants a reader relies on, for every cohort table present."""
    tables = read_tables(results)
    for name, key in KEYS.items():
        if name not in tables:
            continue
        columns = tables[f"{name}_columns"]
        keys = [tuple(row[columns.index(k)] for k in key) for row in tables[name]]
        assert len(keys) == len(set(keys)), f"duplicate rows in {name}.parquet"
        assert {k[:2] for k in keys} <= visits, f"{name}.parquet has rows of visits not in the manifest"
        if name == "scans":
            assert set(keys) == visits, "scans.parquet must have exactly one row per manifest visit"
        if baseline is not None:
            assert tables[name] == baseline[name], f"{name}.parquet differs from the uninterrupted run"
    if "runs" in tables:
        run_ids = [r[0] for r in tables["runs"]]
        assert len(run_ids) == len(set(run_ids)), "duplicate run ids in runs.parquet"
    if "scans" in tables and "lesions" in tables:
        scans = duckdb.sql(f"select participant_id, visit, lesion_count from read_parquet('{results}/cohort/scans.parquet') "
                           "where status = 'scored'").fetchall()
        lesions = dict(duckdb.sql(f"select participant_id || '/' || visit, count(*) from "
                                  f"read_parquet('{results}/cohort/lesions.parquet') group by 1").fetchall())
        for participant, visit, count in scans:
            assert lesions.get(f"{participant}/{visit}", 0) == count, "lesions.parquet disagrees with scans.parquet"
    return tables


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from cacflow.manifest import write_manifest
    from cacflow.synth.cohort import generate_cohort

    workdir = tmp_path_factory.mktemp("crash")
    full = generate_cohort(workdir / "cohort", seed=5, size="tiny")
    with open(full, newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t")]
    # A visit without lesions, one with lesions, one that is not scorable: every table has rows.
    chosen = [r for r in rows if r["participant_id"] in ("P001", "P002", "P004")]
    (workdir / "crash.yaml").write_text("resources:\n  infer_threads: 1\n")
    manifest = workdir / "manifest.tsv"
    write_manifest(manifest, chosen)
    launched = time.time()
    result = run(snakemake_command(workdir, manifest), workdir)
    visits = {(r["participant_id"], r["visit"]) for r in chosen}
    baseline = check_tables(workdir / "results", visits, None)
    statuses = {row[3] for row in baseline["scans"]}
    assert {"scored", "not_scorable"} <= statuses and baseline["lesions"], statuses
    return workdir, manifest, visits, baseline, rule_timeline(result.stdout + result.stderr, launched)


def test_sigkill_at_random_moments_then_resume(finished_run):
    workdir, manifest, visits, baseline, (starts, end) = finished_run
    # Snakemake's start-up (import, DAG) before the first job: the jobs a forced run
    # repeats start this long after launch, then follow the baseline's timeline.
    startup = min(starts.values())
    rng = random.Random(SEED)
    results = workdir / "results"
    kills, attempts, landed = 0, 0, []
    ran_for: dict[str, float] = {}  # shortest whole run seen per forced rule
    while kills < N_KILLS:
        attempts += 1
        assert attempts <= 3 * N_KILLS, f"only {kills} of {attempts} runs were still running at their kill moment"
        rule = rng.choice(FORCEABLE)
        # The run repeats the baseline from the rule's first job on, after Snakemake's
        # start-up (forcing the plan checkpoint: the plan, about 1 s, then the cohort tables).
        to_aggregate = 1.0 if rule == "plan_shards" else starts["aggregate"] - starts[rule]
        run_end = min(startup + to_aggregate + end - starts["aggregate"] + 0.5, ran_for.get(rule, math.inf) - 0.3)
        if kills % 2 == 0:  # anywhere in the run
            moment = rng.uniform(0.2, run_end)
        else:  # while the cohort tables are being built (the aggregate job)
            aggregate = startup + to_aggregate
            moment = min(rng.uniform(aggregate - 0.5, aggregate + 0.5 + starts["report"] - starts["aggregate"]),
                         run_end)
        launched = time.monotonic()
        process = subprocess.Popen(snakemake_command(workdir, manifest, "--forcerun", rule), cwd=workdir, env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            process.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # Snakemake and every job it started
            except ProcessLookupError:  # it ended in between
                pass
        log = process.communicate()[0]
        if process.returncode != -signal.SIGKILL:
            assert process.returncode == 0, log[-4000:]
            ran_for[rule] = min(ran_for.get(rule, math.inf), time.monotonic() - launched)
            continue  # it finished before the kill moment: not a crash (later draws stay shorter)
        kills += 1
        running = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", log, re.M)
        finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log)
        for name in finished:
            running.remove(name)
        landed.append(f"{rule}@{moment:.1f}s:{'+'.join(running) or 'between jobs'}")

        # Right after the kill: whatever tables exist are complete files (atomic writes).
        check_tables(results, visits, baseline)

        # Resume as the README says.
        run(snakemake_command(workdir, manifest, "--unlock"), workdir)
        run(snakemake_command(workdir, manifest, "--rerun-incomplete"), workdir)
        tables = check_tables(results, visits, baseline)
        assert set(tables) >= set(TABLES)

    print(f"\n{kills} kills in {attempts} runs (forced rule@moment:jobs running): " + ", ".join(landed))
    dry = run(snakemake_command(workdir, manifest, "-n"), workdir)
    assert "Nothing to be done" in dry.stdout + dry.stderr
