"""The COCA route for users who hold annotated scans: generated patients written in
the COCA layout read back exactly, and `cacflow train --coca-root` fine-tunes the
shipped model on them (a few steps: the route, not the accuracy, is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cacflow import cli
from cacflow.coca import label_volume, read_calcium_xml, read_dicom_series, reference_table
from cacflow.model.engines import ModelFiles, create_engine
from cacflow.synth.coca_export import SERIES_FOLDER, pixel_outlines, write_coca_patient
from cacflow.synth.phantom import PhantomSettings, generate_phantom

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(rows=128, cols=128, pixel_spacing_mm=1.5)


def _uids(n: int) -> dict:
    return {"study": f"1.2.826.0.1.3680043.10.1.{n}", "series": f"1.2.826.0.1.3680043.10.1.{n}.1"}


def test_pixel_outlines_rasterise_back_to_the_mask():
    from cacflow.coca import rasterise_polygon

    rng = np.random.default_rng(3)
    for _ in range(100):
        mask = rng.random((10, 12)) < 0.5  # holes, diagonal touches, islands
        rebuilt = np.zeros_like(mask)
        for loop in pixel_outlines(mask):
            rebuilt ^= rasterise_polygon(loop, mask.shape)
        assert np.array_equal(rebuilt, mask)


def test_an_exported_patient_reads_back_with_the_generators_labels(tmp_path):
    phantom = generate_phantom(21, PhantomSettings(target_agatston=300.0))
    write_coca_patient(phantom, tmp_path, "17", _uids(17))
    series = read_dicom_series(tmp_path / "patient" / "17" / SERIES_FOLDER)
    labels, unplaced = label_volume(read_calcium_xml(tmp_path / "calcium_xml" / "17.xml"), series.volume)
    assert unplaced == 0
    assert np.array_equal(labels, phantom.coronary_labels)
    # Its reference score is that of the in-memory phantom with its own labels; only the
    # DICOM's integer HU differ (a voxel at a threshold or density-weight edge can flip).
    from cacflow.scoring import score_volume

    row = reference_table(tmp_path).to_pylist()[0]
    in_memory = score_volume(phantom.hu, phantom.coronary_labels, phantom.spacing_mm,
                             z_positions_mm=phantom.z_positions_mm)
    assert row["status"] == "ok" and in_memory.agatston_total > 100
    assert row["agatston_total"] == pytest.approx(in_memory.agatston_total, rel=0.01)


@pytest.fixture(scope="module")
def coca_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    for n, (seed, target) in enumerate([(31, 150.0), (32, 600.0)], start=1):
        write_coca_patient(generate_phantom(seed, PhantomSettings(target_agatston=target, **SMALL)), root,
                           str(n), _uids(n))
    (root / "calcium_xml" / "3.xml").write_bytes((root / "calcium_xml" / "1.xml").read_bytes())  # no DICOM
    return root


def _train(tmp_path, coca_root, *extra):
    work, model = tmp_path / "work", tmp_path / "model"
    assert cli.main(["train", "--work-dir", str(work), "--model-dir", str(model), "--coca-root", str(coca_root),
                     "--init-weights", "packaged", "--workers", "1", *extra]) == 0
    return work, model


def test_fine_tuning_on_coca_starts_from_the_shipped_model(tmp_path, coca_root):
    # (--acquisition names a phantom recipe, which a COCA fine-tune does not use)
    work, model = _train(tmp_path, coca_root, "--steps", "3", "--learning-rate", "1e-9", "--acquisition", "wide")
    index = json.loads((work / "dataset" / "coca_index.json").read_text())
    assert index["used"] == ["1", "2"] and "FileNotFoundError" in index["skipped"]["3"]
    info = json.loads((model / "model.json").read_text())
    packaged = ModelFiles.packaged()
    assert info["training"]["notes"]["initial_weights_sha256"] == packaged.sha256
    assert info["training"]["notes"]["training_data"] == "COCA-format annotations, 2 patients"
    assert str(coca_root) not in (model / "model.json").read_text()  # no site paths in the model
    assert info["training_ranges"] == packaged.info["training_ranges"]  # the span of the model it started from
    # A vanishing learning rate leaves the shipped weights: they were the starting point
    # (batch-norm running statistics move in training mode whatever the rate).
    shipped = torch.load(packaged.torch_path, map_location="cpu", weights_only=True)
    tuned = torch.load(model / "calciumnet.pt", map_location="cpu", weights_only=True)
    learned = [k for k in shipped if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(learned) > 10
    assert max(float((shipped[k] - tuned[k]).abs().max()) for k in learned) < 1e-4
    assert (model / "calciumnet.onnx").is_file()
    # No int8 copy: it would be calibrated on phantoms, not on the real scans it was tuned
    # for, so the CPU engine runs the float graph of a fine-tuned model.
    assert not (model / "calciumnet.int8.onnx").exists() and "int8" not in info
    assert ModelFiles(model).checked() and create_engine("onnxruntime", ModelFiles(model)).label == "onnxruntime-cpu-fp32"


def test_coca_targets_carry_the_readers_arteries(tmp_path, coca_root):
    work, _ = _train(tmp_path, coca_root, "--steps", "1")
    targets = np.concatenate([np.load(work / "dataset" / f"{i:05d}_targets.npy").ravel() for i in range(2)])
    expected = set()
    for seed, target in [(31, 150.0), (32, 600.0)]:
        phantom = generate_phantom(seed, PhantomSettings(target_agatston=target, **SMALL))
        expected |= {int(v) for v in np.unique(phantom.coronary_labels) if v}
    assert {int(v) for v in np.unique(targets) if v > 0} == expected
    assert (targets == 0).any()  # non-coronary calcium (bone, aorta) is taught as such


def test_snakemake_train_fine_tunes_when_the_config_names_a_coca_root(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path),
               "-n", "-p", "train"]

    def dry_run(config_text: str | None = None) -> str:
        """`snakemake -n -p train`, with this config file on top of the default; its stdout."""
        extra = []
        if config_text is not None:
            config_file = tmp_path / "extra.yaml"
            config_file.write_text(config_text)
            extra = ["--configfile", str(config_file)]
        run = subprocess.run([*command, *extra], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    plain = dry_run()
    assert ("--work-dir results/training --members 400:20000,800:30000 --negatives-tune shipped "
            "--review-phantoms 0:0 --device auto") in plain
    assert "--coca-root" not in plain
    members_only = dry_run("training:\n  negatives_tune: null\n  review_phantoms: [160, 100]\n")
    assert "--members 400:20000,800:30000 --negatives-tune none --review-phantoms 160:100 --device auto" in members_only
    patched = dry_run("training:\n  patch_review_phantoms: [240, 120, 160]\n  patch_review_min_share: 0.1\n")
    assert ("--review-phantoms 0:0 --patch-review-phantoms 240:120:160 --patch-review-min-share 0.1 "
            "--device auto") in patched
    widened = dry_run("training:\n  patch_review_phantoms: [240, 120, 160, 160]\n  patch_review_context: true\n")
    assert ("--patch-review-phantoms 240:120:160:160 --patch-review-min-share 0.01 --patch-review-context "
            "--device auto") in widened
    gated_only = dry_run("training:\n  patch_review_phantoms: [240, 120, 160, 160]\n  patch_review_context: true\n"
                         "  patch_review_scan_types: [gated]\n")
    assert ("--patch-review-phantoms 240:120:160:160 --patch-review-min-share 0.01 --patch-review-context "
            "--patch-review-scan-types gated --device auto") in gated_only
    subcell = dry_run("training:\n  input_set: subcell\n")
    assert "--negatives-tune shipped --review-phantoms 0:0 --input-set subcell --device auto" in subcell
    # A mapping of one's own replaces the default whole: no perivascular blobs unless it says so.
    tuned = dry_run("training:\n  negatives_tune: {volumes: 800, steps: 9000, learning_rate: 0.0005}\n")
    assert ("--members 400:20000,800:30000 --negatives-tune 800:9000 --negatives-tune-learning-rate 0.0005 "
            "--review-phantoms 0:0 --device auto") in tuned
    tuned = dry_run("training:\n  negatives_tune: {volumes: 400, steps: 5000, learning_rate: 0.001,\n"
                    "                   perivascular_calcium: true, speck_lesions: true}\n")
    assert ("--negatives-tune 400:5000 --negatives-tune-learning-rate 0.001 --negatives-tune-perivascular "
            "--negatives-tune-specks --review-phantoms 0:0 --device auto") in tuned
    tuned = dry_run("training:\n  coca_root: /data/my coca\n  fine_tune_steps: 700\n  device: cuda\n")
    assert "--coca-root '/data/my coca' --init-weights packaged --steps 700" in tuned
    assert "--device cuda" in tuned
