"""Shared fixtures of the application tests: the dataset folder."""

import os
from pathlib import Path

import pytest


def _find_data() -> Path | None:
    """$SVDGROW_DATA, else the first ``shared/data`` beside the repository or above it (where
    the project's dataset folder sits next to the clone)."""
    env = os.environ.get("SVDGROW_DATA")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "MNIST" / "raw").is_dir():
            return parent / "shared" / "data"
    return None


DATA = _find_data()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared dataset folder (the test is skipped, with the reason, when MNIST is absent)."""
    if DATA is None or not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip("MNIST not found: set SVDGROW_DATA to a folder holding MNIST/raw")
    return DATA
