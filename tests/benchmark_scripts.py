"""Loading the scripts of benchmarks/ in tests: they are scripts run from the repository, not
a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ goes on sys.path for its own imports).
    Skips the calling test, or the whole test module when called at import, where the
    repository's benchmarks/ is not beside the tests (an installed package)."""
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"benchmarks/{name}.py is not beside the tests", allow_module_level=True)
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
