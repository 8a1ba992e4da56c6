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


def _make_demo(workdir: Path, seed: int) -> str:
    config = workdir / "demo.yaml"
    config.write_text(f"demo:\n  participants: 12\n  seed: {seed}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/demo/manifest.tsv", "-s", str(REPO_ROOT / "Snakefile"),
         "--directory", str(workdir), "--cores", "2", "--configfile", str(config)],
        capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_another_demo_seed_replaces_the_demo_cohort(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    dicom = workdir / "results" / "demo" / "dicom"
    _make_demo(workdir, seed=41)
    seed_41 = _files(dicom)
    log = _make_demo(workdir, seed=42)
    assert "demo_cohort" in log  # generated again, for the new seed

    fresh = tmp_path / "fresh"
    generate_cohort(fresh, n_participants=12, seed=42, size="demo")
    assert _files(dicom) == _files(fresh / "dicom")
    assert seed_41 != _files(fresh / "dicom")  # the two seeds do write different series
