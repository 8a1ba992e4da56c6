import numpy as np

from cacflow.inference import CalciumSegmenter, assign_candidates
from cacflow.model.network import N_CLASSES
from cacflow.model.preprocessing import CoarseGrid


def as_logits(probs):
    """Logits whose softmax is ``probs`` (what an engine returns)."""
    return np.log(np.clip(probs, 1e-12, None))


def one_hot_probabilities(grid, n_slices, classes_by_cell):
    probs = np.zeros((n_slices, N_CLASSES, grid.padded_height, grid.padded_width), dtype=np.float32)
    probs[:, 0] = 1.0
    for (z, row, col), cls in classes_by_cell.items():
        probs[z, :, row, col] = 0.0
        probs[z, cls, row, col] = 1.0
    return probs


def test_each_candidate_takes_its_majority_class_and_non_coronary_stays_zero():
    hu = np.zeros((2, 8, 8), dtype=np.float32)
    hu[0, 0:2, 0:3] = 300.0  # lesion A spans coarse cells (0,0) and (0,1)
    hu[1, 5:7, 5:7] = 300.0  # lesion B in cell (2,2) and (3,3) region
    grid = CoarseGrid.for_shape(8, 8, 0.75, 0.75)
    probs = one_hot_probabilities(grid, 2, {(0, 0, 0): 2, (0, 0, 1): 3})
    labels, _, n_candidates, n_coronary, _ = assign_candidates(hu, as_logits(probs), grid, 130.0)
    assert n_candidates == 2 and n_coronary == 1
    # cell (0,0) holds 4 voxels of A, cell (0,1) 2 voxels: A is LAD (2) as a whole
    assert set(np.unique(labels[0][hu[0] >= 130])) == {2}
    assert labels[1].max() == 0  # B was voted "not coronary"
    assert labels[hu < 130].max() == 0


def test_lesions_touching_only_across_slices_are_separate_candidates():
    hu = np.zeros((2, 4, 4), dtype=np.float32)
    hu[:, 1, 1] = 500.0
    grid = CoarseGrid.for_shape(4, 4, 0.75, 0.75)
    probs = one_hot_probabilities(grid, 2, {(0, 0, 0): 1, (1, 0, 0): 4})
    labels, _, n_candidates, _, _ = assign_candidates(hu, as_logits(probs), grid, 130.0)
    assert n_candidates == 2
    assert labels[0, 1, 1] == 1 and labels[1, 1, 1] == 4


class ConstantEngine:
    """Votes every pixel into one class: checks the segmenter's wiring end to end."""

    label = "constant-cpu-fp32"

    def __init__(self, cls):
        self.cls = cls
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch.shape[0])
        logits = np.zeros((batch.shape[0], N_CLASSES) + batch.shape[2:], dtype=np.float32)
        logits[:, self.cls] = 10.0
        return logits


def test_segmenter_batches_slices_and_labels_all_calcium():
    hu = np.random.default_rng(0).normal(0, 20, (20, 32, 32)).astype(np.float32)
    hu[5, 10:13, 10:13] = 400
    engine = ConstantEngine(cls=4)
    result = CalciumSegmenter(engine, batch_slices=8).segment(hu, (3.0, 0.7, 0.7))
    assert engine.batches == [8, 8, 4]
    assert np.array_equal(result.labels > 0, hu >= 130)
    assert set(np.unique(result.labels)) == {0, 4}


def test_probabilities_are_the_full_grid_softmax_at_each_calcium_voxel():
    """The vote's softmax runs on the coarse cells holding calcium only; each voxel
    must get exactly its cell's row of the softmax over the whole grid."""
    from cacflow.inference import calcium_cell_probabilities, softmax

    rng = np.random.default_rng(7)
    hu = rng.normal(0, 120, (3, 40, 36)).astype(np.float32)
    grid = CoarseGrid.for_shape(40, 36, 0.7, 0.7)
    logits = rng.normal(0, 4, (3, N_CLASSES, grid.padded_height, grid.padded_width)).astype(np.float32)
    z, y, x = np.nonzero(hu >= 130)
    assert 50 < len(z) < hu.size // 2
    full = softmax(logits, axis=1)
    expected = full[z, :, grid.row_index[y], grid.col_index[x]]
    assert np.array_equal(calcium_cell_probabilities(logits, grid, z, y, x), expected)


def test_close_votes_are_flipped_and_counted_as_unsure():
    """Three one-cell candidates: a sure LAD, a 60/40 coronary (RCA) and a 70/30 not
    coronary one. With the 0.25-0.75 band the last two are unsure: the flipped labels
    drop the first of them and give the second its most probable vessel."""
    hu = np.zeros((1, 8, 8), dtype=np.float32)
    hu[0, 0, 0] = hu[0, 0, 4] = hu[0, 4, 0] = 300.0
    grid = CoarseGrid.for_shape(8, 8, 0.75, 0.75)  # 2 x 2 voxels per coarse cell
    probs = one_hot_probabilities(grid, 1, {(0, 0, 0): 2})
    probs[0, :, 0, 2] = [0.4, 0.0, 0.1, 0.0, 0.5]  # coronary share 0.6: RCA, unsure
    probs[0, :, 2, 0] = [0.7, 0.0, 0.0, 0.3, 0.0]  # coronary share 0.3: not coronary, unsure (LCX if flipped)
    labels, flipped, n_candidates, n_coronary, n_ambiguous = assign_candidates(hu, as_logits(probs), grid, 130.0)
    assert (n_candidates, n_coronary, n_ambiguous) == (3, 2, 2)
    assert (labels[0, 0, 0], labels[0, 0, 4], labels[0, 4, 0]) == (2, 4, 0)
    assert (flipped[0, 0, 0], flipped[0, 0, 4], flipped[0, 4, 0]) == (2, 0, 3)
    assert flipped[hu < 130].max() == 0
    # a narrower band leaves the 0.3 decision sure
    _, flipped_narrow, _, _, n_narrow = assign_candidates(hu, as_logits(probs), grid, 130.0, ambiguous_share=(0.35, 0.55))
    assert n_narrow == 0 and np.array_equal(flipped_narrow, labels)



def test_the_documented_band_is_the_one_in_use():
    import pandas as pd

    from cacflow import report
    from cacflow.dictionary import DEFINITIONS
    from cacflow.inference import AMBIGUOUS_CORONARY_SHARE

    low, high = AMBIGUOUS_CORONARY_SHARE
    assert f"at least {low:g} and below {high:g}" in DEFINITIONS["Model uncertainty"]
    _, _, section = report._review_section(pd.DataFrame({"status": [], "participant_id": [], "visit": []}))
    assert f"share {low:g}-{high:g}" in section
