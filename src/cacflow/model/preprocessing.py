"""What the network sees, shared by training and every inference engine.

The CT volume (canonical ``hu[z, y, x]``) is box-averaged in-plane onto a coarse
grid of ``TARGET_SPACING_MM`` pixels. Each coarse pixel covers a fixed block of
full-resolution pixels (``CoarseGrid``), and the same mapping sends the network's
per-pixel decision back to every full-resolution voxel, so training targets,
inputs and votes agree exactly.

Channels per slice z:
  0-2  soft-tissue window of slices z-1, z, z+1 (through-plane context)
  3    wide window of slice z (lung, fat, bone)
  4    fraction of the coarse pixel that is at or above the calcium threshold
  5    mean density above threshold, up to 2500 HU: calcium (up to ~1000 HU) and
       metal (stents, wires, leads: 1400 HU and more) must stay distinguishable

A model trained on the "subcell" input set (model.json ``input_set``; the shipped
model is "standard") also sees, per coarse pixel:
  6-9  the calcium fraction of each quarter of the pixel (rows then columns: top
       left, top right, bottom left, bottom right), so a speck of 1-2 mm^2 keeps its
       size and place inside the 1.5 mm pixel rather than being spread over it
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGET_SPACING_MM = 1.5
N_INPUT_CHANNELS = 6  # the standard input set's
# Input sets a model can be trained on: name -> channels (model.json ``input_set``).
INPUT_SETS = {"standard": N_INPUT_CHANNELS, "subcell": N_INPUT_CHANNELS + 4}
SIZE_MULTIPLE = 16  # what the engines pad to: size_multiple of the shipped widths
IGNORE_INDEX = -1
DENSITY_RANGE_HU = 2370.0  # threshold + this = 2500 HU


def size_multiple(widths: tuple[int, ...]) -> int:
    """What a CalciumNet of these widths needs its input height and width to be a
    multiple of: it pools ``len(widths) - 1`` times."""
    return 2 ** (len(widths) - 1)


@dataclass(frozen=True)
class CoarseGrid:
    """Maps full-resolution rows/columns onto coarse pixels (padded network grid)."""

    row_index: np.ndarray  # int64 [Y]: coarse row of each full-res row
    col_index: np.ndarray  # int64 [X]: coarse column of each full-res column
    height: int  # coarse rows actually covered
    width: int
    padded_height: int  # network input size (multiple of SIZE_MULTIPLE)
    padded_width: int

    @classmethod
    def for_shape(cls, rows: int, cols: int, row_mm: float, col_mm: float,
                  shift_cells: tuple[float, float] = (0.0, 0.0)) -> "CoarseGrid":
        """``shift_cells`` (rows, columns; each in [0, 1)) moves the cell boundaries by
        that fraction of a cell: the grid ``cacflow.revote`` looks again through. A
        shifted grid has one more, partial, cell at the start of a shifted axis."""
        row_index, height = _coarse_index(rows, row_mm, shift_cells[0])
        col_index, width = _coarse_index(cols, col_mm, shift_cells[1])
        pad = lambda n: -(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE  # noqa: E731 - round up
        return cls(row_index, col_index, height, width, pad(height), pad(width))

    def flat_index(self) -> np.ndarray:
        """[Y, X] index of each full-res pixel into a flattened padded coarse slice."""
        return self.row_index[:, None] * self.padded_width + self.col_index[None, :]

    def box_mean(self, images: np.ndarray) -> np.ndarray:
        """Average ``images[z, Y, X]`` over each coarse pixel -> [z, padded_h, padded_w]."""
        n_slices = images.shape[0]
        cells = self.padded_height * self.padded_width
        flat = self.flat_index().ravel()
        counts = np.bincount(flat, minlength=cells).astype(np.float32)
        out = np.empty((n_slices, cells), dtype=np.float32)
        for z in range(n_slices):  # per slice keeps peak memory to one slice of weights
            out[z] = np.bincount(flat, weights=images[z].ravel(), minlength=cells)
        out /= np.maximum(counts, 1.0)
        return out.reshape(n_slices, self.padded_height, self.padded_width)


def _cell_positions(pixels: int, pixel_mm: float, shift: float) -> tuple[np.ndarray, int]:
    """(each full-resolution pixel's centre along one axis in coarse cells, counted
    from the shifted grid's first boundary; the cells the unshifted grid has)."""
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"a grid shift is a fraction of a cell in [0, 1), not {shift}")
    cells = max(1, int(round(pixels * pixel_mm / TARGET_SPACING_MM)))
    return (np.arange(pixels) + 0.5) * cells / pixels + shift, cells


def _coarse_index(pixels: int, pixel_mm: float, shift: float) -> tuple[np.ndarray, int]:
    """(coarse cell of each full-resolution pixel, cells covered) along one axis."""
    position, cells = _cell_positions(pixels, pixel_mm, shift)
    covered = cells + (1 if shift > 0 else 0)
    return np.minimum(np.floor(position).astype(np.int64), covered - 1), covered


def input_channels(input_set: str) -> int:
    """Channels of an input set (``INPUT_SETS``); ValueError for an unknown one."""
    if input_set not in INPUT_SETS:
        raise ValueError(f"unknown input set {input_set!r}: one of {', '.join(INPUT_SETS)}")
    return INPUT_SETS[input_set]


def input_set_record(input_set: str) -> dict:
    """What model.json, dataset.json and the int8 record say of an input set: nothing
    for the standard one, so records written before input sets existed keep their form."""
    return {} if input_set == "standard" else {"input_set": input_set}


def _quarter_index(pixels: int, pixel_mm: float, shift: float) -> np.ndarray:
    """0 or 1 per full-resolution pixel along one axis: in the first or second half of
    its coarse cell (the same cells as ``CoarseGrid.for_shape``)."""
    position, _ = _cell_positions(pixels, pixel_mm, shift)
    return (np.floor(2 * position) - 2 * np.floor(position)).astype(np.int64)


def quarter_fractions(calcium: np.ndarray, grid: CoarseGrid, spacing_mm, shift_cells=(0.0, 0.0)) -> np.ndarray:
    """Calcium fraction of each quarter of each coarse pixel -> [z, 4, padded_h, padded_w]
    (a quarter that holds no full-resolution pixel, at a partial edge cell, is 0)."""
    rows, cols = calcium.shape[1:]
    quarter = (2 * _quarter_index(rows, spacing_mm[1], shift_cells[0])[:, None]
               + _quarter_index(cols, spacing_mm[2], shift_cells[1])[None, :])
    cells = grid.padded_height * grid.padded_width
    flat = (grid.flat_index() * 4 + quarter).ravel()
    counts = np.maximum(np.bincount(flat, minlength=cells * 4), 1).astype(np.float32)
    out = np.empty((len(calcium), cells * 4), dtype=np.float32)
    for z in range(len(calcium)):
        out[z] = np.bincount(flat, weights=calcium[z].ravel(), minlength=cells * 4) / counts
    return out.reshape(len(calcium), grid.padded_height, grid.padded_width, 4).transpose(0, 3, 1, 2)


def network_inputs(hu: np.ndarray, spacing_mm: tuple[float, float, float], threshold_hu: float = 130.0,
                   shift_cells: tuple[float, float] = (0.0, 0.0), input_set: str = "standard"):
    """Return (inputs float32 [z, C, H, W], grid) for a canonical HU volume, on the
    normal grid or one shifted by ``shift_cells`` (``CoarseGrid.for_shape``), with the
    channels of ``input_set`` (``INPUT_SETS``)."""
    input_channels(input_set)
    grid = CoarseGrid.for_shape(hu.shape[1], hu.shape[2], spacing_mm[1], spacing_mm[2], shift_cells)
    hu = hu.astype(np.float32, copy=False)
    # One full-resolution scratch volume for the four windowed copies, rather than a
    # fresh array (and its page faults) for each.
    scratch = np.empty_like(hu)
    soft = grid.box_mean(np.clip(hu, -200.0, 300.0, out=scratch))
    soft = (soft - 50.0) / 250.0
    wide = grid.box_mean(np.clip(hu, -1000.0, 1000.0, out=scratch)) / 1000.0
    calcium = hu >= threshold_hu
    np.copyto(scratch, calcium)
    fraction = grid.box_mean(scratch)
    np.clip(np.subtract(hu, np.float32(threshold_hu), out=scratch), 0.0, DENSITY_RANGE_HU, out=scratch)
    scratch[~calcium] = 0.0
    density = grid.box_mean(scratch) / DENSITY_RANGE_HU
    density = density / np.maximum(fraction, 1e-3) * (fraction > 0)
    below = np.concatenate([soft[:1], soft[:-1]])
    above = np.concatenate([soft[1:], soft[-1:]])
    channels = [below, soft, above, wide, fraction, density]
    if input_set == "subcell":
        channels += list(quarter_fractions(calcium, grid, spacing_mm, shift_cells).transpose(1, 0, 2, 3))
    inputs = np.stack(channels, axis=1)
    # Padding rows/cols have no full-res pixels: mark them as air, not as tissue.
    inputs[:, 0:3, grid.height:, :] = inputs[:, 0:3, :, grid.width:] = -1.0
    inputs[:, 3, grid.height:, :] = inputs[:, 3, :, grid.width:] = -1.0
    return inputs.astype(np.float32), grid


def network_targets(
    hu: np.ndarray,
    coronary_labels: np.ndarray,
    grid: CoarseGrid,
    threshold_hu: float = 130.0,
) -> np.ndarray:
    """Training target per coarse pixel: the majority class among its calcified voxels
    (0 = not coronary, 1-4 = vessel), IGNORE_INDEX where it holds no calcium."""
    n_slices = hu.shape[0]
    cells = grid.padded_height * grid.padded_width
    flat = grid.flat_index().ravel()
    targets = np.full((n_slices, cells), IGNORE_INDEX, dtype=np.int64)
    for z in range(n_slices):
        calcified = (hu[z] >= threshold_hu).ravel()
        if not calcified.any():
            continue
        classes = coronary_labels[z].ravel()[calcified].astype(np.int64)
        votes = np.bincount(flat[calcified] * 5 + classes, minlength=cells * 5).reshape(cells, 5)
        has_calcium = votes.sum(axis=1) > 0
        targets[z, has_calcium] = votes[has_calcium].argmax(axis=1)
    return targets.reshape(n_slices, grid.padded_height, grid.padded_width)


# A coarse pixel lies on an artery when at least this share of it does: an artery of
# 3-5 mm with its wall fills the 1.5 mm pixels along its centre line, not those it grazes.
ARTERY_MIN_FRACTION = 0.25


def artery_targets(vessel_labels: np.ndarray, grid: CoarseGrid,
                   min_fraction: float = ARTERY_MIN_FRACTION) -> np.ndarray:
    """Artery-map target per coarse pixel, for training only: the artery (1-4, as the
    calcium classes) that covers the largest share of the pixel, when that share is at
    least ``min_fraction``; 0 elsewhere in the scan; IGNORE_INDEX on the padding."""
    shares = np.stack([grid.box_mean((vessel_labels == artery).astype(np.float32)) for artery in range(1, 5)])
    targets = np.where(shares.max(axis=0) >= min_fraction, shares.argmax(axis=0) + 1, 0)
    targets[:, grid.height:, :] = targets[:, :, grid.width:] = IGNORE_INDEX
    return targets.astype(np.int64)
