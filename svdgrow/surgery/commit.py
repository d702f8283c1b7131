"""The resize transaction: every new tensor is made by ONE ``svdgrow.ops.slice_copy`` call, and
nothing is assigned until all of them exist and are finite; the assignments go through a
:class:`Journal` that restores them all when one fails. See docs/design.md, "Stage 4: surgery".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .._utils import all_finite
from .plan import ResizePlan

__all__ = ["Journal", "check_finite", "commit_plan"]

_MISSING = object()


class Journal:
    """Rollback journal: every assignment is recorded, and :meth:`rollback` undoes them all in
    reverse order."""

    def __init__(self):
        self._undo: list[tuple] = []

    def setattr(self, obj, name: str, value) -> None:
        """``setattr(obj, name, value)``, recorded."""
        self._undo.append(("attr", obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def param_data(self, p: Tensor, value: Tensor) -> None:
        """``p.data = value``, recorded."""
        self._undo.append(("data", p, None, p.data))
        p.data = value

    def setitem(self, d: dict, key, value) -> None:
        """``d[key] = value``, recorded (a key that was missing is removed on rollback)."""
        self._undo.append(("item", d, key, d[key] if key in d else _MISSING))
        d[key] = value

    def rollback(self) -> None:
        """Undo every recorded assignment, newest first."""
        while self._undo:
            kind, obj, key, old = self._undo.pop()
            if kind == "attr":
                setattr(obj, key, old)
            elif kind == "data":
                obj.data = old
            elif old is _MISSING:
                obj.pop(key, None)
            else:
                obj[key] = old


def commit_plan(plan: ResizePlan) -> None:
    """Apply a plan all-or-nothing.

    Makes every new tensor in one ``svdgrow.ops.slice_copy`` call, checks the computed ones
    (not the optimizer state, which is only copied) are finite, then assigns everything, sets
    the width attributes and clears the resized parameters' gradients through a
    :class:`Journal`.

    Args:
        plan: from :func:`svdgrow.surgery.build_plan`.

    Raises:
        FloatingPointError: a new tensor holds NaN/inf; nothing was changed.
    """
    moves = plan.moves
    new = ops.slice_copy(
        [mv.src for mv in moves],
        [mv.rows for mv in moves],
        [mv.cols for mv in moves],
        [mv.block for mv in moves],
        None,
    )
    computed = [(mv, t) for mv, t in zip(moves, new, strict=True) if mv.kind != "state"]
    if computed and not bool(all_finite([t for _, t in computed])):
        bad = [mv.key for mv, t in computed if not torch.isfinite(t).all()]
        raise FloatingPointError(
            f"resize produced non-finite values for {bad}; nothing was changed"
        )
    journal = Journal()
    try:
        for mv, t in zip(moves, new, strict=True):
            if mv.kind == "param":
                journal.param_data(mv.owner, t)
            else:
                journal.setitem(mv.owner, mv.key, t)
        for obj, name, value in plan.attrs:
            journal.setattr(obj, name, value)
        for mv in moves:
            if mv.kind == "param" and mv.owner.grad is not None:
                journal.setattr(mv.owner, "grad", None)
    except BaseException:
        journal.rollback()
        raise


def check_finite(model: nn.Module) -> None:
    """Refuse to resize a model that holds NaN/inf (one reduction when all is well).

    Args:
        model: the network.

    Raises:
        FloatingPointError: naming the first parameter or buffer that holds NaN/inf.
    """
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if bool(all_finite(list(model.parameters()) + buffers)):
        return
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(
                f"parameter {name!r} holds NaN/inf: refusing to resize (nothing was changed). "
                "Lower the learning rate or clip gradients, or reload a checkpoint."
            )
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise FloatingPointError(
                f"buffer {name!r} holds NaN/inf: refusing to resize (nothing was changed)"
            )
