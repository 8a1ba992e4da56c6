"""The per-shard stage functions the Snakemake rules call (via ``cacflow stage``).

Every stage reads the previous stage's per-visit table and writes its own. A
visit carries a ``status`` (``pending`` until scored, then ``scored``,
``not_scorable`` or ``failed``) and a ``status_reason``; each visit is processed
in isolation, so one bad scan is recorded and the shard still completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cacflow import __version__
from cacflow.atomic import atomic_write_bytes
from cacflow.progress import Progress

log = logging.getLogger("cacflow.pipeline")

PENDING, SCORED, NOT_SCORABLE, FAILED = "pending", "scored", "not_scorable", "failed"


# --- small helpers -----------------------------------------------------------------

def visit_file_stem(participant_id: str, visit: str) -> str:
    """A file name for a visit: readable, filesystem-safe, and collision-free
    (a short hash of the exact ids disambiguates ids that sanitise alike)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{participant_id}_{visit}")[:80]
    digest = hashlib.sha256(f"{participant_id}\0{visit}".encode()).hexdigest()[:8]
    return f"{safe}_{digest}"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_frame(frame: pd.DataFrame, path: str | Path) -> None:
    """Internal per-shard tables: Parquet, written atomically."""
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_frame(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _failure_reason(stage: str, error: BaseException) -> str:
    log.error("%s failed:\n%s", stage, "".join(traceback.format_exception(error)))
    return f"{stage} failed: {error}"


# --- plan ------------------------------------------------------------------------

def stage_plan(manifest_path: Path, shards_dir: Path, shard_size: int, out_plan: Path) -> None:
    from cacflow.manifest import read_manifest
    from cacflow.sharding import plan_shards, write_plan

    entries, warnings = read_manifest(manifest_path)
    for warning in warnings:
        log.warning("manifest %s", warning)
    plan = plan_shards(entries, shards_dir, shard_size)
    write_plan(plan, out_plan)
    log.info("plan: %d visits in %d shards", len(plan), len({shard for shard, _ in plan}))


# --- convert ---------------------------------------------------------------------

def stage_convert(visits_path: Path, nifti_dir: Path, out_visits: Path) -> None:
    from cacflow.convert import ConversionError, convert_series

    visits = read_frame(visits_path)
    nifti_dir = Path(nifti_dir)
    nifti_dir.mkdir(parents=True, exist_ok=True)
    nifti_paths: list[str | None] = []
    todo = visits["status"] == PENDING
    progress = Progress("convert", int(todo.sum()), log)
    for index, visit in visits.iterrows():
        if visit["status"] != PENDING:
            nifti_paths.append(None)
            continue
        target = nifti_dir / f"{visit_file_stem(visit['participant_id'], visit['visit'])}.nii"
        try:
            convert_series(list(visit["files"]), target, expected_slices=int(visit["n_slices"]))
            nifti_paths.append(str(target))
        except ConversionError as error:
            visits.loc[index, ["status", "status_reason"]] = [FAILED, f"conversion failed: {error}"]
            nifti_paths.append(None)
        except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
            visits.loc[index, ["status", "status_reason"]] = [FAILED, _failure_reason("conversion", error)]
            nifti_paths.append(None)
        progress.step()
    visits["nifti_path"] = nifti_paths
    write_frame(visits, out_visits)


# --- infer -----------------------------------------------------------------------

def stage_infer(visits_path: Path, engine_kind: str, settings: dict, labels_dir: Path, out_visits: Path) -> None:
    """One engine for the whole shard; volumes are read ahead on a worker thread
    while the engine runs, so reading and inference overlap."""
    from concurrent.futures import ThreadPoolExecutor

    import nibabel as nib

    from cacflow.convert import load_volume
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine

    visits = read_frame(visits_path)
    labels_dir = Path(labels_dir)
    labels_dir.mkdir(parents=True, exist_ok=True)
    model = ModelFiles.packaged()
    engine = create_engine(engine_kind, model)
    log.info("engine %s, model %s (sha256 %s)", engine.label, model.version, model.sha256[:12])
    segmenter = CalciumSegmenter(engine, threshold_hu=float(settings["scoring"]["threshold_hu"]))
    todo = [index for index, status in visits["status"].items() if status == PENDING]
    progress = Progress("infer", len(todo), log)
    visits["labels_path"] = None
    visits["engine"] = engine.label
    visits["model_version"] = model.version
    visits["model_sha256"] = model.sha256
    visits["infer_seconds"] = np.nan

    def read(index):
        try:
            return load_volume(visits.at[index, "nifti_path"]), None
        except Exception as error:  # noqa: BLE001 - recorded per visit
            return None, error

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = [reader.submit(read, index) for index in todo[:2]]
        for position, index in enumerate(todo):
            volume, error = pending.pop(0).result()
            if position + 2 < len(todo):
                pending.append(reader.submit(read, todo[position + 2]))
            try:
                if error is not None:
                    raise error
                started = time.perf_counter()
                segmentation = segmenter.segment(volume.hu, volume.spacing_mm)
                visits.at[index, "infer_seconds"] = time.perf_counter() - started
                source = nib.load(visits.at[index, "nifti_path"])
                target = labels_dir / Path(visits.at[index, "nifti_path"]).with_suffix(".nii.gz").name
                save_labels_like(segmentation.labels, source, target)
                visits.at[index, "labels_path"] = str(target)
            except Exception as error:  # noqa: BLE001 - one visit must never stop the shard
                visits.loc[index, ["status", "status_reason"]] = [FAILED, _failure_reason("inference", error)]
            progress.step()
    write_frame(visits, out_visits)


def save_labels_like(labels_zyx: np.ndarray, source_image, target: Path) -> None:
    """Write a label volume aligned with the CT NIfTI it came from (same world
    coordinates: the canonical RAS grid of the source)."""
    import nibabel as nib

    canonical = nib.as_closest_canonical(source_image)
    data = np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)[::-1, ::-1, :], dtype=np.uint8)
    image = nib.Nifti1Image(data, canonical.affine)
    image.header.set_xyzt_units("mm")
    tmp = target.with_name(f".{target.stem}.tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(target)
