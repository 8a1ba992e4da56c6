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
