"""Fitting the candidate review (``cacflow.candidate_review``) on generated scans.

The review learns from the network it serves: each phantom goes through the model's
CPU engine, every small candidate the review would decide gets its features, and its
truth is whether any of its voxels belongs to a coronary plaque's rendering (the
generator's ``coronary_labels``; ``phantom.image_reference`` counts the same groups).

Phantoms come from two training streams of their own (seeds that no check and no
cohort uses), drawn as the training phantoms are: one with faint specks added
(``PhantomSettings.speck_lesions``), where the network's misses lie, and one without,
for the scans without coronary calcium and their noise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cacflow.atomic import atomic_write_text
from cacflow.candidate_review import CandidateReview, fit_logistic

log = logging.getLogger("cacflow.review_training")

REVIEW_SEED = 61_000_001  # streams REVIEW_SEED (with specks) and REVIEW_SEED + 1 (without)
REVIEW_PHANTOMS = (160, 100)  # with specks, without


def phantoms_for_review(seed: int = REVIEW_SEED, counts: tuple[int, int] = REVIEW_PHANTOMS):
    """The review's phantoms, in order: ``counts[0]`` from stream ``seed`` with specks,
    then ``counts[1]`` from stream ``seed + 1`` without."""
    from cacflow.training import training_phantom

    for stream, n, specks in ((seed, counts[0], True), (seed + 1, counts[1], False)):
        for index in range(n):
            yield training_phantom(stream, index, speck_lesions=specks)


def review_candidates(segmenter, phantom, min_share: float, max_area_mm2: float):
    """(features, coronary truth) of the candidates a review with these bounds decides."""
    from cacflow.inference import candidate_votes, engine_logits, review_features
    from cacflow.model.preprocessing import network_inputs

    hu, threshold = phantom.hu, segmenter.threshold_hu
    inputs, grid = network_inputs(hu, phantom.spacing_mm, threshold)
    candidates = candidate_votes(hu, engine_logits(segmenter.engine, inputs, segmenter.batch_slices), grid, threshold)
    pixel_area = phantom.spacing_mm[1] * phantom.spacing_mm[2]
    chosen, features = review_features(hu, candidates, candidates.coronary_share, pixel_area, min_share,
                                       max_area_mm2, threshold)
    z, y, x = candidates.voxels
    coronary = np.bincount(candidates.of_voxel, weights=phantom.coronary_labels[z, y, x] > 0,
                           minlength=candidates.count + 1) > 0
    return features, coronary[chosen]


def fit_candidate_review(model_dir: str | Path, seed: int = REVIEW_SEED, counts: tuple[int, int] = REVIEW_PHANTOMS,
                         workers: int = 2, min_share: float = 0.01, max_area_mm2: float = 10.0,
                         table: str | Path | None = None) -> CandidateReview:
    """Fit the review for the model in ``model_dir`` and record it in its model.json
    (``candidate_review``, with the phantoms it was fitted on). ``table``: also save
    every candidate's features and truth there (.npz), for analysis."""
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine

    model_dir = Path(model_dir)
    segmenter = CalciumSegmenter(create_engine("onnxruntime", ModelFiles(model_dir), threads=workers))
    features, truth, phantom_of = [], [], []
    for number, phantom in enumerate(phantoms_for_review(seed, counts)):
        f, t = review_candidates(segmenter, phantom, min_share, max_area_mm2)
        features.append(f)
        truth.append(t)
        phantom_of.append(np.full(len(t), number))
        log.info("review phantom %d/%d: %d candidates, %d coronary", number + 1, sum(counts), len(t), int(t.sum()))
    features, truth, phantom_of = np.concatenate(features), np.concatenate(truth), np.concatenate(phantom_of)
    if table is not None:
        np.savez(table, features=features, coronary=truth, phantom=phantom_of)
    if truth.all() or not truth.any():  # also when there are none
        raise ValueError(f"the candidate review needs coronary and other small candidates to learn from; "
                         f"{sum(counts)} phantoms gave {int(truth.sum())} and {int((~truth).sum())}: fit it on more")
    review = fit_logistic(features, truth, min_share=min_share, max_area_mm2=max_area_mm2)
    info_path = model_dir / "model.json"
    info = json.loads(info_path.read_text())
    info["candidate_review"] = {
        **review.to_dict(),
        "fitted_on": {"seed": seed, "phantoms_with_specks": counts[0], "phantoms_without": counts[1],
                      "engine": segmenter.engine.label, "candidates": int(len(truth)),
                      "coronary_candidates": int(truth.sum())},
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return review
