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
from typing import TYPE_CHECKING
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from cacflow.candidate_review import FEATURES, CandidateReview, candidate_features, candidates_to_review, scan_noise_hu
from cacflow.model.engines import Engine
from cacflow.model.network import N_CLASSES
from cacflow.model.preprocessing import network_inputs

if TYPE_CHECKING:  # torch loads only when a model has a patch review
    from cacflow.patch_review import PatchReview

# 8-connectivity inside a slice, no connection across slices (Agatston lesions are 2-D).
IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_8_CONNECTED[1] = True

# Coronary share of a candidate's vote (vessels' summed probability over all classes')
# within which the decision counts as unsure: the model gave the other answer at least
# a 10 % chance. Chosen on the 60 validation phantoms (docs/evaluation.md): the
# narrowest of the bands tried (0.4-0.6 ... 0.1-0.9) whose range held the true risk
# category of both wrongly categorised scans; the narrower ones held neither.
AMBIGUOUS_CORONARY_SHARE = (0.1, 0.9)

# Slices per engine call.
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
                 review: CandidateReview | PatchReview | None = None,
                 revote_shifts: tuple[tuple[float, float], ...] = (), input_set: str = "standard"):
        self.engine = engine
        self.threshold_hu = threshold_hu
        self.batch_slices = batch_slices
        self.review = review  # the model's second look at small candidates (cacflow.candidate_review)
        self.revote_shifts = tuple(revote_shifts)  # grids unsure candidates are voted on again (cacflow.revote)
        self.input_set = input_set  # the channels the network was trained on (model.json input_set)

    @classmethod
    def for_model(cls, engine: Engine, model, threshold_hu: float = 130.0) -> "CalciumSegmenter":
        """The segmenter a model folder (``ModelFiles``) asks for: its review, if any, and
        its shifted-grid re-vote, if any, on the input channels it was trained on."""
        return cls(engine, threshold_hu=threshold_hu, review=model.candidate_review,
                   revote_shifts=model.unsure_revote_shifts, input_set=model.input_set)

    def segment(self, hu: np.ndarray, spacing_mm: tuple[float, float, float],
                scan_type: str | None = None) -> Segmentation:
        """``scan_type`` ("gated" / "nongated", cacflow.qc) is needed only by a review
        that decides on some scan types alone."""
        t0 = time.perf_counter()
        inputs, grid = network_inputs(hu, spacing_mm, self.threshold_hu, input_set=self.input_set)
        t1 = time.perf_counter()
        logits = engine_logits(self.engine, inputs, self.batch_slices)
        t2 = time.perf_counter()
        revote = None
        if self.revote_shifts:
            from cacflow.revote import revoted_votes

            def revote(candidates, chosen):
                return revoted_votes(hu, spacing_mm, candidates, chosen, self.engine, self.revote_shifts,
                                     self.threshold_hu, self.batch_slices, self.input_set)
        labels, flipped, n_candidates, n_coronary, n_ambiguous = assign_candidates(
            hu, logits, grid, self.threshold_hu, review=self.review, pixel_area_mm2=spacing_mm[1] * spacing_mm[2],
            spacing_mm=spacing_mm, scan_type=scan_type, revote=revote)
        t3 = time.perf_counter()
        return Segmentation(labels, flipped, n_candidates, n_coronary, n_ambiguous, t1 - t0, t2 - t1, t3 - t2)


def engine_logits(engine, inputs: np.ndarray, batch_slices: int = BATCH_SLICES) -> np.ndarray:
    """``engine`` (inputs [n, C, H, W] -> logits) run over every slice of ``inputs``,
    ``batch_slices`` slices per call."""
    return np.concatenate([engine(inputs[i : i + batch_slices]) for i in range(0, len(inputs), batch_slices)])


@dataclass
class CandidateVotes:
    """The in-slice calcium components of a scan and each one's summed class probabilities."""

    components: np.ndarray  # int32 [z, y, x]: component number of each voxel, 0 off calcium
    count: int
    of_voxel: np.ndarray  # component number of each calcium voxel, in np.nonzero order
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray]  # (z, y, x) of the calcium voxels
    votes: np.ndarray  # [count + 1, N_CLASSES]; row 0, the background, is all 0

    @property
    def coronary_share(self) -> np.ndarray:
        """The vessels' share of each component's summed probability."""
        return self.votes[:, 1:].sum(axis=1) / np.maximum(self.votes.sum(axis=1), 1e-12)

    def areas_mm2(self, pixel_area_mm2: float) -> np.ndarray:
        """Each component's in-slice area (row 0, the background, is 0)."""
        return np.bincount(self.of_voxel, minlength=self.count + 1) * pixel_area_mm2

    def holding(self, voxel_mask: np.ndarray) -> np.ndarray:
        """bool [count + 1]: which components hold at least one voxel of ``voxel_mask``
        (e.g. a phantom's coronary plaques: a candidate's truth for a review's fit)."""
        z, y, x = self.voxels
        return np.bincount(self.of_voxel, weights=voxel_mask[z, y, x], minlength=self.count + 1) > 0


def candidate_votes(hu: np.ndarray, logits: np.ndarray, grid, threshold_hu: float) -> CandidateVotes:
    """Sum the engine's class probabilities (logits ``[z, N_CLASSES, padded_height,
    padded_width]``) over each calcium candidate's voxels."""
    calcium = hu >= threshold_hu
    components, count = ndimage.label(calcium, structure=IN_PLANE_8_CONNECTED)
    if count == 0:
        empty = np.zeros(0, dtype=np.int64)
        return CandidateVotes(components, 0, empty, (empty, empty, empty), np.zeros((1, N_CLASSES)))
    # The same voxels in the same order as np.nonzero(components), from a flat scan of
    # the 1-byte mask rather than the 4-byte labels.
    flat = np.flatnonzero(calcium)
    of_voxel = components.ravel()[flat]
    z, y, x = np.unravel_index(flat, hu.shape)
    votes = summed_by_component(of_voxel, calcium_cell_probabilities(logits, grid, z, y, x), count + 1)
    return CandidateVotes(components, count, of_voxel, (z, y, x), votes)


def summed_by_component(component_of_voxel: np.ndarray, voxel_probabilities: np.ndarray, n_components: int):
    """Class probabilities ``[voxels, N_CLASSES]`` summed per component -> ``[n_components, N_CLASSES]``."""
    return np.stack([np.bincount(component_of_voxel, weights=voxel_probabilities[:, c], minlength=n_components)
                     for c in range(N_CLASSES)], axis=1)


def assign_candidates(hu: np.ndarray, logits: np.ndarray, grid, threshold_hu: float,
                      ambiguous_share: tuple[float, float] = AMBIGUOUS_CORONARY_SHARE,
                      review: CandidateReview | PatchReview | None = None, pixel_area_mm2: float | None = None,
                      spacing_mm: tuple[float, float, float] | None = None, scan_type: str | None = None,
                      revote=None):
    """Label each calcium candidate with its most probable class (summed over voxels),
    from the engine's logits ``[z, N_CLASSES, padded_height, padded_width]``. With
    ``revote`` (candidates, component numbers -> their summed probabilities;
    ``cacflow.revote``), the candidates whose share lies in ``ambiguous_share`` are
    voted again and decided, and flagged, by the new vote. With a
    ``review`` (needs ``pixel_area_mm2``; a ``PatchReview`` also ``spacing_mm``, and
    ``scan_type`` when it decides on some scan types only), the small candidates it
    covers are coronary when its probability is at least 0.5, in place of the
    network's share.

    Returns (labels, flipped_labels, n_candidates, n_coronary, n_ambiguous)."""
    candidates = candidate_votes(hu, logits, grid, threshold_hu)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if candidates.count == 0:
        return labels, labels.copy(), 0, 0, 0
    if revote is not None:
        share = candidates.coronary_share
        unsure = np.flatnonzero((share >= ambiguous_share[0]) & (share < ambiguous_share[1]))
        unsure = unsure[unsure > 0]
        if len(unsure):
            votes = candidates.votes.copy()
            votes[unsure] = revote(candidates, unsure)
            candidates = replace(candidates, votes=votes)
    votes = candidates.votes
    # First coronary or not (the vessels' probabilities summed), then which vessel:
    # a candidate split between two arteries is still coronary. On generated
    # validation scans this beat a plain 5-way argmax (93 % vs 92 % risk-category
    # agreement; docs/evaluation.md).
    coronary = votes[:, 1:].sum(axis=1) >= votes[:, 0]
    vessel = (votes[:, 1:].argmax(axis=1) + 1).astype(np.uint8)
    share = candidates.coronary_share
    if hasattr(review, "decide") and not review.reviews(scan_type):
        review = None  # a scan type the patch review does not decide on: the network's calls stand
    if hasattr(review, "decide"):  # a PatchReview looks at the scan itself
        area_mm2 = candidates.areas_mm2(pixel_area_mm2)
        chosen, probability = review.decide(hu, candidates, share, area_mm2, logits, grid, spacing_mm, threshold_hu)
        share = share.copy()
        share[chosen] = probability
        coronary = share >= 0.5
    elif review is not None:
        chosen, features = review_features(hu, candidates, share, pixel_area_mm2, review.min_share,
                                           review.max_area_mm2, threshold_hu)
        share = share.copy()
        share[chosen] = review.probability(features)
        coronary = share >= 0.5
    component_class = np.where(coronary, vessel, 0).astype(np.uint8)
    component_class[0] = 0
    ambiguous = (share >= ambiguous_share[0]) & (share < ambiguous_share[1])
    ambiguous[0] = False
    flipped_class = np.where(ambiguous, np.where(coronary, 0, vessel), component_class).astype(np.uint8)
    z, y, x = candidates.voxels
    labels[z, y, x] = component_class[candidates.of_voxel]
    flipped = np.zeros_like(labels)
    flipped[z, y, x] = flipped_class[candidates.of_voxel]
    return labels, flipped, candidates.count, int((component_class[1:] > 0).sum()), int(ambiguous.sum())


def review_features(hu: np.ndarray, candidates: CandidateVotes, share: np.ndarray, pixel_area_mm2: float,
                    min_share: float, max_area_mm2: float, threshold_hu: float):
    """(component numbers, their features) of the candidates a review with these bounds
    decides (``cacflow.candidate_review``). The scan's noise is measured only when
    there is one."""
    area_mm2 = candidates.areas_mm2(pixel_area_mm2)
    chosen = np.flatnonzero(candidates_to_review(share, area_mm2, min_share, max_area_mm2))
    if len(chosen) == 0:
        return chosen, np.zeros((0, len(FEATURES)))
    return chosen, candidate_features(hu, candidates.components, chosen, share, pixel_area_mm2,
                                      scan_noise_hu(hu), threshold_hu)


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
