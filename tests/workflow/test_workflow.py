"""Run the real workflow (Snakemake, dcm2niix, the shipped model) on a tiny
generated cohort and read the cohort tables back with DuckDB."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# The rules call `cacflow`: put this interpreter's environment first on PATH, as an
# activated virtual environment would.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = SNAKEMAKE + ["-s", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


# Distinctive values planted in every patient, study, institution and operator tag
# the generator writes; none may appear in any output.
PLANTED = {
    "PatientName": "ZQXLEAK^NAMEONE",
    "PatientID": "ZQXLEAKPID{participant}",
    "PatientBirthDate": "19230517",
    "AccessionNumber": "ZQXACC{visit}",
    "InstitutionName": "ZQXLEAK INSTITUTE",
    "InstitutionAddress": "ZQXLEAK STREET 9",
    "ReferringPhysicianName": "ZQXLEAK^REFERRER",
    "OperatorsName": "ZQXLEAK^OPERATOR",
    "StudyID": "ZQXSTUDY",
}
PLANTED_MARKERS = ("ZQXLEAK", "ZQXACC", "ZQXSTUDY", "19230517")
INPUTS_BEFORE: dict = {}  # input file -> (mtime, sha256) before the run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cacflow.synth.cohort import generate_cohort

    workdir = tmp_path_factory.mktemp("run")
    cohort = workdir / "cohort"
    manifest = generate_cohort(cohort, seed=7, size="tiny", planted_identifiers=PLANTED)
    INPUTS_BEFORE.update(input_fingerprint(cohort / "dicom"))
    result = run_snakemake(workdir, "--config", f"manifest={manifest}")
    return workdir, manifest, cohort, result


def input_fingerprint(root: Path) -> dict:
    import hashlib

    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def sql(query: str):
    return duckdb.sql(query).fetchall()


def test_one_scan_row_per_manifest_row_with_a_status_and_reason(tiny_run):
    workdir, manifest, _, _ = tiny_run
    with open(manifest, newline="") as handle:
        expected = {(r["participant_id"], r["visit"]) for r in csv.DictReader(handle, delimiter="\t")}
    scans = workdir / "results/cohort/scans.parquet"
    rows = sql(f"select participant_id, visit, status, status_reason from read_parquet('{scans}')")
    assert {(p, v) for p, v, _, _ in rows} == expected
    assert len(rows) == len(expected)
    assert all(status in ("scored", "not_scorable", "failed") for _, _, status, _ in rows)
    assert all(reason for _, _, status, reason in rows if status != "scored")


def test_scored_rows_agree_with_the_generated_ground_truth(tiny_run):
    workdir, _, cohort, _ = tiny_run
    scans = workdir / "results/cohort/scans.parquet"
    reference = cohort / "ground_truth" / "reference_scores.tsv"
    rows = sql(
        f"""
        select s.risk_category, r.risk_category
        from read_parquet('{scans}') s
        join read_csv('{reference}', delim='\t', header=true, all_varchar=true) r
          on s.participant_id = r.participant_id and s.visit = r.visit
        where s.status = 'scored'
        """
    )
    assert rows, "no scored scan to compare"
    agreement = sum(predicted == truth for predicted, truth in rows) / len(rows)
    assert agreement >= 0.9, rows


def test_scans_inside_the_models_pixel_spacing_range_are_not_marked(tiny_run):
    """The tiny cohort's scored scans have 0.78 mm pixels, inside the shipped model's
    0.30-0.85 mm (scans outside it: test_bad_input); not-scored rows have no verdict."""
    workdir, _, _, _ = tiny_run
    rows = sql(f"select status, outside_model_range, status_reason from read_parquet('{workdir}/results/cohort/scans.parquet')")
    scored = [(outside, reason) for status, outside, reason in rows if status == "scored"]
    assert scored and all(outside is False for outside, _ in scored)
    assert not any("outside_model_range" in (reason or "") for _, reason in scored)
    assert all(outside is None for status, outside, _ in rows if status != "scored")


def test_lesions_and_scans_are_consistent(tiny_run):
    workdir, _, _, _ = tiny_run
    cohort = workdir / "results/cohort"
    mismatches = sql(
        f"""
        select s.participant_id, s.agatston_total, coalesce(sum(l.agatston), 0) as lesion_sum,
               s.lesion_count, count(l.lesion_id) as n
        from read_parquet('{cohort}/scans.parquet') s
        left join read_parquet('{cohort}/lesions.parquet') l using (participant_id, visit)
        where s.status = 'scored'
        group by all
        having abs(s.agatston_total - lesion_sum) > 1e-6 or s.lesion_count != n
        """
    )
    assert mismatches == []


def test_every_scored_scan_carries_its_range_over_unsure_calls(tiny_run):
    """The range brackets the score; the flag and the reviewer's note follow the
    risk categories of its ends (unscored rows have neither)."""
    from cacflow.scoring import risk_category

    workdir, _, _, _ = tiny_run
    rows = sql(f"""select status, agatston_total, agatston_range_low, agatston_range_high, risk_category_uncertain,
                          coalesce(status_reason, '')
                   from read_parquet('{workdir}/results/cohort/scans.parquet')""")
    scored = [row for row in rows if row[0] == "scored"]
    assert scored
    for _, total, low, high, uncertain, reason in scored:
        assert low - 1e-9 <= total <= high + 1e-9
        assert uncertain == (risk_category(low) != risk_category(high))
        assert ("review the overlay" in reason) == uncertain
    assert all(row[2:5] == (None, None, None) for row in rows if row[0] != "scored")
    # The unsure calls are kept for the reviewer's overlay exactly where there are any.
    inferred = sql(f"""select n_ambiguous_candidates, unsure_labels_path
                       from read_parquet('{workdir}/results/shards/*/infer/visits.parquet')
                       where labels_path is not null""")
    assert inferred
    for n_unsure, path in inferred:
        assert (path is not None) == (n_unsure > 0)
        assert path is None or (workdir / path).is_file()  # relative to the working directory


def test_every_discovered_series_has_a_qc_status_and_one_chosen_per_scored_visit(tiny_run):
    workdir, _, _, _ = tiny_run
    cohort = workdir / "results/cohort"
    assert sql(f"select count(*) from read_parquet('{cohort}/series.parquet') where qc_status is null") == [(0,)]
    chosen = sql(
        f"""
        select s.participant_id, s.visit, count(*) filter (where se.chosen)
        from read_parquet('{cohort}/scans.parquet') s
        join read_parquet('{cohort}/series.parquet') se using (participant_id, visit)
        where s.status = 'scored' group by all
        """
    )
    assert chosen and all(n == 1 for _, _, n in chosen)


def test_report_and_dictionary_are_written(tiny_run):
    workdir, _, _, _ = tiny_run
    cohort = workdir / "results/cohort"
    html = (cohort / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html
    dictionary = (cohort / "data_dictionary.csv").read_text()
    for column in ("agatston_total", "risk_category", "cac_drs", "qc_reasons", "peak_hu"):
        assert column in dictionary


def test_rerun_with_nothing_new_does_nothing(tiny_run):
    workdir, manifest, _, _ = tiny_run
    result = run_snakemake(workdir, "--config", f"manifest={manifest}", "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_bad_config_value_stops_the_run_naming_it(tiny_run):
    workdir, manifest, _, _ = tiny_run
    result = run_snakemake(workdir, "--config", f"manifest={manifest}", "engine=gpu", "-n", check=False)
    assert result.returncode != 0
    assert "engine" in result.stderr + result.stdout and "'gpu'" in result.stderr + result.stdout


def test_planted_identifiers_are_in_the_input_and_in_no_output(tiny_run):
    import gzip

    import pydicom

    workdir, _, cohort, _ = tiny_run
    sample = next(p for p in (cohort / "dicom").rglob("*") if p.is_file())
    assert str(pydicom.dcmread(sample, stop_before_pixels=True).PatientName) == PLANTED["PatientName"]
    outputs = [p for p in (workdir / "results").rglob("*") if p.is_file()]
    outputs += [p for p in (workdir / ".snakemake" / "log").rglob("*") if p.is_file()]
    assert len(outputs) > 10
    hits = []
    for path in outputs:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        hits += [(str(path), marker) for marker in PLANTED_MARKERS if marker.encode() in data]
    assert hits == []


def test_benchmark_output_carries_no_planted_identifier(tmp_path):
    """The CPU benchmark's printed and JSON figures are outputs too."""
    import json

    import pydicom

    planted = {key: value.format(participant="B0", visit="1") for key, value in PLANTED.items()}
    figures = tmp_path / "figures.json"
    command = [sys.executable, str(REPO_ROOT / "tests" / "benchmarks" / "bench_cpu.py"), "--scans", "1",
               "--repeats", "1", "--engines", "onnxruntime", "--json", str(figures),
               "--identifiers", json.dumps(planted), "--keep-dicom", str(tmp_path / "dicom")]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sample = next(p for p in (tmp_path / "dicom").rglob("*") if p.is_file())
    assert str(pydicom.dcmread(sample, stop_before_pixels=True).PatientName) == planted["PatientName"]
    assert "s per scan end to end" in result.stdout
    printed = result.stdout + result.stderr + figures.read_text()
    assert [marker for marker in PLANTED_MARKERS if marker in printed] == []


def test_inputs_are_only_read(tiny_run):
    _, _, cohort, _ = tiny_run
    assert INPUTS_BEFORE and input_fingerprint(cohort / "dicom") == INPUTS_BEFORE
