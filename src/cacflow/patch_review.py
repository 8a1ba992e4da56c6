"""A second look at small calcium candidates through a small network that sees each
one at fine pixels, with its surroundings and the coarse network's sense of place.

The coarse network (``cacflow.model.network``) decides on a 1.5 mm grid, where a
1-5 mm^2 speck on an artery and noise lifted over 130 HU look alike. The logistic
review (``cacflow.candidate_review``) told them apart from full-resolution numbers,
but it could not see where a candidate lies, and called small calcification of
kinds the training never shows coronary (docs/evaluation.md). This review sees a
38 mm square around the candidate at 0.6 mm pixels: the slice and its neighbours,
the candidate itself, its height above 130 HU in units of the scan's noise, and the
coarse network's coronary probability over the same square.

It decides, in place of the coarse network's share, for candidates smaller than
``max_area_mm2`` whose share is at least ``min_share``. It is fitted on generated
scans with the network it serves (``cacflow.review_training.fit_patch_review``) and
stored beside it (``patch_review.pt``, model.json ``patch_review``); a model without
one keeps the network's decisions.

Tried and not adopted (docs/evaluation.md, "A second look with fine pixels and a
sense of place"): it found more specks with fewer false positives than the network,
and called some calcified breast arteries and hilar nodes coronary. Neither a 144 mm
wide view (``context_patches``) nor, then, fitting on those kinds as well lifted it over
the unfamiliar-calcium gate. The shipped model has none; this stays for reproducing
that and as the base of the next attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from cacflow.candidate_review import candidates_to_review, scan_noise_hu
from cacflow.tables import SCAN_TYPE_VALUES

PATCH_PIXELS = 64
PATCH_SPACING_MM = 0.6
N_PATCH_CHANNELS = 8
# The optional wide view: 144 mm around the candidate (heart, chest wall, airways), where
# a calcified breast artery in chest-wall fat and a plaque in epicardial fat differ.
CONTEXT_PIXELS = 64
CONTEXT_SPACING_MM = 2.25
N_CONTEXT_CHANNELS = 3  # soft-tissue window, wide window (both smoothed to 2.25 mm), coarse coronary map
N_SCALARS = 3  # share logit, log area (mm^2), log noise (HU)
_SHARE_CLIP = 1e-4


def checked_scan_types(scan_types) -> tuple[str, ...]:
    """``scan_types`` as a tuple in ``SCAN_TYPE_VALUES`` order; refuses unknown or no types."""
    unknown = set(scan_types) - set(SCAN_TYPE_VALUES)
    if unknown or not scan_types:
        raise ValueError(f"scan types must be some of {SCAN_TYPE_VALUES}, not {list(scan_types)}")
    return tuple(t for t in SCAN_TYPE_VALUES if t in scan_types)


def coronary_probability_slice(logits_slice: np.ndarray) -> np.ndarray:
    """1 - P(not coronary) on the coarse grid of one slice (``[N_CLASSES, H, W]``)."""
    shifted = logits_slice - logits_slice.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    return 1.0 - exp[0] / exp.sum(axis=0)


def _sampling_points(components: np.ndarray, candidates: np.ndarray, spacing_mm, pixels: int, pixel_mm: float):
    """For each candidate: (its slice, the in-slice sample positions ``rr``, ``cc`` of a
    ``pixels`` x ``pixels`` square of ``pixel_mm`` pixels centred on its centroid, in
    voxel units, and their nearest voxels clipped to the slice)."""
    boxes = ndimage.find_objects(components)
    offsets = (np.arange(pixels) - (pixels - 1) / 2.0) * pixel_mm
    n_rows, n_cols = components.shape[1], components.shape[2]
    for k in candidates:
        z_slice, y_slice, x_slice = boxes[k - 1]
        z = z_slice.start
        ys, xs = np.nonzero(components[z, y_slice, x_slice] == k)
        cy, cx = ys.mean() + y_slice.start, xs.mean() + x_slice.start
        rr, cc = np.meshgrid(cy + offsets / spacing_mm[1], cx + offsets / spacing_mm[2], indexing="ij")
        nearest_r = np.clip(np.rint(rr), 0, n_rows - 1).astype(np.int64)
        nearest_c = np.clip(np.rint(cc), 0, n_cols - 1).astype(np.int64)
        yield z, rr, cc, nearest_r, nearest_c


def candidate_patches(hu: np.ndarray, components: np.ndarray, candidates: np.ndarray, logits: np.ndarray, grid,
                      spacing_mm, noise_hu: float, threshold_hu: float = 130.0, pixels: int = PATCH_PIXELS):
    """``[len(candidates), N_PATCH_CHANNELS, pixels, pixels]`` float32 patches centred
    on each in-slice component of ``candidates`` (numbers in ``components``)."""
    out = np.zeros((len(candidates), N_PATCH_CHANNELS, pixels, pixels), dtype=np.float32)
    if len(candidates) == 0:
        return out
    probability_of_slice = {}
    points = _sampling_points(components, candidates, spacing_mm, pixels, PATCH_SPACING_MM)
    for row, (k, (z, rr, cc, nearest_r, nearest_c)) in enumerate(zip(candidates, points)):
        coordinates = np.stack([rr.ravel(), cc.ravel()])
        for channel, dz in enumerate((-1, 0, 1)):
            zz = min(max(z + dz, 0), hu.shape[0] - 1)
            values = ndimage.map_coordinates(hu[zz], coordinates, order=1, mode="nearest").reshape(pixels, pixels)
            out[row, channel] = (np.clip(values, -200.0, 300.0) - 50.0) / 250.0
            if dz == 0:
                out[row, 3] = np.clip(values, -1000.0, 1000.0) / 1000.0
        excess = (hu[z][nearest_r, nearest_c].astype(np.float32) - threshold_hu) / noise_hu
        out[row, 4] = np.clip(excess, -5.0, 20.0) / 10.0
        out[row, 5] = components[z][nearest_r, nearest_c] == k
        if z not in probability_of_slice:
            probability_of_slice[z] = coronary_probability_slice(logits[z])
        out[row, 6] = probability_of_slice[z][grid.row_index[nearest_r], grid.col_index[nearest_c]]
        out[row, 7] = np.log(noise_hu) / 4.0
    return out


def context_patches(hu: np.ndarray, components: np.ndarray, candidates: np.ndarray, logits: np.ndarray, grid,
                    spacing_mm, pixels: int = CONTEXT_PIXELS) -> np.ndarray:
    """``[len(candidates), N_CONTEXT_CHANNELS, pixels, pixels]`` float32 wide views
    (``CONTEXT_SPACING_MM`` pixels) centred where ``candidate_patches`` centres its
    patches. The slice is box-smoothed to the view's pixel first, so that the view
    shows tissue rather than aliased noise; outside the scan the windows read -1 and
    the coronary map 0."""
    out = np.zeros((len(candidates), N_CONTEXT_CHANNELS, pixels, pixels), dtype=np.float32)
    if len(candidates) == 0:
        return out
    n_rows, n_cols = hu.shape[1], hu.shape[2]
    box = (max(1, round(CONTEXT_SPACING_MM / spacing_mm[1])), max(1, round(CONTEXT_SPACING_MM / spacing_mm[2])))
    windows_of_slice, probability_of_slice = {}, {}
    points = _sampling_points(components, candidates, spacing_mm, pixels, CONTEXT_SPACING_MM)
    for row, (z, rr, cc, nearest_r, nearest_c) in enumerate(points):
        if z not in windows_of_slice:
            windows_of_slice[z] = (ndimage.uniform_filter(np.clip(hu[z], -200, 300).astype(np.float32), box),
                                   ndimage.uniform_filter(np.clip(hu[z], -1000, 1000).astype(np.float32), box))
            probability_of_slice[z] = coronary_probability_slice(logits[z])
        coordinates = np.stack([rr.ravel(), cc.ravel()])
        outside = (rr < 0) | (rr > n_rows - 1) | (cc < 0) | (cc > n_cols - 1)
        soft, wide = (ndimage.map_coordinates(w, coordinates, order=1, mode="nearest").reshape(rr.shape)
                      for w in windows_of_slice[z])
        out[row, 0] = np.where(outside, -1.0, (soft - 50.0) / 250.0)
        out[row, 1] = np.where(outside, -1.0, wide / 1000.0)
        out[row, 2] = np.where(outside, 0.0, probability_of_slice[z][grid.row_index[nearest_r], grid.col_index[nearest_c]])
    return out


def candidate_scalars(share: np.ndarray, area_mm2: np.ndarray, noise_hu: float) -> np.ndarray:
    s = np.clip(share, _SHARE_CLIP, 1 - _SHARE_CLIP)
    return np.column_stack([np.log(s / (1 - s)) / 5.0, np.log(area_mm2),
                            np.full(len(s), np.log(noise_hu))]).astype(np.float32)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _levels(c_in: int, widths) -> nn.Sequential:
    layers = []
    for level, width in enumerate(widths):
        if level:
            layers.append(nn.MaxPool2d(2))
        layers.append(_block(c_in, width))
        c_in = width
    return nn.Sequential(*layers)


def _pooled(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


class PatchNet(nn.Module):
    """Three conv levels (16-32-64) with poolings, global average and max pooling, and
    a small head that also sees the candidate's scalars: one logit, coronary or not.
    With ``context``, a second branch of the same shape reads the wide view
    (``context_patches``) and the head sees both."""

    def __init__(self, widths=(16, 32, 64), context: bool = False):
        super().__init__()
        self.features = _levels(N_PATCH_CHANNELS, widths)
        self.context = _levels(N_CONTEXT_CHANNELS, widths) if context else None
        pooled_width = 2 * widths[-1] * (2 if context else 1)
        self.head = nn.Sequential(nn.Linear(pooled_width + N_SCALARS, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

    @property
    def has_context(self) -> bool:
        return self.context is not None

    def forward(self, patches: torch.Tensor, scalars: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        pooled = [_pooled(self.features(patches))]
        if self.has_context:
            if context is None:
                raise ValueError("this patch review reads a wide view too: pass context_patches(...)")
            pooled.append(_pooled(self.context(context)))
        return self.head(torch.cat([*pooled, scalars], dim=1)).squeeze(1)


@dataclass
class PatchReview:
    network: PatchNet
    min_share: float = 0.01
    max_area_mm2: float = 5.0
    # The scan types (cacflow.qc) it decides on; on the others the network's calls
    # stand (where non-gated noise made the review call flecks coronary).
    scan_types: tuple[str, ...] = SCAN_TYPE_VALUES

    def __post_init__(self):
        self.scan_types = checked_scan_types(self.scan_types)

    def reviews(self, scan_type: str | None) -> bool:
        """Whether it decides on a scan of ``scan_type`` ("gated" / "nongated"). A review
        limited to some types needs to be told the type: guessing could apply it where
        it was never meant to decide."""
        if set(self.scan_types) == set(SCAN_TYPE_VALUES):
            return True
        if scan_type not in SCAN_TYPE_VALUES:
            raise ValueError(f"this patch review decides on {' and '.join(self.scan_types)} scans only; "
                             f"pass the scan's type (one of {SCAN_TYPE_VALUES}), not {scan_type!r}")
        return scan_type in self.scan_types

    def decide(self, hu, candidates, share: np.ndarray, area_mm2: np.ndarray, logits, grid, spacing_mm,
               threshold_hu: float = 130.0):
        """(component numbers it decides, their probability of being coronary), for a
        scan's ``candidates`` (``cacflow.inference.CandidateVotes``)."""
        chosen = np.flatnonzero(candidates_to_review(share, area_mm2, self.min_share, self.max_area_mm2))
        if len(chosen) == 0:
            return chosen, np.zeros(0)
        noise = scan_noise_hu(hu)
        patches = candidate_patches(hu, candidates.components, chosen, logits, grid, spacing_mm, noise, threshold_hu)
        context = (context_patches(hu, candidates.components, chosen, logits, grid, spacing_mm)
                   if self.network.has_context else None)
        return chosen, self.probability(patches, candidate_scalars(share[chosen], area_mm2[chosen], noise), context)

    def probability(self, patches: np.ndarray, scalars: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        if len(patches) == 0:
            return np.zeros(0)
        self.network.eval()
        with torch.no_grad():
            logits = self.network(torch.from_numpy(patches), torch.from_numpy(scalars),
                                  None if context is None else torch.from_numpy(context))
        return torch.sigmoid(logits).numpy().astype(float)
