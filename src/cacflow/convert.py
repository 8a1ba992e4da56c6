"""DICOM series -> NIfTI with dcm2niix, and NIfTI -> canonical ``Volume``.

dcm2niix is run on exactly the files of the chosen series (linked into a private
folder), so other series of the visit cannot leak into the volume. Its output is
checked: one volume, as many slices as the series has, axial. The NIfTI header's
free-text fields (which dcm2niix fills from DICOM text such as acquisition time
and image comments) are blanked so no header carries more than geometry and
intensities.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from cacflow.volume import Volume

DCM2NIIX_TIMEOUT_S = 600


def dcm2niix_binary() -> str:
    """The dcm2niix shipped by the pinned ``dcm2niix`` wheel (a known version),
    whether or not the environment's bin folder is on PATH."""
    import dcm2niix

    return dcm2niix.bin
# Offsets of the free-text fields in a NIfTI-1 header (see nifti1.h).
_DESCRIP = (148, 80)
_AUX_FILE = (228, 24)
_INTENT_NAME = (328, 16)


class ConversionError(Exception):
    """A series that dcm2niix could not turn into one clean volume; the message
    is the reason recorded for the visit."""


@dataclass
class Conversion:
    nifti_path: Path
    n_slices: int
    spacing_mm: tuple[float, float, float]


def dcm2niix_version() -> str:
    result = subprocess.run([dcm2niix_binary(), "--version"], capture_output=True, text=True)
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[-1] if text else "unknown"


def convert_series(files: list[str], out_path: Path, expected_slices: int | None = None) -> Conversion:
    """Convert one series' files to ``out_path`` (.nii). Raises ConversionError."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".dcm2niix-") as work:
        source = Path(work) / "in"
        target = Path(work) / "out"
        source.mkdir()
        target.mkdir()
        for index, file in enumerate(files):
            os.symlink(os.path.abspath(file), source / f"{index:06d}.dcm")
        command = [
            dcm2niix_binary(), "-g", "i", "-b", "n", "-z", "n", "-x", "n", "-l", "o", "-v", "0",
            "-f", "volume", "-o", str(target), str(source),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise ConversionError(f"dcm2niix did not finish within {DCM2NIIX_TIMEOUT_S} s") from error
        outputs = sorted(target.glob("*.nii"))
        if not outputs:
            last_line = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no message"]
            raise ConversionError(f"dcm2niix wrote no volume (exit {result.returncode}: {last_line[0][:200]})")
        if len(outputs) > 1:
            raise ConversionError(
                f"dcm2niix split the series into {len(outputs)} volumes (uneven slice spacing, "
                "gantry tilt or mixed geometry); the series cannot be scored as one volume"
            )
        _blank_free_text(outputs[0])
        image = nib.load(outputs[0])
        if image.ndim != 3:
            raise ConversionError(f"dcm2niix wrote a {image.ndim}-D volume; a single 3-D volume is needed")
        canonical = nib.as_closest_canonical(image)
        n_slices = int(canonical.shape[2])
        if expected_slices is not None and n_slices != expected_slices:
            raise ConversionError(
                f"dcm2niix wrote {n_slices} slices but the series has {expected_slices} images"
            )
        zooms = canonical.header.get_zooms()
        shutil.move(str(outputs[0]), out_path)
    return Conversion(out_path, n_slices, (float(zooms[2]), float(zooms[1]), float(zooms[0])))


def _blank_free_text(path: Path) -> None:
    with open(path, "r+b") as handle:
        for offset, length in (_DESCRIP, _AUX_FILE, _INTENT_NAME):
            handle.seek(offset)
            handle.write(b"\0" * length)


def load_volume(path: Path, slice_thickness_mm: float | None = None) -> Volume:
    """Load a NIfTI as a canonical ``Volume`` (HU, [z, y, x], see volume.py)."""
    from cacflow.nifti_io import load_nifti

    volume = load_nifti(path)
    volume.slice_thickness_mm = slice_thickness_mm
    return volume
