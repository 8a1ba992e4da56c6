"""NIfTI files to and from the canonical ``[z, y, x]`` arrays of :mod:`cacflow.volume`.

NIfTI world coordinates are RAS+ (x increases towards the patient's Right,
y towards Anterior, z towards Superior); DICOM and cacflow's canonical
arrays count columns towards the patient's left and rows towards posterior
(LPS). Loading reorients any NIfTI to RAS+ and flips the first two axes;
saving writes the canonical array unflipped with an affine whose first two
axes are negated, which is the same LPS -> RAS change, so a save followed by a
load returns the array, spacing and slice positions unchanged.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from cacflow.volume import Volume


def load_nifti(path: str | Path) -> Volume:
    """Read a 3-D NIfTI (scl_slope/inter applied) as a canonical ``[z, y, x]`` volume."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim > 3:
        if any(extent != 1 for extent in data.shape[3:]):
            raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
    hu = _ras_to_canonical(data)
    # The header holds float32: round off its noise (0.488 -> 0.48800000548).
    zoom_x, zoom_y, zoom_z = (round(float(z), 6) for z in image.header.get_zooms()[:3])
    affine = image.affine
    z_positions = np.round(affine[2, 3] + affine[2, 2] * np.arange(hu.shape[0]), 4)
    return Volume(hu=hu, spacing_mm=(zoom_z, zoom_y, zoom_x), z_positions_mm=z_positions)


def _ras_to_canonical(data: np.ndarray) -> np.ndarray:
    # RAS+ index order (x to Right, y to Anterior, z to Superior) -> [z, y, x]
    # with x towards the patient's left and y towards posterior.
    return np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))


def _canonical_to_ras(array_zyx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array_zyx.transpose(2, 1, 0)[::-1, ::-1, :])


def save_like(array_zyx: np.ndarray, reference_image, path: str | Path) -> None:
    """Write a canonical ``[z, y, x]`` array (e.g. labels) on the exact world grid of
    ``reference_image`` (the NIfTI it was computed from), atomically."""
    canonical = nib.as_closest_canonical(reference_image)
    image = nib.Nifti1Image(_canonical_to_ras(np.asarray(array_zyx, dtype=np.uint8)), canonical.affine)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)


def save_nifti(
    array_zyx: np.ndarray,
    spacing_mm: tuple[float, float, float],
    path: str | Path,
    z_positions_mm: np.ndarray | None = None,
) -> None:
    """Write a canonical ``[z, y, x]`` array (CT or labels) as NIfTI.

    The slice positions become the z origin of the affine; they must be evenly
    spaced at ``spacing_mm[0]`` because NIfTI has one affine per image. The
    in-plane origin is 0 (cacflow keeps no in-plane patient position).
    """
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a 3-D [z, y, x] array, got shape {array_zyx.shape}")
    increment, row_mm, col_mm = (float(s) for s in spacing_mm)
    z0 = 0.0
    if z_positions_mm is not None:
        z_positions_mm = np.asarray(z_positions_mm, dtype=np.float64)
        expected = z_positions_mm[0] + increment * np.arange(array_zyx.shape[0])
        if z_positions_mm.shape != expected.shape or not np.allclose(z_positions_mm, expected, atol=1e-3):
            raise ValueError("z positions are not evenly spaced at the slice increment")
        z0 = float(z_positions_mm[0])
    if array_zyx.dtype == bool:
        array_zyx = array_zyx.astype(np.uint8)
    affine = np.diag([-col_mm, -row_mm, increment, 1.0])
    affine[2, 3] = z0
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
