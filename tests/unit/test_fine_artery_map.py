"""The eighteenth candidate's patches (tests/benchmarks/fine_artery_map.py): geometry on
hand-made slices whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def fine_artery_map():
    return load_benchmark("fine_artery_map")


def _disk_volume(pixel_mm: float, centre_yx, radius_mm: float, n_slices: int = 3):
    size = 200
    rows, cols = np.mgrid[:size, :size]
    disk = np.hypot((rows - centre_yx[0]) * pixel_mm, (cols - centre_yx[1]) * pixel_mm) <= radius_mm
    hu = np.full((n_slices, size, size), -100.0, np.float32)
    hu[:, disk] = 300.0
    return hu, disk


@pytest.mark.parametrize("pixel_mm", [0.35, 0.8])
def test_a_disk_lands_in_the_middle_at_half_millimetre_pixels(fine_artery_map, pixel_mm):
    """A 2 mm-radius disk, whatever the scan's pixels, covers pi * 4^2 = 50 patch pixels
    of 0.5 mm, centred on the patch."""
    centre = (97.0, 104.0)
    hu, disk = _disk_volume(pixel_mm, centre, 2.0)
    mask = fine_artery_map.mask_patch(disk, centre, pixel_mm)
    assert mask.sum() == pytest.approx(np.pi * 16, rel=0.15)
    rows, cols = np.nonzero(mask)
    middle = (fine_artery_map.PATCH - 1) / 2
    assert abs(rows.mean() - middle) < 0.5 and abs(cols.mean() - middle) < 0.5
    image = fine_artery_map.image_patch(hu, 1, centre, pixel_mm)
    assert image.shape == (3, fine_artery_map.PATCH, fine_artery_map.PATCH)
    assert image[1][mask].min() > 130.0 and np.median(image[1][~mask]) == pytest.approx(-100.0)


def test_slices_clamp_at_the_ends_and_outside_is_air(fine_artery_map):
    hu, _ = _disk_volume(0.5, (100.0, 100.0), 2.0, n_slices=2)
    hu[0] += 1000.0  # tell the slices apart
    first = fine_artery_map.image_patch(hu, 0, (100.0, 100.0), 0.5)
    assert np.array_equal(first[0], first[1])  # slice -1 is slice 0 again
    assert not np.array_equal(first[1], first[2])
    corner = fine_artery_map.image_patch(hu, 1, (0.0, 0.0), 0.5)
    assert corner[1, 0, 0] == pytest.approx(-1000.0)  # 24 mm outside the image
