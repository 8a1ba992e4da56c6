"""DICOM series -> NIfTI with dcm2niix, and NIfTI -> canonical ``Volume``.

dcm2niix is run on exactly the files of the chosen series (linked into a private
folder), so other series of the visit cannot leak into the volume. Its output is
checked: one volume, as many slices as the series has, axial (unevenly spaced
slices are kept as stored, at their mean increment; see ``_space_evenly``). The NIfTI header's
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
import numpy as np

from cacflow.volume import Volume

DCM2NIIX_TIMEOUT_S = 600
# Transfer syntaxes dcm2niix does not read; their files are inflated for it.
_INFLATE_SYNTAXES = {"1.2.840.10008.1.2.1.99"}  # Deflated Explicit VR Little Endian


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
    uneven_spacing: bool = False  # slices were unevenly spaced: placed at their mean increment


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
            _stage_file(file, source / f"{index:06d}.dcm")
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
        output, equidistant = _pick_output(outputs)
        if equidistant is not None:
            _space_evenly(output, equidistant)
        _blank_free_text(output)
        image = nib.load(output)
        if image.ndim != 3:
            raise ConversionError(f"dcm2niix wrote a {image.ndim}-D volume; a single 3-D volume is needed")
        canonical = nib.as_closest_canonical(image)
        n_slices = int(canonical.shape[2])
        if expected_slices is not None and n_slices != expected_slices:
            raise ConversionError(
                f"dcm2niix wrote {n_slices} slices but the series has {expected_slices} images"
            )
        zooms = canonical.header.get_zooms()
        shutil.move(str(output), out_path)
    return Conversion(out_path, n_slices, (float(zooms[2]), float(zooms[1]), float(zooms[0])),
                      uneven_spacing=equidistant is not None)


def _stage_file(file: str, link: Path) -> None:
    """Put one input file where dcm2niix reads it: a symlink, or, for a transfer
    syntax dcm2niix cannot read (Deflated Explicit VR Little Endian), an inflated
    copy in the private folder. The input file itself is never changed."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian

    try:
        syntax = pydicom.filereader.read_file_meta_info(file).get("TransferSyntaxUID")
    except (InvalidDicomError, OSError, ValueError, EOFError):
        syntax = None  # no file meta (old preamble-less export): dcm2niix reads it as is
    if syntax not in _INFLATE_SYNTAXES:
        os.symlink(os.path.abspath(file), link)
        return
    try:
        dataset = pydicom.dcmread(file)
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.save_as(link, enforce_file_format=True)
    except Exception as error:  # noqa: BLE001 - reported as the visit's reason
        raise ConversionError(f"could not inflate the deflated file {Path(file).name}: {error}") from error


def _pick_output(outputs: list[Path]) -> tuple[Path, Path | None]:
    """The volume to use, and dcm2niix's equidistant resampling of it when it wrote one.

    When the slice spacing varies, dcm2niix writes the slices as stored and an
    equidistant resampling, ``<name>_Eq_1.nii``. Any other split is an error.
    """
    if len(outputs) == 1:
        return outputs[0], None
    equidistant = [path for path in outputs if "_Eq_" in path.name]
    if len(outputs) == 2 and len(equidistant) == 1:
        return next(path for path in outputs if path != equidistant[0]), equidistant[0]
    raise ConversionError(
        f"dcm2niix split the series into {len(outputs)} volumes (gantry tilt or mixed geometry); "
        "the series cannot be scored as one volume"
    )


def _space_evenly(stored: Path, equidistant: Path) -> None:
    """Unevenly spaced slices are scored as stored, one slice per image, at their mean
    increment (z coverage / (n - 1)), rather than on dcm2niix's interpolated
    resampling: interpolating between slices lowers calcium peaks below the 130 HU
    threshold and changes Agatston scores far more than the spacing does.

    The NIfTI affine of the stored slices cannot hold varying steps; dcm2niix gives
    it one of them. Its slice axis is set to the mean step, taken from the
    equidistant volume, which spans the true first-to-last extent. Only the header
    changes; slice positions are then approximate (within the spacing deviation).
    """
    image, resampled = nib.load(stored), nib.load(equidistant)
    if image.ndim != 3 or resampled.ndim != 3 or min(image.shape[2], resampled.shape[2]) < 2:
        raise ConversionError("dcm2niix wrote unevenly spaced slices that cannot be put on one grid")
    n, n_resampled = image.shape[2], resampled.shape[2]
    extent = float(np.linalg.norm(resampled.affine[:3, 2])) * (n_resampled - 1)
    direction = image.affine[:3, 2] / np.linalg.norm(image.affine[:3, 2])
    affine = image.affine.copy()  # the origin is the first stored slice: a true position
    affine[:3, 2] = direction * extent / (n - 1)
    with open(stored, "rb") as handle:  # the header as stored (a loaded image's has its scaling reset)
        header = nib.Nifti1Header.from_fileobj(handle)
    header.set_qform(affine, code=int(header["qform_code"]) or 1)
    header.set_sform(affine, code=int(header["sform_code"]) or 1)
    block = header.binaryblock
    with open(stored, "r+b") as handle:
        handle.write(block)


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
