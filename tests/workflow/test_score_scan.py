"""``cacflow score-scan``: one visit folder in, one JSON object out, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cacflow import tables

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    from cacflow.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    manifest = generate_cohort(out, seed=11, size="tiny")
    with open(out / "ground_truth" / "reference_scores.tsv", newline="") as handle:
        reference = {row["participant_id"]: row for row in csv.DictReader(handle, delimiter="\t")}
    with open(manifest, newline="") as handle:
        folders = {row["participant_id"]: row["dicom_dir"] for row in csv.DictReader(handle, delimiter="\t")}
    return folders, reference


def score_scan(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "cacflow", "score-scan", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_prints_every_scans_column_and_the_known_category(tiny_cohort):
    folders, reference = tiny_cohort
    scored = [pid for pid, row in reference.items() if row["expected_status"] == "scored"]
    pid = max(scored, key=lambda p: float(reference[p]["agatston_total"] or 0))
    result = score_scan(folders[pid], "--engine", "onnxruntime", "--lesions")
    contract = set(tables.schema("scans").names) - {"shard", "reference_agatston_total", "reference_risk_category"}
    assert contract <= set(result), contract - set(result)
    assert result["participant_id"] is None and result["status"] == "scored"
    assert result["engine"] == "onnxruntime-cpu-int8"  # the shipped model's int8 copy
    assert result["risk_category"] == reference[pid]["risk_category"]
    assert abs(sum(lesion["agatston"] for lesion in result["lesions"]) - result["agatston_total"]) < 1e-6


def test_a_visit_without_a_scorable_series_says_why(tiny_cohort):
    folders, reference = tiny_cohort
    pid = next(p for p, row in reference.items() if row["expected_status"] == "not_scorable")
    result = score_scan(folders[pid], "--participant-id", pid)
    assert result["participant_id"] == pid
    assert result["status"] == "not_scorable" and result["status_reason"]
    assert result["agatston_total"] is None


def test_a_missing_folder_is_reported_not_crashed(tmp_path):
    result = score_scan(str(tmp_path / "nowhere"))
    assert result["status"] == "not_scorable"
    assert "does not exist" in result["status_reason"]


def test_the_real_phantom_scan_runs_end_to_end(phantom_dir):
    result = score_scan(str(phantom_dir))
    assert result["status"] in ("scored", "not_scorable")
    assert result["manufacturer"] and "TOSHIBA" in result["manufacturer"].upper() or result["status"] != "scored"
    assert result["kvp"] == 120 or result["status"] != "scored"


def test_model_names_the_model_that_scores_and_a_wrong_folder_says_what_to_fix(tiny_cohort, tmp_path):
    from test_model_choice import export_member

    from cacflow.model.engines import ModelFiles

    folders, reference = tiny_cohort
    pid = next(p for p, row in reference.items() if row["expected_status"] == "scored")
    model_dir = tmp_path / "model"
    sha = export_member(0, model_dir, "member-1")  # a real model other than the shipped one
    result = score_scan(folders[pid], "--model", str(model_dir))
    assert result["status"] == "scored"
    assert result["model_version"] == "member-1"
    assert result["model_sha256"] == sha

    assert score_scan(folders[pid], "--model", "")["model_sha256"] == ModelFiles.packaged().sha256  # "": shipped

    # A wrong folder, given on the command line or in a config file, stops before any scan is read.
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tmp_path}\n")
    for how in (["--model", str(tmp_path)], ["--configfile", str(config)]):
        wrong = subprocess.run([sys.executable, "-m", "cacflow", "score-scan", folders[pid], *how],
                               capture_output=True, text=True)
        assert wrong.returncode != 0 and "lacks model.json" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_manifest_loads_the_engine_once_and_scores_every_visit_as_one_at_a_time_would(tiny_cohort, tmp_path,
                                                                                      monkeypatch):
    from cacflow import evaluation, pipeline

    folders, reference = tiny_cohort
    scored = sorted(p for p, row in reference.items() if row["expected_status"] == "scored")[:3]
    assert len(scored) >= 2
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("participant_id\tvisit\tdicom_dir\n"
                        + "".join(f"{pid}\tbaseline\t{folders[pid]}\n" for pid in scored))
    loads = []
    real_init = pipeline.Inferer.__init__

    def counting_init(self, *args, **kwargs):  # the real engine, counted
        loads.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Inferer, "__init__", counting_init)
    rows = {row["participant_id"]: row for row in pq.read_table(
        evaluation.score_manifest(manifest, tmp_path / "scans.parquet", engine="onnxruntime")).to_pylist()}
    assert len(loads) == 1
    for pid in scored:  # the shared engine gives each visit the score it gets alone
        alone = score_scan(folders[pid], "--engine", "onnxruntime")
        assert rows[pid]["status"] == "scored"
        assert rows[pid]["agatston_total"] == pytest.approx(alone["agatston_total"], abs=1e-9)
        assert rows[pid]["risk_category"] == reference[pid]["risk_category"]
