"""Where the read-only shared data lives (the real QRM phantom scan and its reference
masses): ``../shared/data`` beside the repository, or ``$CACFLOW_SHARED_DATA``.
One definition for every test module and the bad-input corpus."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CACFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PHANTOM_DIR = SHARED_DATA / "qrm-phantom-canon"
PHANTOM_REFERENCE_CSV = SHARED_DATA / "qrm-phantom-canon.reference.csv"
