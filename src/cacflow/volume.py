"""The in-memory CT volume every stage after conversion works on.

Canonical array orientation (the same for generated phantoms, converted NIfTI,
model input and label volumes): ``hu[z, y, x]`` with
  z: slice index, inferior -> superior,
  y: row index, anterior -> posterior,
  x: column index, patient right -> patient left,
which is how an axial DICOM slice is displayed (ImageOrientationPatient
1\\0\\0\\0\\1\\0) with slices sorted by position along the feet-head axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    hu: np.ndarray  # float32 [z, y, x], Hounsfield units
    # (slice increment along z, row spacing along y, column spacing along x), mm.
    # The increment is the distance between slice centres (from positions),
    # not the nominal slice thickness.
    spacing_mm: tuple[float, float, float]
    slice_thickness_mm: float | None = None
    # Position of each slice centre along the feet-head axis, mm (len == hu.shape[0]).
    z_positions_mm: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"volume must be 3-D [z, y, x], got shape {self.hu.shape}")
        if self.z_positions_mm is None:
            self.z_positions_mm = np.arange(self.hu.shape[0], dtype=np.float64) * self.spacing_mm[0]

    @property
    def increment_mm(self) -> float:
        return float(self.spacing_mm[0])

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.spacing_mm[1] * self.spacing_mm[2])
