import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CACFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PHANTOM_DIR = SHARED_DATA / "qrm-phantom-canon"


@pytest.fixture
def phantom_dir() -> Path:
    if not PHANTOM_DIR.is_dir():
        pytest.skip(f"the real QRM phantom scan is not at {PHANTOM_DIR}")
    return PHANTOM_DIR
