"""Shared fixtures of the application tests: the dataset folder, and a tiny finished run."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared dataset folder (the test is skipped, with the reason, when MNIST is absent)."""
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found in {DATA} (the shared dataset folder); this test reads it")
    return DATA
