"""The shifted-grid re-vote of unsure candidates (cacflow.revote)."""

import json
import math
import shutil

import numpy as np
import pytest

from cacflow.inference import CalciumSegmenter
from cacflow.model.network import N_CLASSES
from cacflow.model.preprocessing import CoarseGrid, network_inputs
from cacflow.revote import shifted_inputs, slice_runs

FRACTION_CHANNEL = 4


def speck_volume():
    """Slice 1 holds a 2 x 2 pixel speck at rows/columns 1-2 of 0.75 mm pixels: on
    the 1.5 mm grid it straddles the boundary of four cells. Slice 4 holds a 4 x 4
    block that fills cells (2-3, 4-5) exactly."""
    hu = np.zeros((6, 16, 16), dtype=np.float32)
    hu[1, 1:3, 1:3] = 300.0
    hu[4, 4:8, 8:12] = 300.0
    return hu


def test_half_cell_shift_puts_a_straddling_speck_in_one_cell():
    hu = speck_volume()
    normal, _ = network_inputs(hu, (3.0, 0.75, 0.75))
    shifted, grid = network_inputs(hu, (3.0, 0.75, 0.75), shift_cells=(0.5, 0.5))
    assert normal[1, FRACTION_CHANNEL].max() == pytest.approx(0.25)  # four cells, one voxel each
    assert np.count_nonzero(normal[1, FRACTION_CHANNEL]) == 4
    assert shifted[1, FRACTION_CHANNEL].max() == pytest.approx(1.0)  # all four voxels in one cell
    assert np.count_nonzero(shifted[1, FRACTION_CHANNEL]) == 1
    # the first cell of a shifted axis is half a cell wide; every pixel still has a cell
    assert np.bincount(grid.row_index).tolist() == [1] + [2] * 7 + [1]
    assert grid.height == 9 and grid.padded_height == 16


def test_the_normal_grid_is_unchanged_and_shifts_stay_inside_a_cell():
    for rows, spacing in ((512, 0.35), (333, 0.7), (97, 0.45)):
        cells = max(1, int(round(rows * spacing / 1.5)))
        before = np.minimum((np.arange(rows) + 0.5) * cells / rows, cells - 1).astype(np.int64)
        grid = CoarseGrid.for_shape(rows, rows, spacing, spacing)
        assert np.array_equal(grid.row_index, before) and grid.height == cells
    for bad in (-0.25, 1.0):
        with pytest.raises(ValueError, match="fraction of a cell"):
            CoarseGrid.for_shape(64, 64, 0.7, 0.7, (bad, 0.0))


def test_slab_inputs_equal_the_whole_volumes():
    """Only the slices with unsure candidates run again; their inputs, neighbours
    included, must be what the whole volume's inputs hold for them."""
    assert slice_runs(np.array([0, 3, 4, 9]), 10) == [(0, 6), (8, 10)]  # touching slabs merge
    assert slice_runs(np.array([0, 5]), 10) == [(0, 2), (4, 7)]
    assert slice_runs(np.array([2, 4]), 10) == [(1, 6)]
    hu = np.random.default_rng(3).normal(40, 80, (10, 40, 36)).astype(np.float32)
    slices = np.array([0, 3, 4, 9])
    for shift in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.5)):
        whole, whole_grid = network_inputs(hu, (2.5, 0.7, 0.7), shift_cells=shift)
        some, grid = shifted_inputs(hu, (2.5, 0.7, 0.7), slices, 130.0, shift)
        assert np.array_equal(some, whole[slices])
        assert np.array_equal(grid.row_index, whole_grid.row_index)


def lad_probability(fraction):
    """What FractionEngine gives: LAD against 'not coronary' by a cell's calcium fraction."""
    return 1.0 / (1.0 + math.exp(-8.0 * (fraction - 0.45)))


class FractionEngine:
    """Calls a calcium cell LAD the more of it is calcium (``lad_probability``), so the
    vote on each grid can be worked out by hand; records the slices of every call."""

    label = "fraction-cpu-fp32"

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(batch.shape)
        logits = np.full((batch.shape[0], N_CLASSES) + batch.shape[2:], -30.0, dtype=np.float32)
        logits[:, 0] = 0.0
        logits[:, 2] = 8.0 * (batch[:, FRACTION_CHANNEL] - 0.45)
        return logits


def test_an_unsure_speck_is_decided_by_its_vote_averaged_over_the_grids():
    hu = speck_volume()
    spacing = (3.0, 0.75, 0.75)
    plain = CalciumSegmenter(FractionEngine()).segment(hu, spacing)
    speck, block = hu[1] >= 130, hu[4] >= 130
    # Normal grid: each of the speck's cells is a quarter calcium, LAD at 0.17: unsure,
    # not coronary. The block fills its cells: LAD at 0.99, sure.
    assert lad_probability(0.25) == pytest.approx(0.168, abs=1e-3)
    assert plain.labels[1][speck].max() == 0 and (plain.labels[4][block] == 2).all()
    assert plain.n_ambiguous == 1

    engine = FractionEngine()
    shifts = ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5))
    revoted = CalciumSegmenter(engine, revote_shifts=shifts).segment(hu, spacing)
    # Shifted by half a cell along one axis the speck fills two cells by half, along
    # both one cell whole: the average of the four grids' LAD probabilities.
    share = (lad_probability(0.25) + 2 * lad_probability(0.5) + lad_probability(1.0)) / 4
    assert share == pytest.approx(0.589, abs=1e-3)
    assert (revoted.labels[1][speck] == 2).all()  # now coronary, LAD
    assert (revoted.labels[4][block] == 2).all()
    assert revoted.n_coronary == 2 and revoted.n_ambiguous == 1  # 0.59 is still unsure: still flagged
    assert revoted.flipped_labels[1][speck].max() == 0
    # The sure block is not voted again: each shifted grid ran the speck's slice only.
    assert [shape[0] for shape in engine.calls] == [6, 1, 1, 1]


def test_a_scan_without_unsure_candidates_runs_once():
    hu = speck_volume()
    hu[1] = 0.0  # the block alone: sure
    engine = FractionEngine()
    result = CalciumSegmenter(engine, revote_shifts=((0.5, 0.5),)).segment(hu, (3.0, 0.75, 0.75))
    assert [shape[0] for shape in engine.calls] == [6]
    assert result.n_ambiguous == 0 and result.n_coronary == 1


def test_the_model_folder_asks_for_the_revote_and_its_hash_covers_it(tmp_path):
    from cacflow.model.engines import ModelFiles

    model_dir = tmp_path / "model"
    shutil.copytree(ModelFiles.packaged().directory, model_dir)
    alone = ModelFiles(model_dir)
    assert alone.unsure_revote_shifts == ()
    info = json.loads((model_dir / "model.json").read_text())
    info["unsure_revote"] = {"grid_shifts": [[0.5, 0], [0, 0.5]]}
    (model_dir / "model.json").write_text(json.dumps(info))
    with_revote = ModelFiles(model_dir)
    assert with_revote.unsure_revote_shifts == ((0.5, 0.0), (0.0, 0.5))
    assert with_revote.sha256 != alone.sha256 and with_revote.network_sha256 == alone.network_sha256
    segmenter = CalciumSegmenter.for_model(FractionEngine(), with_revote)
    assert segmenter.revote_shifts == ((0.5, 0.0), (0.0, 0.5)) and segmenter.review is None
