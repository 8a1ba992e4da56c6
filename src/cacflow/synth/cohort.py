"""A synthetic cohort: DICOM archive per participant visit, manifest, ground truth.

Layout under ``out_dir``::

    manifest.tsv                          participant_id, visit, dicom_dir (absolute)
    dicom/<participant>/<visit>/...       what an archive export holds (several series,
                                          folder layouts and file names vary by visit)
    ground_truth/                         beside the DICOM, never inside it
        reference_scores.tsv              one row per visit: expected series and scores
        lesions.tsv                       one row per coronary lesion of a scored series
        series.tsv                        every series written, with what it is
        <participant>_<visit>/labels.nii.gz   lesion labels (0 bg, 1 LM, 2 LAD, 3 LCX, 4 RCA)
        <participant>_<visit>/vessels.nii.gz  coronary tubes, same labels
        <participant>_<visit>/truth.json      reference, lesions, distractors, settings

Ground truth carries only the cohort's participant ids, never the (planted) patient
identifiers written into the DICOM.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from cacflow.atomic import atomic_write_text
from cacflow.disk import require_free_space
from cacflow.synth.dicom_writer import localizer_from_phantom, uid, write_series
from cacflow.synth.phantom import (
    IMAGE_REFERENCE_KEYS,
    RISK_CATEGORIES,
    Phantom,
    PhantomSettings,
    generate_phantom,
    risk_category,
)

MANIFEST_COLUMNS = ("participant_id", "visit", "dicom_dir")
SCORE_COLUMNS = (
    "agatston_total", "agatston_lm", "agatston_lad", "agatston_lcx", "agatston_rca", "volume_mm3",
    "lesion_count", "risk_category", "cac_drs",
)
REFERENCE_COLUMNS = (
    "participant_id", "visit", "expected_status", "series_instance_uid", "series_kind", "gated", "ecg_tags_blank",
    "kvp", "slice_thickness_mm", "slice_increment_mm", "pixel_spacing_mm", *SCORE_COLUMNS, "noncoronary_calcium",
    *IMAGE_REFERENCE_KEYS,  # what the scored series shows (phantom.image_reference): a secondary reference
)
# Calcified structures outside the coronary arteries that the generator may add (bone is
# in every scan): a scan holding some but no coronary calcium must score 0.
NONCORONARY_CALCIUM_KINDS = ("aortic_valve", "aortic_wall", "mitral_annulus")
LESION_COLUMNS = (
    "participant_id", "visit", "lesion_id", "vessel", "z_mm", "y_mm", "x_mm", "semi_axis_1_mm", "semi_axis_2_mm",
    "semi_axis_3_mm", "density_hu", "distance_from_ostium_mm", "n_slices", "agatston", "volume_mm3", "n_voxels",
)
SERIES_COLUMNS = ("participant_id", "visit", "series_instance_uid", "series_number", "series_kind", "n_files", "folder")


@dataclass(frozen=True)
class _Visit:
    participant: str
    visit: str
    target: float  # Agatston the patient's lesion plan aims at (standard gated scan)
    kinds: tuple[str, ...]  # series in the archive, in acquisition order
    vendor: str
    layout: str  # 'flat', 'series_folders', 'dated', 'bare'
    blank_gating: bool = False  # gated, but the ECG tags were stripped (description keeps 'CaSc')


# Hand-made plans: every risk category by construction, at least two zeros, visits
# without a gated series (non-gated chest only; nothing scorable), blanked ECG tags,
# every vendor and layout, a participant with two visits.
_DEMO_PLANS = (
    _Visit("P001", "baseline", 0, ("localizer", "calcium_score"), "siemens", "series_folders", blank_gating=True),
    _Visit("P002", "baseline", 0, ("localizer", "calcium_score", "thin"), "ge", "flat"),
    _Visit("P003", "baseline", 5, ("calcium_score",), "philips", "dated"),
    _Visit("P004", "baseline", 40, ("localizer", "calcium_score"), "canon", "bare"),
    _Visit("P005", "baseline", 200, ("localizer", "calcium_score", "chest"), "siemens", "series_folders", blank_gating=True),
    _Visit("P006", "baseline", 900, ("localizer", "calcium_score", "low_kvp"), "ge", "dated"),
    _Visit("P007", "baseline", 30, ("calcium_score", "low_kvp"), "siemens", "bare", blank_gating=True),
    _Visit("P008", "baseline", 150, ("localizer", "calcium_score", "cta"), "philips", "series_folders"),
    _Visit("P009", "baseline", 120, ("localizer", "chest"), "canon", "flat"),
    _Visit("P010", "baseline", 50, ("localizer", "cta"), "ge", "series_folders"),
    _Visit("P011", "baseline", 5, ("calcium_score", "thin"), "siemens", "dated"),
    _Visit("P011", "year5", 60, ("localizer", "calcium_score"), "siemens", "dated"),
    _Visit("P012", "baseline", 600, ("localizer", "calcium_score", "chest"), "canon", "bare"),
)
_TINY_PLANS = (
    _Visit("P001", "baseline", 0, ("calcium_score",), "siemens", "series_folders"),
    _Visit("P002", "baseline", 40, ("localizer", "calcium_score", "thin"), "ge", "flat"),
    _Visit("P003", "baseline", 600, ("calcium_score", "chest"), "philips", "bare", blank_gating=True),
    _Visit("P004", "baseline", 50, ("localizer", "cta"), "canon", "dated"),
)
_PLANS = {"demo": _DEMO_PLANS, "tiny": _TINY_PLANS}

# Acquisition per series kind and cohort size; the scan of record is 'calcium_score'.
_ACQUISITIONS = {
    "demo": {
        "calcium_score": dict(rows=512, cols=512, slice_thickness_mm=3.0, slice_increment_mm=3.0),
        "low_kvp": dict(rows=512, cols=512, slice_thickness_mm=3.0, slice_increment_mm=3.0, kvp=100, noise_hu=30.0),
        "thin": dict(rows=256, cols=256, pixel_spacing_mm=0.78, slice_thickness_mm=1.0, slice_increment_mm=0.8, n_slices=64, noise_hu=35.0),
        "cta": dict(rows=256, cols=256, pixel_spacing_mm=0.78, slice_thickness_mm=0.75, slice_increment_mm=0.75, n_slices=80, contrast=True, noise_hu=30.0),
        "chest": dict(rows=512, cols=512, pixel_spacing_mm=0.74, slice_thickness_mm=5.0, slice_increment_mm=5.0, n_slices=40, gated=False, fov_centre="body", noise_hu=15.0),
    },
    "tiny": {
        "calcium_score": dict(rows=256, cols=256, pixel_spacing_mm=0.78, slice_thickness_mm=3.0, slice_increment_mm=3.0),
        "low_kvp": dict(rows=256, cols=256, pixel_spacing_mm=0.78, kvp=100, noise_hu=30.0),
        "thin": dict(rows=256, cols=256, pixel_spacing_mm=0.78, slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=24, noise_hu=35.0),
        "cta": dict(rows=256, cols=256, pixel_spacing_mm=0.78, slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=32, contrast=True, noise_hu=30.0),
        "chest": dict(rows=256, cols=256, pixel_spacing_mm=1.5, slice_thickness_mm=5.0, slice_increment_mm=5.0, n_slices=30, gated=False, fov_centre="body", noise_hu=15.0),
    },
}
# Localizer: a coarse whole-chest render projected front to back (and sideways).
_LOCALIZER = dict(rows=128, cols=128, pixel_spacing_mm=3.9, slice_thickness_mm=2.0, slice_increment_mm=2.0, n_slices=180, fov_centre="body", noise_hu=5.0)

_GIVEN = ("JANE", "JOHN", "MARIA", "WEI", "AMIR", "FATIMA", "OLGA", "PEDRO", "AIKO", "KWAME", "INGRID", "RAVI")
_FAMILY = ("DOE", "MILLER", "GARCIA", "CHEN", "KHAN", "OKAFOR", "IVANOVA", "SILVA", "TANAKA", "MENSAH", "BERG", "PATEL")


def _identifiers(participant_rng: np.random.Generator, visit_rng: np.random.Generator, plan: _Visit) -> dict:
    """Realistic fake identifiers: the person's are stable across visits, the study's are not."""
    index = int(plan.participant.strip("P") or 0)
    birth = 1940 + int(participant_rng.integers(0, 35))
    person = {
        "PatientName": f"{_FAMILY[index % len(_FAMILY)]}^{_GIVEN[(index * 7) % len(_GIVEN)]}",
        "PatientID": f"MRN{int(participant_rng.integers(10**6, 10**7))}",
        "PatientBirthDate": f"{birth}{int(participant_rng.integers(1, 13)):02d}{int(participant_rng.integers(1, 29)):02d}",
        "PatientSex": "F" if index % 2 else "M",
    }
    year = 2014 + int(participant_rng.integers(0, 5)) + (0 if plan.visit == "baseline" else 5)
    date = f"{year}{int(visit_rng.integers(1, 13)):02d}{int(visit_rng.integers(1, 29)):02d}"
    return {
        **person,
        "PatientAge": f"{year - birth:03d}Y",
        "AccessionNumber": f"A{date}{int(visit_rng.integers(100, 999))}",
        "StudyID": str(int(visit_rng.integers(1000, 9999))),
        "StudyDate": date,
        "StudyTime": f"{int(visit_rng.integers(7, 18)):02d}{int(visit_rng.integers(0, 60)):02d}{int(visit_rng.integers(0, 60)):02d}",
    }


def _series_folder(visit_dir: Path, plan: _Visit, number: int, kind: str, uids: dict, study_date: str) -> tuple[Path, str]:
    """Where a series' files go and how they are named, per the visit's layout."""
    if plan.layout == "flat":
        return visit_dir, "IM"
    if plan.layout == "series_folders":
        return visit_dir / f"{number:03d}_{kind}", "IM"
    study, series = (re.sub(r"\D", "", uids[k])[-8:] for k in ("study", "series"))
    if plan.layout == "dated":
        return visit_dir / study_date[:4] / study_date[4:6] / study_date[6:] / series, "uid"
    return visit_dir / "DICOM" / f"ST{study}" / f"SE{series}", "bare"


def _nifti(labels: np.ndarray, phantom: Phantom) -> nib.Nifti1Image:
    """Canonical [z, y, x] labels as NIfTI (array [x, y, z]) with the DICOM geometry in RAS.

    DICOM LPS (x0 + i*col, y0 + j*row, z_k) is RAS (-x, -y, z); loading back:
    ``np.asarray(img.dataobj).transpose(2, 1, 0)`` is the canonical array.
    """
    x0, y0 = phantom.origin_xy_mm
    increment, row, col = phantom.spacing_mm
    affine = np.diag([-col, -row, increment, 1.0])
    affine[:3, 3] = (-x0, -y0, float(phantom.z_positions_mm[0]))
    image = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def _visit_seed(seed: int, participant: str) -> int:
    return int(np.random.SeedSequence([seed, int(participant.strip("P") or 0)]).generate_state(1)[0])


@dataclass(frozen=True)
class _VisitDraws:
    """What a visit draws before any series is imaged, in the order it draws them."""

    patient_seed: int  # the same patient at every visit
    rng: np.random.Generator  # the visit's own stream, for what is drawn after
    identifiers: dict
    heart_rate: int
    pixel_spacing: float  # the zoomed cardiac field of view varies by patient


def _draw_visit(plan: _Visit, seed: int, planted: dict | None = None) -> _VisitDraws:
    patient_seed = _visit_seed(seed, plan.participant)
    rng = np.random.default_rng([patient_seed, sum(map(ord, plan.visit))])
    identifiers = _identifiers(np.random.default_rng([patient_seed, 0]), rng, plan)
    identifiers.update({k: str(v).format(participant=plan.participant, visit=plan.visit) for k, v in (planted or {}).items()})
    heart_rate = int(rng.integers(52, 78))
    pixel_spacing = round(float(rng.uniform(0.33, 0.45)), 3)
    return _VisitDraws(patient_seed, rng, identifiers, heart_rate, pixel_spacing)


def _series_settings(plan: _Visit, size: str, pixel_spacing: float, kind: str, number: int, lesion_seed: int) -> PhantomSettings:
    patient = PhantomSettings(target_agatston=plan.target) if plan.target > 0 else PhantomSettings(n_coronary_lesions=0)
    overrides = dict(_LOCALIZER if kind == "localizer" else _ACQUISITIONS[size][kind])
    if kind in ("calcium_score", "low_kvp") and size == "demo":
        overrides["pixel_spacing_mm"] = pixel_spacing
    if kind == "calcium_score" and plan.vendor == "ge":
        overrides.update(slice_thickness_mm=2.5, slice_increment_mm=2.5)  # SmartScore habit
    return replace(patient, acquisition_seed=number, lesion_seed=lesion_seed, **overrides)


def _image_scan_of_record(plan: _Visit, size: str, draws: _VisitDraws) -> tuple[str | None, int, Phantom | None]:
    """The series the reference scores (gated calcium score, else the chest scan, else
    none): its kind, the lesion plan it needed and its phantom."""
    scored_kind = "calcium_score" if "calcium_score" in plan.kinds else "chest" if "chest" in plan.kinds else None
    if scored_kind is None:
        return None, 0, None
    number = plan.kinds.index(scored_kind) + 1
    # Lesion plans aim at the target by construction; should the scan of record still
    # land outside the target's risk category, draw another plan for the same anatomy.
    tries = 5 if scored_kind == "calcium_score" else 1
    for lesion_seed in range(tries):
        settings = _series_settings(plan, size, draws.pixel_spacing, scored_kind, number, lesion_seed)
        phantom = generate_phantom(draws.patient_seed, settings)
        if risk_category(phantom.reference["agatston_total"]) == risk_category(plan.target):
            break
    return scored_kind, lesion_seed, phantom


def scan_of_record(plan: _Visit, seed: int, size: str = "demo") -> tuple[str, Phantom] | None:
    """The kind and phantom of one visit's scan of record (None when it has none),
    exactly as ``generate_cohort`` images it, without writing anything: for analyses
    that need what a cohort's DICOM does not hold (the coronary tubes, the noise).
    ``plan`` is one of ``visit_plans(n_participants, size, seed)``."""
    kind, _, phantom = _image_scan_of_record(plan, size, _draw_visit(plan, seed))
    return None if phantom is None else (kind, phantom)


def _generate_visit(args) -> dict:
    """Write one visit's DICOM series and ground truth; return its table rows."""
    out_dir, plan, seed, size, planted = args
    draws = _draw_visit(plan, seed, planted)
    rng, identifiers = draws.rng, draws.identifiers
    visit_dir = out_dir / "dicom" / plan.participant / plan.visit
    study_uid = uid("cacflow-synth", seed, plan.participant, plan.visit)
    scored_kind, lesion_seed, scored_phantom = _image_scan_of_record(plan, size, draws)

    series_rows, scored = [], None
    for number, kind in enumerate(plan.kinds, start=1):
        settings = _series_settings(plan, size, draws.pixel_spacing, kind, number, lesion_seed)
        phantom = scored_phantom if kind == scored_kind else generate_phantom(draws.patient_seed, settings)
        uids = {"study": study_uid, "series": uid(study_uid, number)}
        folder, naming = _series_folder(visit_dir, plan, number, kind, uids, identifiers["StudyDate"])
        source = phantom
        if kind == "localizer":
            views = ["frontal", "lateral"][: 1 + int(rng.integers(0, 2))]
            stacks = [localizer_from_phantom(phantom, view) for view in views]
            source = replace(stacks[0], hu=np.concatenate([s.hu for s in stacks]), positions_mm=np.concatenate([s.positions_mm for s in stacks]))
        gated = kind in ("calcium_score", "thin", "low_kvp", "cta")
        paths = write_series(
            source, folder, series_kind=kind, uids=uids, tags=identifiers,
            vendor=plan.vendor, series_number=number, naming=naming,
            acquisition={"kvp": settings.kvp, "gated": gated, "contrast": settings.contrast,
                         "blank_gating": plan.blank_gating, "heart_rate": draws.heart_rate},
        )
        series_rows.append({
            "participant_id": plan.participant, "visit": plan.visit, "series_instance_uid": uids["series"],
            "series_number": number, "series_kind": kind, "n_files": len(paths),
            "folder": str(folder.relative_to(out_dir)),
        })
        if kind == scored_kind:
            scored = (phantom, uids["series"])
    return _write_truth(out_dir, plan, scored, scored_kind, series_rows)


def _write_truth(out_dir: Path, plan: _Visit, scored, scored_kind, series_rows) -> dict:
    truth_dir = out_dir / "ground_truth" / f"{plan.participant}_{plan.visit}"
    truth_dir.mkdir(parents=True, exist_ok=True)
    status = {"calcium_score": "scored", "chest": "scored_nongated", None: "not_scorable"}[scored_kind]
    reference_row = {c: "" for c in REFERENCE_COLUMNS}
    reference_row.update(participant_id=plan.participant, visit=plan.visit, expected_status=status)
    lesion_rows, truth = [], {"participant_id": plan.participant, "visit": plan.visit, "expected_status": status, "series": series_rows}
    if scored is not None:
        phantom, series_uid = scored
        nib.save(_nifti(phantom.coronary_labels, phantom), truth_dir / "labels.nii.gz")
        nib.save(_nifti(phantom.vessel_labels, phantom), truth_dir / "vessels.nii.gz")
        meta = phantom.metadata
        reference_row.update(
            series_instance_uid=series_uid, series_kind=scored_kind, gated=meta["gated"],
            ecg_tags_blank=plan.blank_gating and meta["gated"], kvp=meta["kvp"],
            slice_thickness_mm=meta["slice_thickness_mm"], slice_increment_mm=meta["slice_increment_mm"],
            pixel_spacing_mm=meta["pixel_spacing_mm"], **{c: phantom.reference[c] for c in SCORE_COLUMNS},
            noncoronary_calcium=noncoronary_calcium(phantom),
            **{c: phantom.reference[c] for c in IMAGE_REFERENCE_KEYS},
        )
        for lesion in phantom.lesions:
            z, y, x = lesion["centre_zyx_mm"]
            lesion_rows.append({
                "participant_id": plan.participant, "visit": plan.visit, "lesion_id": lesion["lesion_id"],
                "vessel": lesion["vessel"], "z_mm": z, "y_mm": y, "x_mm": x,
                **{f"semi_axis_{i + 1}_mm": s for i, s in enumerate(lesion["semi_axes_mm"])},
                "density_hu": lesion["density_hu"], "distance_from_ostium_mm": lesion["distance_from_ostium_mm"],
                "n_slices": len(lesion["slices"]), "agatston": lesion["agatston"], "volume_mm3": lesion["volume_mm3"],
                "n_voxels": lesion["n_voxels"],
            })
        truth.update(series_instance_uid=series_uid, reference=phantom.reference, lesions=phantom.lesions,
                     distractors=phantom.distractors, metadata=meta)
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=1, default=float))
    return {"reference": reference_row, "lesions": lesion_rows, "series": series_rows}


def noncoronary_calcium(phantom: Phantom) -> str:
    """The kinds of non-coronary calcium visible in the scan (some voxels >= 130 HU),
    ';'-joined: the reference's record of what a model must not call coronary."""
    kinds = {d["kind"] for d in phantom.distractors
             if d["kind"] in NONCORONARY_CALCIUM_KINDS and d.get("agatston_if_scored", 0) > 0}
    return ";".join(sorted(kinds))


def _write_tsv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


_RANDOM_CATEGORY_SHARES = (0.3, 0.175, 0.175, 0.175, 0.175)  # RISK_CATEGORIES order: "0" first


def visit_plans(n_participants: int, size: str, seed: int) -> list[_Visit]:
    """The hand-made plans, then random participants beyond them: a quarter with a
    non-gated chest scan only (the non-gated stratum of an evaluation), and zero
    calcium more often than each other category (the zero-calcium scans, with bone
    and often aortic, valve or mitral calcium, test that nothing else is called coronary)."""
    fixed = _PLANS[size]
    participants = sorted({p.participant for p in fixed})
    plans = [p for p in fixed if p.participant in participants[:n_participants]]
    rng = np.random.default_rng([seed, 99])
    vendors, layouts = ("siemens", "ge", "philips", "canon"), ("flat", "series_folders", "dated", "bare")
    extras = ("localizer", "thin", "low_kvp", "cta", "chest")
    for index in range(len(participants) + 1, n_participants + 1):
        category = RISK_CATEGORIES[int(rng.choice(len(RISK_CATEGORIES), p=_RANDOM_CATEGORY_SHARES))]
        target = {"0": 0.0, "1-10": 5.0, "11-100": 40.0, "101-400": 200.0, ">400": 800.0}[category]
        if rng.random() < 0.25:
            kinds = ("localizer", "chest") if rng.random() < 0.5 else ("chest",)
        else:
            kinds = ("calcium_score", *sorted(rng.choice(extras, size=int(rng.integers(0, 3)), replace=False)))
        plans.append(_Visit(f"P{index:03d}", "baseline", target, kinds, str(rng.choice(vendors)), str(rng.choice(layouts))))
    return plans


def generate_cohort(
    out_dir: str | Path,
    n_participants: int | None = None,
    seed: int = 0,
    *,
    planted_identifiers: dict[str, str] | None = None,
    size: str = "demo",
    workers: int | None = None,
) -> Path:
    """Write a synthetic cohort under out_dir and return the manifest path.

    size: 'demo' (12 participants by default, every risk category, 512 x 512 gated
    series) or 'tiny' (4 participants, 256 x 256, for fast workflow tests).
    planted_identifiers: DICOM keyword -> value written into every file of every
    series ('{participant}' and '{visit}' are filled in), for leak tests.
    """
    if size not in _PLANS:
        raise ValueError(f"size must be one of {sorted(_PLANS)}, got {size!r}")
    n_participants = n_participants if n_participants is not None else len({p.participant for p in _PLANS[size]})
    if n_participants < 1:
        raise ValueError("n_participants must be at least 1")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_cohort_folder(out_dir, {
        "seed": seed, "participants": n_participants, "size": size,
        # A hash: the planted values are identifiers, and must not be written out.
        "planted_identifiers_sha256": hashlib.sha256(
            json.dumps(planted_identifiers or {}, sort_keys=True).encode()).hexdigest(),
    })
    plans = visit_plans(n_participants, size, seed)
    _check_disk_space(out_dir, n_participants, size)
    jobs = [(out_dir, plan, seed, size, planted_identifiers) for plan in plans]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_generate_visit, jobs))
    else:
        results = [_generate_visit(job) for job in jobs]

    references = [r["reference"] for r in results]
    if all(p in plans for p in _PLANS[size]):
        _check_categories(plans, references, size)
    truth_dir = out_dir / "ground_truth"
    _write_tsv(truth_dir / "reference_scores.tsv", REFERENCE_COLUMNS, references)
    _write_tsv(truth_dir / "lesions.tsv", LESION_COLUMNS, [row for r in results for row in r["lesions"]])
    _write_tsv(truth_dir / "series.tsv", SERIES_COLUMNS, [row for r in results for row in r["series"]])
    manifest = out_dir / "manifest.tsv"
    _write_tsv(
        manifest, MANIFEST_COLUMNS,
        [{"participant_id": p.participant, "visit": p.visit, "dicom_dir": str(out_dir / "dicom" / p.participant / p.visit)} for p in plans],
    )
    return manifest


# What one participant's DICOM series take at size 'demo': about 35 MB measured
# (cohort C: 14 GB for 400 participants), with room for the larger visits.
BYTES_PER_DEMO_PARTICIPANT = 40 * 2**20


def _check_disk_space(out_dir: Path, n_participants: int, size: str) -> None:
    """Refuse before writing a cohort the disk cannot hold; series already there (the
    same cohort written again) are overwritten, so they count as free."""
    if size != "demo":  # 'tiny' cohorts of the tests: a few MB
        return
    held = sum(f.stat().st_size for f in (out_dir / "dicom").rglob("*") if f.is_file())
    require_free_space(out_dir, max(0, n_participants * BYTES_PER_DEMO_PARTICIPANT - held),
                       f"{n_participants} participants' DICOM series",
                       "free some space, or generate fewer participants (config: evaluation: participants "
                       "for snakemake evaluate, demo: participants for the demo)")


def _claim_cohort_folder(out_dir: Path, recipe: dict) -> None:
    """Record what the folder's cohort is (cohort.json), and refuse to write another
    cohort over DICOM already there: its series would sit beside the old cohort's in
    the same visit folders, the pipeline would pick either, and the ground truth would
    describe only the new one (wrong scores, silently). The same recipe again writes
    the same files, so it may."""
    record = out_dir / "cohort.json"
    dicom = out_dir / "dicom"
    held = json.loads(record.read_text()) if record.is_file() else None
    if dicom.is_dir() and any(dicom.iterdir()):
        if held != recipe:
            described = f"a cohort generated with {held}" if held else "DICOM from an earlier cohort (unrecorded)"
            raise ValueError(f"{out_dir} already holds {described}; a cohort with {recipe} would mix its series "
                             f"with those in {dicom}: write it into an empty folder, or delete that folder first")
    elif held is not None and held != recipe:
        # The old cohort's DICOM is gone (Snakemake deletes it before generating again);
        # its per-visit truth must go too, or visits the new cohort lacks would keep it.
        shutil.rmtree(out_dir / "ground_truth", ignore_errors=True)
    atomic_write_text(record, json.dumps(recipe) + "\n")


def _check_categories(plans: list[_Visit], references: list[dict], size: str) -> None:
    """The hand-made plans must land where they were aimed (gated scans of record)."""
    found = {}
    for plan, row in zip(plans, references):
        if row["expected_status"] != "scored":
            continue
        found[plan.participant, plan.visit] = row["risk_category"]
        if risk_category(plan.target) != row["risk_category"]:
            raise RuntimeError(f"{plan.participant} {plan.visit}: aimed at {plan.target}, scored {row['risk_category']}")
    categories = list(found.values())
    if size == "demo" and (set(categories) != set(RISK_CATEGORIES) or categories.count("0") < 2):
        raise RuntimeError(f"demo cohort does not cover every risk category: {sorted(categories)}")
