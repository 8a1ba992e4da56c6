"""A second vote on unsure candidates, through coarse grids shifted by part of a cell.

The network sees 1.5 mm cells (``cacflow.model.preprocessing``). A speck of 1-3 mm^2
that straddles a cell boundary is split over two to four cells, each holding a small
fraction of calcium, and the network is often unsure of it; on a grid shifted by half
a cell the same speck may fill one cell. For every candidate whose coronary share lies
in the unsure band (``cacflow.inference.AMBIGUOUS_CORONARY_SHARE``), the slices that
hold such candidates are run again on each shifted grid, and the candidate's summed
class probabilities are averaged over the normal grid and the shifted ones. Only those
slices run again, so a scan with no unsure candidate costs nothing more.

A model asks for it in model.json (``unsure_revote``, ``ModelFiles.unsure_revote_shifts``);
the shipped model does not (docs/evaluation.md, "Re-voting unsure calls on shifted grids").
"""

from __future__ import annotations

import numpy as np

from cacflow.inference import CandidateVotes, calcium_cell_probabilities, engine_logits, summed_by_component
from cacflow.model.preprocessing import network_inputs


def slice_runs(slices: np.ndarray, n_slices: int) -> list[tuple[int, int]]:
    """Half-open slab ranges [start, stop) that hold every slice of ``slices`` (sorted,
    unique) with its neighbours above and below (the network's through-plane context),
    merged where they touch, clipped to the volume."""
    runs: list[list[int]] = []
    for z in slices:
        start, stop = max(int(z) - 1, 0), min(int(z) + 2, n_slices)
        if runs and start <= runs[-1][1]:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    return [(start, stop) for start, stop in runs]


def shifted_inputs(hu: np.ndarray, spacing_mm, slices: np.ndarray, threshold_hu: float,
                   shift_cells: tuple[float, float], input_set: str = "standard"):
    """(network inputs [len(slices), C, H, W] of ``slices`` on the shifted grid, the
    grid): the same channels as the whole volume's (``network_inputs``) would hold."""
    pieces, grid = [], None
    for start, stop in slice_runs(slices, hu.shape[0]):
        inputs, grid = network_inputs(hu[start:stop], spacing_mm, threshold_hu, shift_cells, input_set)
        wanted = slices[(slices >= start) & (slices < stop)]
        pieces.append(inputs[wanted - start])
    return np.concatenate(pieces), grid


def revoted_votes(hu: np.ndarray, spacing_mm, candidates: CandidateVotes, chosen: np.ndarray, engine,
                  shifts: tuple[tuple[float, float], ...], threshold_hu: float, batch_slices: int,
                  input_set: str = "standard") -> np.ndarray:
    """Summed class probabilities [len(chosen), N_CLASSES] of the ``chosen`` components,
    averaged over the normal grid (``candidates.votes``) and each grid of ``shifts``."""
    if len(chosen) == 0 or not shifts:
        return candidates.votes[chosen].copy()
    z, y, x = candidates.voxels
    row_of_component = np.full(candidates.count + 1, -1, dtype=np.int64)
    row_of_component[chosen] = np.arange(len(chosen))
    rows = row_of_component[candidates.of_voxel]
    mine = rows >= 0
    rows, z, y, x = rows[mine], z[mine], y[mine], x[mine]
    slices = np.unique(z)
    total = candidates.votes[chosen].astype(np.float64)
    for shift in shifts:
        inputs, grid = shifted_inputs(hu, spacing_mm, slices, threshold_hu, shift, input_set)
        logits = engine_logits(engine, inputs, batch_slices)
        probabilities = calcium_cell_probabilities(logits, grid, np.searchsorted(slices, z), y, x)
        total += summed_by_component(rows, probabilities, len(chosen))
    return total / (1 + len(shifts))
