"""A second look, at full resolution, at the small calcium candidates the network
was not sure of.

The network classifies calcium on a 1.5 mm grid (``cacflow.model.preprocessing``).
At that scale a real 1-5 mm^2 speck on an artery and noise lifted over 130 HU beside
it look alike, and the network's misses on generated cohorts are such specks
(docs/evaluation.md). At full resolution they differ in ways a scan's noise level
explains: how far the candidate's peak and mean rise above 130 HU in units of the
scan's noise, whether the neighbouring slices show it too (a plaque spans slices,
noise does not), how bright its surroundings are.

The review is a logistic model over those features and the network's own coronary
share. It decides, in place of the share, for candidates smaller than
``max_area_mm2`` whose share is at least ``min_share``; every other candidate keeps
the network's decision. It is fitted on generated scans with the network it serves
(``cacflow.review_training.fit_candidate_review``) and stored with it in model.json
(``candidate_review``); a model without one keeps the network's decisions.

Tried and not adopted (docs/evaluation.md, "A second look at small candidates"): it
found more specks, and also called small calcification of unfamiliar kinds (lung
granulomas, costal cartilage, hilar nodes) coronary, as its features do not say where
a candidate lies. The shipped model has no review; this stays for reproducing that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FEATURES = ("logit_share", "log_area_mm2", "peak_over_noise", "adjacent_over_noise",
            "mean_over_noise", "log_noise_hu", "ring_over_noise")

# Soft tissue for the noise estimate: fat, muscle, blood and myocardium without contrast.
_SOFT_TISSUE_HU = (-100.0, 100.0)
_MIN_NOISE_HU = 5.0  # a floor: features divide by it
_SHARE_CLIP = 1e-4


def scan_noise_hu(hu: np.ndarray, step: int = 4) -> float:
    """The scan's noise (HU standard deviation) from every ``step``-th slice: the median
    absolute difference of horizontally neighbouring soft-tissue pixels, scaled to a
    standard deviation. Differences cancel anatomy that changes slowly; the median
    ignores edges."""
    sample = hu[::step].astype(np.float32, copy=False)
    left, right = sample[:, :, :-1], sample[:, :, 1:]
    low, high = _SOFT_TISSUE_HU
    soft = (left > low) & (left < high) & (right > low) & (right < high)
    differences = (right - left)[soft]
    if differences.size < 100:
        return _MIN_NOISE_HU
    mad = np.median(np.abs(differences - np.median(differences)))
    return max(float(1.4826 * mad / np.sqrt(2.0)), _MIN_NOISE_HU)


def candidates_to_review(share: np.ndarray, area_mm2: np.ndarray, min_share: float, max_area_mm2: float) -> np.ndarray:
    """Which candidates (by component number; 0, the background, never) a review with
    these bounds decides."""
    chosen = (share >= min_share) & (area_mm2 < max_area_mm2)
    chosen[0] = False
    return chosen


def candidate_features(hu: np.ndarray, components: np.ndarray, candidates: np.ndarray, share: np.ndarray,
                       pixel_area_mm2: float, noise_hu: float, threshold_hu: float = 130.0) -> np.ndarray:
    """``[len(candidates), len(FEATURES)]`` for the in-slice components ``candidates``
    (their numbers in ``components``); ``share[k]`` is component k's coronary share."""
    features = np.zeros((len(candidates), len(FEATURES)))
    if len(candidates) == 0:
        return features
    noise = max(noise_hu, _MIN_NOISE_HU)
    boxes = ndimage.find_objects(components)
    ring_structure = np.ones((3, 3), dtype=bool)
    for row, k in enumerate(candidates):
        z_slice, y_slice, x_slice = boxes[k - 1]
        z = z_slice.start
        # One pixel of margin around the component's box, for its ring and neighbours.
        rows = slice(max(y_slice.start - 1, 0), y_slice.stop + 1)
        cols = slice(max(x_slice.start - 1, 0), x_slice.stop + 1)
        inside = components[z, rows, cols] == k
        grown = ndimage.binary_dilation(inside, ring_structure)
        ring = grown & ~inside
        values = hu[z, rows, cols][inside]
        adjacent = [float(hu[z + dz, rows, cols][grown].max()) for dz in (-1, 1) if 0 <= z + dz < hu.shape[0]]
        ring_mean = float(hu[z, rows, cols][ring].mean()) if ring.any() else float(values.mean())
        s = float(np.clip(share[k], _SHARE_CLIP, 1 - _SHARE_CLIP))
        features[row] = (
            np.log(s / (1 - s)),
            np.log(inside.sum() * pixel_area_mm2),
            (float(values.max()) - threshold_hu) / noise,
            ((max(adjacent) if adjacent else ring_mean) - ring_mean) / noise,
            (float(values.mean()) - threshold_hu) / noise,
            np.log(noise),
            ring_mean / noise,
        )
    return features


@dataclass(frozen=True)
class CandidateReview:
    """Logistic model: P(coronary) = sigmoid(intercept + sum(weights * (x - mean) / scale))."""

    intercept: float
    weights: tuple[float, ...]
    feature_mean: tuple[float, ...]
    feature_scale: tuple[float, ...]
    min_share: float = 0.01
    max_area_mm2: float = 10.0

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = (features - np.asarray(self.feature_mean)) / np.asarray(self.feature_scale)
        return 1.0 / (1.0 + np.exp(-(self.intercept + z @ np.asarray(self.weights))))

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "intercept": self.intercept, "weights": list(self.weights),
                "feature_mean": list(self.feature_mean), "feature_scale": list(self.feature_scale),
                "min_share": self.min_share, "max_area_mm2": self.max_area_mm2}

    @classmethod
    def from_dict(cls, record: dict) -> "CandidateReview":
        if list(record["features"]) != list(FEATURES):
            raise ValueError(f"candidate review was fitted on features {record['features']}, "
                             f"this cacflow computes {list(FEATURES)}: refit it (cacflow.review_training.fit_candidate_review)")
        return cls(float(record["intercept"]), tuple(map(float, record["weights"])),
                   tuple(map(float, record["feature_mean"])), tuple(map(float, record["feature_scale"])),
                   float(record["min_share"]), float(record["max_area_mm2"]))


def fit_logistic(features: np.ndarray, coronary: np.ndarray, l2: float = 1e-2, iterations: int = 50,
                 min_share: float = 0.01, max_area_mm2: float = 10.0) -> CandidateReview:
    """Maximum-likelihood logistic regression (Newton's method, a light L2 penalty that
    keeps it finite when the classes separate) on standardised features."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-9
    design = np.column_stack([np.ones(len(features)), (features - mean) / scale])
    target = coronary.astype(float)
    beta = np.zeros(design.shape[1])
    penalty = l2 * np.diag(np.r_[0.0, np.ones(design.shape[1] - 1)])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (p - target) + penalty @ beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return CandidateReview(float(beta[0]), tuple(map(float, beta[1:])), tuple(map(float, mean)),
                           tuple(map(float, scale)), min_share, max_area_mm2)
