import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPIFLOW_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _need(path: Path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set EPIFLOW_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _need(FIXTURES, "golden fixtures")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA, "shared real data")
