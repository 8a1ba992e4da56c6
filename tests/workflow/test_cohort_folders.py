"""A generated cohort regenerated with another seed (the demo's `demo.seed`, or
`evaluation.seed` for a second held-out cohort) replaces the old one: its folder
then holds exactly what a fresh generation writes, never the old series beside the new."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cacflow.synth.cohort import generate_cohort
from test_incremental import ENV, REPO_ROOT

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but Snakemake's marker of a directory output."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".snakemake_timestamp"}


def _make_demo(workdir: Path, seed: int, participants: int) -> str:
    config = workdir / "demo.yaml"
    config.write_text(f"demo:\n  participants: {participants}\n  seed: {seed}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/demo/manifest.tsv", "-s", str(REPO_ROOT / "Snakefile"),
         "--directory", str(workdir), "--cores", "2", "--configfile", str(config)],
        capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_another_demo_seed_replaces_the_demo_cohort(tmp_path):
    """13 participants at seed 41, then 12 at seed 42: afterwards the DICOM and the
    ground truth are those of a fresh 12-participant seed-42 cohort, with nothing of
    the old one's 13th participant left."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    demo = workdir / "results" / "demo"
    _make_demo(workdir, seed=41, participants=13)
    seed_41 = _files(demo / "dicom")
    assert (demo / "ground_truth" / "P013_baseline").is_dir()
    log = _make_demo(workdir, seed=42, participants=12)
    assert "demo_cohort" in log  # generated again, for the new seed

    fresh = tmp_path / "fresh"
    generate_cohort(fresh, n_participants=12, seed=42, size="demo")
    assert _files(demo / "dicom") == _files(fresh / "dicom")
    assert seed_41 != _files(fresh / "dicom")  # the two seeds do write different series
    # Ground truth: the same files (NIfTI bytes may differ only in gzip time stamps).
    assert _files(demo / "ground_truth").keys() == _files(fresh / "ground_truth").keys()
    for table in ("reference_scores.tsv", "lesions.tsv", "series.tsv"):
        assert (demo / "ground_truth" / table).read_bytes() == (fresh / "ground_truth" / table).read_bytes()
