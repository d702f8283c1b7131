"""Small helpers every stage shares: eval mode for a forward pass, input normalisation, and the
one-reduction finite check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["all_finite", "as_args", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block, then restore every submodule's own
    ``training`` flag (not one flag for all: a user may have frozen some BatchNorms)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def as_args(example) -> tuple:
    """The positional arguments a model is called with: a tuple/list is spread, anything else
    (one tensor) is the single argument."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """One 0-d bool tensor: every element of every floating tensor is finite.

    One float64 sum per tensor and one check for all (a sum is NaN/inf when any element is), so
    on a GPU the answer stays on the device until the caller reads it.
    """
    sums = [
        t.detach().sum(dtype=torch.float64) for t in tensors if t.is_floating_point() and t.numel()
    ]
    if not sums:
        return torch.tensor(True)
    return torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all()
