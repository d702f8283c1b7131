"""Shared pytest setup: the ``needs_cuda`` mark.

Tests (or parameter cases) marked ``needs_cuda`` are skipped, and reported as skipped, where
``torch.cuda.is_available()`` is False, so CUDA cases show up on every machine rather than
vanishing.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_cuda: the test needs a CUDA GPU; skipped where none is available"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
