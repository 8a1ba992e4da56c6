"""The config's `model`: a cohort scored with another model folder (what `snakemake
train` writes) carries that model's version and weights hash in every scored row,
and new weights, even in the same folder, rerun inference for every shard."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cacflow.manifest import write_manifest
from test_incremental import ENV, REPO_ROOT, shard_jobs, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def export_member(member: int, model_dir: Path, version: str) -> str:
    """One network of the shipped ensemble, exported as a model folder of its own
    (a real, different model: its own weights, ONNX graph and model.json)."""
    from cacflow.model.engines import ModelFiles
    from cacflow.training import TrainingConfig, export

    network = ModelFiles.packaged().build_network().members[member].eval()
    # One calibration phantom keeps the test short; the int8 copy is what the CPU engine runs.
    export(network, TrainingConfig(work_dir=str(model_dir.parent), model_dir=str(model_dir), model_version=version,
                                   int8_calibration_phantoms=1), [])
    return hashlib.sha256((model_dir / "calciumnet.pt").read_bytes()).hexdigest()


def shards(workdir: Path) -> set[str]:
    return {shard for (shard,) in duckdb.sql(
        f"select distinct shard from read_parquet('{workdir}/results/cohort/scans.parquet')").fetchall()}


def scored_models(workdir: Path) -> set[tuple[str, str]]:
    return set(duckdb.sql(
        f"select distinct model_version, model_sha256 from read_parquet('{workdir}/results/cohort/scans.parquet') "
        "where status = 'scored'").fetchall())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from cacflow.synth.cohort import generate_cohort

    workdir = tmp_path_factory.mktemp("model-choice")
    full = generate_cohort(workdir / "cohort", seed=13, size="tiny")
    with open(full, newline="") as handle:
        rows = [row for row in csv.DictReader(handle, delimiter="\t")][:2]
    manifest = write_manifest(workdir / "manifest.tsv", rows)
    # One visit per shard: the rerun must reach every shard, not just one.
    snakemake(workdir, f"manifest={manifest}", "shard_size=1")
    assert len(shards(workdir)) == 2
    return workdir, manifest


def test_the_shipped_model_scores_by_default(cohort):
    from cacflow.model.engines import ModelFiles

    workdir, _ = cohort
    shipped = ModelFiles.packaged()
    assert scored_models(workdir) == {(shipped.version, shipped.sha256)}


def test_another_model_folder_reruns_inference_for_every_shard_and_is_recorded(cohort):
    workdir, manifest = cohort
    model_dir = workdir / "my-model"
    sha_first = export_member(0, model_dir, "0.3.0-member1")
    # A relative folder is relative to the working directory (--directory), as results/model is.
    log = snakemake(workdir, f"manifest={manifest}", "shard_size=1", "model=my-model")
    assert {shard for rule, shard in shard_jobs(log) if rule == "infer"} == shards(workdir)
    assert scored_models(workdir) == {("0.3.0-member1", sha_first)}
    # The same folder spelt another way is the same setting.
    assert "Nothing to be done" in snakemake(workdir, f"manifest={manifest}", "shard_size=1", "model=./my-model/",
                                             dry_run=True)

    # Retrained weights written into the same folder: same config, new results.
    sha_second = export_member(1, model_dir, "0.3.0-member2")
    assert sha_second != sha_first
    log = snakemake(workdir, f"manifest={manifest}", "shard_size=1", f"model={model_dir}")
    assert {shard for rule, shard in shard_jobs(log) if rule == "infer"} == shards(workdir)
    assert scored_models(workdir) == {("0.3.0-member2", sha_second)}


def test_a_folder_without_a_model_stops_the_run_naming_the_setting(cohort, tmp_path):
    workdir, manifest = cohort
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
         "--cores", "1", "-n", "--config", f"manifest={manifest}", "shard_size=1", f"model={tmp_path}"],
        capture_output=True, text=True, env=ENV)
    assert result.returncode != 0
    assert "config model" in result.stdout + result.stderr and str(tmp_path) in result.stdout + result.stderr


def test_training_the_model_folder_is_not_blocked_by_its_absence(cohort):
    """`model: results/model` is set before `snakemake train` writes that folder."""
    workdir, manifest = cohort
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
         "--cores", "1", "-n", "train", "--config", f"manifest={manifest}", "model=results/model"],
        capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "train" in result.stdout
