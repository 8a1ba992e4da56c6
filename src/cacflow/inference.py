"""Per-vessel coronary calcium labels for a CT volume.

Candidates are the full-resolution calcium components (voxels >= threshold,
8-connected within each axial slice). The network classifies every coarse pixel
holding calcium; each candidate is coronary when the vessels' summed probability
over its voxels outweighs "not coronary", and then takes the most probable vessel. Candidates voted "not coronary" stay 0, so the
scoring module sees only coronary calcium, with exact full-resolution extents.

A candidate whose coronary share of the vote lies in ``AMBIGUOUS_CORONARY_SHARE`` is
one the model was unsure about. ``flipped_labels`` holds the labels with every such
decision reversed, so scoring can say how far the score would move if a reader
disagreed with all of them (``cacflow.pipeline``: the scans table's Agatston range).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cacflow.candidate_review import CandidateReview, candidate_features, scan_noise_hu
from cacflow.model.engines import Engine
from cacflow.model.network import N_CLASSES
from cacflow.model.preprocessing import network_inputs

# 8-connectivity inside a slice, no connection across slices (Agatston lesions are 2-D).
IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_8_CONNECTED[1] = True

# Coronary share of a candidate's vote (vessels' summed probability over all classes')
# within which the decision counts as unsure: the model gave the other answer at least
# a 10 % chance. Chosen on the 60 validation phantoms (docs/evaluation.md): the
# narrowest of the bands tried (0.4-0.6 ... 0.1-0.9) whose range held the true risk
# category of both wrongly categorised scans; the narrower ones held neither.
AMBIGUOUS_CORONARY_SHARE = (0.1, 0.9)

# Slices per engine call (the int8 graph's activation ranges are calibrated on such batches).
BATCH_SLICES = 16


@dataclass
class Segmentation:
    labels: np.ndarray  # uint8 [z, y, x]: 0 bg, 1 LM, 2 LAD, 3 LCX, 4 RCA
    flipped_labels: np.ndarray  # labels with each unsure candidate's decision reversed
    n_candidates: int
    n_coronary: int
    n_ambiguous: int  # candidates with an unsure coronary / not-coronary decision
    seconds_preprocess: float
    seconds_engine: float
    seconds_postprocess: float


class CalciumSegmenter:
    """Holds one engine; call ``segment`` for each scan."""

    def __init__(self, engine: Engine, threshold_hu: float = 130.0, batch_slices: int = BATCH_SLICES,
                 review: CandidateReview | None = None):
        self.engine = engine
        self.threshold_hu = threshold_hu
        self.batch_slices = batch_slices
        self.review = review  # the model's second look at small candidates (cacflow.candidate_review)

    def segment(self, hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> Segmentation:
        t0 = time.perf_counter()
        inputs, grid = network_inputs(hu, spacing_mm, self.threshold_hu)
        t1 = time.perf_counter()
        logits = engine_logits(self.engine, inputs, self.batch_slices)
        t2 = time.perf_counter()
        labels, flipped, n_candidates, n_coronary, n_ambiguous = assign_candidates(
            hu, logits, grid, self.threshold_hu, review=self.review, pixel_area_mm2=spacing_mm[1] * spacing_mm[2])
        t3 = time.perf_counter()
        return Segmentation(labels, flipped, n_candidates, n_coronary, n_ambiguous, t1 - t0, t2 - t1, t3 - t2)


def engine_logits(engine, inputs: np.ndarray, batch_slices: int = BATCH_SLICES) -> np.ndarray:
    """``engine`` (inputs [n, C, H, W] -> logits) run over every slice of ``inputs``,
    ``batch_slices`` slices per call, as the int8 graph was calibrated."""
    return np.concatenate([engine(inputs[i : i + batch_slices]) for i in range(0, len(inputs), batch_slices)])


def assign_candidates(hu: np.ndarray, logits: np.ndarray, grid, threshold_hu: float,
                      ambiguous_share: tuple[float, float] = AMBIGUOUS_CORONARY_SHARE,
                      review: CandidateReview | None = None, pixel_area_mm2: float | None = None):
    """Label each calcium candidate with its most probable class (summed over voxels),
    from the engine's logits ``[z, N_CLASSES, padded_height, padded_width]``. With a
    ``review`` (needs ``pixel_area_mm2``), the small candidates it covers are coronary
    when its probability is at least 0.5, in place of the network's share.

    Returns (labels, flipped_labels, n_candidates, n_coronary, n_ambiguous)."""
    calcium = hu >= threshold_hu
    components, n_candidates = ndimage.label(calcium, structure=IN_PLANE_8_CONNECTED)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if n_candidates == 0:
        return labels, labels.copy(), 0, 0, 0
    # The same voxels in the same order as np.nonzero(components), from a flat scan of
    # the 1-byte mask rather than the 4-byte labels.
    voxels = np.flatnonzero(calcium)
    component_of_voxel = components.ravel()[voxels]
    z, y, x = np.unravel_index(voxels, hu.shape)
    voxel_probabilities = calcium_cell_probabilities(logits, grid, z, y, x)
    votes = np.stack(
        [np.bincount(component_of_voxel, weights=voxel_probabilities[:, c], minlength=n_candidates + 1)
         for c in range(N_CLASSES)],
        axis=1,
    )
    # First coronary or not (the vessels' probabilities summed), then which vessel:
    # a candidate split between two arteries is still coronary. On generated
    # validation scans this beat a plain 5-way argmax (93 % vs 92 % risk-category
    # agreement; docs/evaluation.md).
    coronary_votes = votes[:, 1:].sum(axis=1)
    coronary = coronary_votes >= votes[:, 0]
    vessel = (votes[:, 1:].argmax(axis=1) + 1).astype(np.uint8)
    component_class = np.where(coronary, vessel, 0).astype(np.uint8)
    component_class[0] = 0
    share = coronary_votes / np.maximum(votes.sum(axis=1), 1e-12)
    if review is not None:
        share = reviewed_share(hu, components, component_of_voxel, share, review, pixel_area_mm2, threshold_hu)
        coronary = share >= 0.5
        component_class = np.where(coronary, vessel, 0).astype(np.uint8)
        component_class[0] = 0
    ambiguous = (share >= ambiguous_share[0]) & (share < ambiguous_share[1])
    ambiguous[0] = False
    flipped_class = np.where(ambiguous, np.where(coronary, 0, vessel), component_class).astype(np.uint8)
    labels[z, y, x] = component_class[component_of_voxel]
    flipped = np.zeros_like(labels)
    flipped[z, y, x] = flipped_class[component_of_voxel]
    return labels, flipped, n_candidates, int((component_class[1:] > 0).sum()), int(ambiguous.sum())


def reviewed_share(hu, components, component_of_voxel, share, review: CandidateReview, pixel_area_mm2: float,
                   threshold_hu: float) -> np.ndarray:
    """``share`` with the review's probability in place for the candidates it decides."""
    area_mm2 = np.bincount(component_of_voxel, minlength=len(share)) * pixel_area_mm2
    chosen = np.flatnonzero(review.reviewed(share, area_mm2))
    if len(chosen) == 0:
        return share
    features = candidate_features(hu, components, chosen, share, pixel_area_mm2, scan_noise_hu(hu), threshold_hu)
    decided = share.copy()
    decided[chosen] = review.probability(features)
    return decided


def calcium_cell_probabilities(logits: np.ndarray, grid, z, y, x) -> np.ndarray:
    """Class probabilities ``[len(z), N_CLASSES]`` of the coarse cells holding the
    voxels (z, y, x). The softmax runs on those cells only, a few percent of the grid:
    over the whole grid it took most of the vote's time (README, Performance)."""
    slice_cells = grid.padded_height * grid.padded_width
    coarse_cell = z * slice_cells + grid.row_index[y] * grid.padded_width + grid.col_index[x]
    needed = np.zeros(len(logits) * slice_cells, dtype=bool)
    needed[coarse_cell] = True
    cells = np.flatnonzero(needed)
    slot = np.empty(needed.size, dtype=np.int64)
    slot[cells] = np.arange(len(cells))
    per_cell = logits.reshape(len(logits), N_CLASSES, slice_cells)[cells // slice_cells, :, cells % slice_cells]
    return softmax(per_cell, axis=1)[slot[coarse_cell]]


def softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)
