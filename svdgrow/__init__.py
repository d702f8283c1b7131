"""svdgrow: let a network find its own layer widths while it trains, from each layer's spectrum."""

import torch  # noqa: F401  (loads libc10/libtorch, which svdgrow._C links against)

try:
    from svdgrow import _C  # noqa: F401  (registers torch.ops.svdgrow.*)
except ImportError as e:  # pragma: no cover - depends on how svdgrow was installed
    import os as _os

    raise ImportError(
        f"svdgrow's compiled extension (svdgrow._C) could not be loaded from "
        f"{_os.path.dirname(__file__)}: {e}. Build it with `pip install --no-build-isolation .` "
        "(or `pip install --no-build-isolation -e .` to build it in this source tree). If you "
        "installed svdgrow and run Python from the repository root, the source folder hides "
        "the installed package: run from another folder, or use `python -P`."
    ) from e
from svdgrow import ops  # noqa: F401

__version__ = "0.1.0"

# Resizing API (spectrum -> policy -> surgery -> optimizer remap)
from svdgrow.policy import Decision, Policy  # noqa: E402
from svdgrow.resizer import Resizer, StepReport  # noqa: E402
from svdgrow.spectrum import GroupSpectrum  # noqa: E402
