"""svdgrow: let a network find its own layer widths while it trains, from each layer's spectrum.

The library only: ``import svdgrow`` never loads the training application (``svdgrow.app``).
Stages and their numbers: docs/design.md, "The data flow of one resize".
"""

import os as _os

import torch  # noqa: F401  (loads libc10/libtorch, which svdgrow._C links against)

try:
    from svdgrow import _C  # noqa: F401  (registers torch.ops.svdgrow.*)
except ImportError as e:  # pragma: no cover - depends on how svdgrow was installed
    raise ImportError(
        f"svdgrow's compiled extension (svdgrow._C) could not be loaded from "
        f"{_os.path.dirname(__file__)}: {e}. Build it with `pip install --no-build-isolation .` "
        "(or `pip install --no-build-isolation -e .` to build it in this source tree). If you "
        "installed svdgrow and run Python from the repository root, the source folder hides "
        "the installed package: run from another folder, or use `python -P`."
    ) from e

from svdgrow import ops, trace  # noqa: E402  (after _C: ops registers fakes for its schemas)
from svdgrow.cost import CostModel  # noqa: E402
from svdgrow.policy import Decision, Policy  # noqa: E402
from svdgrow.resizer import Resizer, StepReport  # noqa: E402
from svdgrow.spectrum import GroupSpectrum  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CostModel",
    "Decision",
    "GroupSpectrum",
    "Policy",
    "Resizer",
    "StepReport",
    "ops",
    "trace",
]
