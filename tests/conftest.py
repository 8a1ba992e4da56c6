from pathlib import Path

import pytest
from shared_data import PHANTOM_DIR


@pytest.fixture
def phantom_dir() -> Path:
    if not PHANTOM_DIR.is_dir():
        pytest.skip(f"the real QRM phantom scan is not at {PHANTOM_DIR}")
    return PHANTOM_DIR
