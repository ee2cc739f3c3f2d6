"""Fixtures shared by the whole test suite."""

import os
from pathlib import Path

import pytest

# The real NWB files and the bug-case files sit in a `shared/data` folder beside the checkout.
SHARED_DATA = Path(os.environ.get("NEURPIR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return the folder of real NWB files and bug-case files.

    The tests that need it fail when it is missing and ``CI=true``, and skip otherwise.
    """
    if SHARED_DATA.is_dir():
        return SHARED_DATA

    message = f"shared test data not found at {SHARED_DATA}; set NEURPIR_SHARED_DATA to its folder"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
