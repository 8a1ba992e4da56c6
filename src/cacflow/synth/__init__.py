"""Synthetic cardiac CT with exact coronary calcium ground truth (see docs/synth.md).

- ``cacflow.synth.phantom``: ``generate_phantom(seed, PhantomSettings) -> Phantom``
- ``cacflow.synth.dicom_writer``: ``write_series(...)``, a phantom as a DICOM CT series
- ``cacflow.synth.cohort``: ``generate_cohort(...)``, DICOM archive, manifest, ground truth

Import the module you need: the phantom alone does not load pydicom or nibabel.
"""
