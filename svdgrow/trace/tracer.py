"""``trace()``: run torch.fx on a model, propagate shapes, and walk the graph into coupling groups.

Submodules torch.fx cannot trace into are kept as opaque leaves (their channels frozen) unless
``strict``; ``docs/design.md`` (section "Stage 1: trace") describes the whole stage.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .._utils import as_args, eval_mode
from .builder import GroupBuilder
from .dispatch import walk
from .graph import CouplingGraph, CouplingWarning

__all__ = ["trace"]


class _FallbackTracer(torch.fx.Tracer):
    """An fx tracer that can keep submodules it fails to trace into as opaque leaves."""

    def __init__(self, strict: bool, leaf_modules: Sequence[type | str] = ()) -> None:
        super().__init__()
        self.strict = strict
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.failed: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.failed or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        qualname = self.path_of_module(m)
        if self.strict or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = next(reversed(self.graph.nodes), None)
        stack_len = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure inside: fall back to a leaf
            while len(self.module_stack) > stack_len:
                self.module_stack.popitem(last=True)
            for node in reversed(list(self.graph.nodes)):
                if node is last:
                    break
                self.graph.erase_node(node)
            self.failed[qualname] = f"{type(e).__name__}: {e}".splitlines()[0]
            return super().call_module(m, forward, args, kwargs)


def _fx_error(model: nn.Module, e: Exception, strict: bool) -> TypeError:
    """The error for a model torch.fx cannot trace, with what to change."""
    hint = (
        "Make the untraceable parts leaf modules (trace(..., leaf_modules=[TheirClass]) or "
        "move them into a submodule), wrap untraceable free functions with torch.fx.wrap, "
    )
    hint += (
        "or call trace(..., strict=False), which keeps each submodule that fails to trace "
        "as an opaque leaf (its channels frozen)."
        if strict
        else "or remove data-dependent control flow from the top-level forward."
    )
    return TypeError(
        f"svdgrow.trace: torch.fx could not trace {type(model).__name__} "
        f"({type(e).__name__}: {e}). {hint}"
    )


def _propagate_shapes(model: nn.Module, gm: torch.fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` (the traced ``model``) once on ``args`` in eval mode without gradients, so
    that every node records the shape of its tensor; training flags are restored after."""
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise ValueError(
            f"svdgrow.trace: running {type(model).__name__} on the example input (shapes "
            f"{shapes}) failed: {type(e).__name__}: {e}. Pass an input batch the model accepts, "
            "on the model's device."
        ) from e


def trace(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    strict: bool = False,
    leaf_modules: Sequence[type | str] = (),
) -> CouplingGraph:
    """Find the coupling groups of ``model``.

    Args:
        model: the network. It is run once on ``example_input`` (in eval mode, under
            ``torch.no_grad``; each module's training flag is restored afterwards, and
            BatchNorm running statistics are not touched).
        example_input (Tensor[N, C, ...] or a tuple of them): an input batch, on the
            model's device. Use ``N >= 2``.
        strict: raise a ``ValueError`` on anything that would freeze a group (other than
            model input and output) instead of warning; also fail when torch.fx cannot
            trace a submodule instead of keeping it as an opaque leaf.
        leaf_modules: module classes or qualified names that torch.fx must not trace into;
            they are treated as opaque ops (the groups they touch are frozen).

    Returns:
        The coupling graph: groups, consumer layouts and warnings.

    Warns:
        CouplingWarning: once per op that freezes groups which were not frozen yet (the same
            lines are in ``CouplingGraph.warnings``).

    Raises:
        TypeError: torch.fx cannot trace the model (the message says what to do).
        ValueError: ``strict=True`` and an op forces a group to be frozen, or the model
            fails on ``example_input``.
    """
    args = as_args(example_input)
    tracer = _FallbackTracer(strict, leaf_modules)
    try:
        graph = tracer.trace(model)
        graph.lint()
    except Exception as e:
        raise _fx_error(model, e, strict) from e
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)

    _propagate_shapes(model, gm, args)

    builder = GroupBuilder(gm, strict, tracer.failed)
    for name, err in tracer.failed.items():
        builder.groups.messages.append(
            f"torch.fx could not trace into module {name!r} ({err}); it is kept as an opaque "
            "leaf (pass it in leaf_modules to silence this)"
        )
    result = walk(builder)
    for msg in result.warnings:
        warnings.warn(f"svdgrow.trace: {msg}", CouplingWarning, stacklevel=2)
    return result
