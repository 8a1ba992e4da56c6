import numpy as np

from cacflow.model.preprocessing import (
    IGNORE_INDEX,
    SIZE_MULTIPLE,
    TARGET_SPACING_MM,
    CoarseGrid,
    network_inputs,
    network_targets,
)


def test_box_mean_averages_exact_blocks():
    # 0.75 mm pixels -> 1.5 mm coarse pixels: each coarse pixel is a 2x2 block.
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    grid = CoarseGrid.for_shape(4, 4, 0.75, 0.75)
    assert (grid.height, grid.width) == (2, 2)
    means = grid.box_mean(image)[0]
    assert means.shape == (SIZE_MULTIPLE, SIZE_MULTIPLE)
    expected = [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]
    np.testing.assert_allclose(means[:2, :2], expected)
    assert np.all(means[2:, :] == 0) and np.all(means[:, 2:] == 0)


def test_grid_size_follows_physical_extent():
    grid = CoarseGrid.for_shape(512, 256, 0.39, 0.78)
    assert grid.height == round(512 * 0.39 / TARGET_SPACING_MM)
    assert grid.width == round(256 * 0.78 / TARGET_SPACING_MM)
    assert grid.padded_height % SIZE_MULTIPLE == 0 and grid.padded_height >= grid.height


def test_inputs_mark_calcium_fraction_and_context_slices():
    hu = np.full((3, 8, 8), 40.0, dtype=np.float32)
    hu[1, 0:2, 0:2] = 500.0  # one full coarse pixel of calcium in slice 1 (0.75 mm pixels)
    hu[1, 2, 2] = 300.0  # a quarter of another coarse pixel
    inputs, grid = network_inputs(hu, (3.0, 0.75, 0.75))
    assert inputs.shape == (3, 6, grid.padded_height, grid.padded_width)
    fraction = inputs[:, 4]
    assert fraction[1, 0, 0] == 1.0 and fraction[1, 1, 1] == 0.25 and fraction[0].max() == 0.0
    # channel 0 of slice 2 is the soft-tissue window of slice 1, channel 2 of slice 0 too
    np.testing.assert_allclose(inputs[2, 0], inputs[1, 1])
    np.testing.assert_allclose(inputs[0, 2], inputs[1, 1])
    # the padding outside the field of view reads as air
    assert np.all(inputs[:, 1, grid.height:, :] == -1.0)


def test_targets_take_the_majority_class_of_calcified_voxels_only():
    hu = np.zeros((1, 4, 4), dtype=np.float32)
    labels = np.zeros((1, 4, 4), dtype=np.uint8)
    hu[0, 0:2, 0:2] = 400.0
    labels[0, 0, 0:2] = 2  # two LAD voxels
    labels[0, 1, 0] = 3  # one LCX voxel, one unlabelled calcified voxel
    hu[0, 2, 2] = 200.0  # calcium that is not coronary
    labels[0, 3, 3] = 4  # a label on non-calcified tissue must not count
    grid = CoarseGrid.for_shape(4, 4, 0.75, 0.75)
    targets = network_targets(hu, labels, grid)[0]
    assert targets[0, 0] == 2
    assert targets[1, 1] == 0
    assert targets[0, 1] == IGNORE_INDEX and targets[1, 0] == IGNORE_INDEX


def test_the_subcell_set_adds_each_quarter_pixels_calcium_fraction():
    """0.75 mm pixels: each quarter of a 1.5 mm pixel is one full-resolution pixel, so
    the four new channels are that pixel's calcium flag; the first six are unchanged."""
    from cacflow.model.preprocessing import INPUT_SETS

    hu = np.full((2, 8, 8), 40.0, dtype=np.float32)
    hu[1, 1, 2] = 300.0  # coarse pixel (0, 1): bottom-left quarter
    hu[1, 4:6, 4:6] = 500.0  # coarse pixel (2, 2): all four quarters
    standard, _ = network_inputs(hu, (3.0, 0.75, 0.75))
    subcell, grid = network_inputs(hu, (3.0, 0.75, 0.75), input_set="subcell")
    assert subcell.shape == (2, INPUT_SETS["subcell"], grid.padded_height, grid.padded_width)
    assert np.array_equal(subcell[:, :6], standard)
    quarters = subcell[1, 6:]  # top left, top right, bottom left, bottom right
    assert quarters[:, 0, 1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert quarters[:, 2, 2].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert quarters.sum() == 5.0 and subcell[0, 6:].max() == 0.0
    # the quarters average to the pixel's fraction wherever the quarters are equal in size
    np.testing.assert_allclose(quarters.mean(axis=0), subcell[1, 4])


def test_quarters_of_uneven_pixels_count_their_own_pixels():
    """0.5 mm pixels: three per 1.5 mm pixel, so a quarter holds one or two rows and
    columns (1, 2 or 4 pixels); each fraction is over the quarter's own pixels."""
    hu = np.zeros((1, 6, 6), dtype=np.float32)
    # Rows (and columns) 0-2 of pixel 0 sit at 0.17, 0.5 and 0.83 of it, so its halves
    # are [0] and [1, 2] (floor(2 * 0.5) = 1): the top-left quarter is pixel (0, 0)
    # alone, the bottom-right one rows and columns 1-2.
    hu[0, 0, 0] = 300.0
    hu[0, 2, 2] = 300.0
    inputs, _ = network_inputs(hu, (3.0, 0.5, 0.5), input_set="subcell")
    assert inputs[0, 6:, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.25]
    assert inputs[0, 4, 0, 0] == np.float32(2 / 9)


def test_an_unknown_input_set_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown input set 'fine'"):
        network_inputs(np.zeros((1, 8, 8), np.float32), (3.0, 0.75, 0.75), input_set="fine")
