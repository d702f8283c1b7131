"""Resizing a model passed through ``torch.compile``.

A compiled model (``torch.compile(model)``, an ``OptimizedModule``) runs graphs specialised to
the parameter shapes it was compiled for, guarded by checks on those shapes. After a resize the
guards fail and the next call compiles again, so a stale graph is never run; but the old graphs
stay cached, and once a function has been compiled ``torch._dynamo.config.recompile_limit``
times torch silently runs it eagerly. So a :class:`~svdgrow.Resizer` given a compiled model
resizes the module it wraps and, after every change of width, calls :func:`after_resize`
(``torch.compiler.reset()``: every cached graph is dropped, the next call compiles the new
shapes from scratch). See docs/design.md, "Resizing under DDP and torch.compile".

Example::

    model = torch.compile(make_model())
    resizer = Resizer(model, example, optimizer=opt)   # resizes model._orig_mod
    ...
    report = resizer.step(data=x)                      # next model(x) compiles the new shapes
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["after_resize", "is_compiled", "unwrap_compiled"]


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (an ``OptimizedModule``)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    return isinstance(model, sys.modules["torch._dynamo"].eval_frame.OptimizedModule)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``model`` itself when not compiled)."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def after_resize() -> None:
    """Drop every graph ``torch.compile`` cached (``torch.compiler.reset()``): call it after a
    width changed. The next call of a compiled model compiles the new shapes; this is global,
    so other compiled functions of the process compile again too."""
    torch.compiler.reset()
