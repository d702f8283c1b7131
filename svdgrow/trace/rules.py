"""Per-op rules: what each followed op does to the layouts and groups it touches.

Each rule takes the :class:`GroupBuilder` and the fx node (and, where the op acts on one tensor,
that tensor's node ``x``) and returns the node's value: a :class:`Layout`, an :class:`Opaque`
or None. :mod:`svdgrow.trace.dispatch` picks the rule; anything a rule cannot follow goes to
``builder.opaque``, which freezes the groups involved. :mod:`svdgrow.trace.optable` lists the
ops; ``docs/design.md`` (section "Stage 1: trace") gives the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .builder import GroupBuilder
from .groups import Layout, Opaque
from .optable import (
    IDENTITY_FUNCS,
    IDENTITY_METHODS,
    SHIFT_FUNCS,
    SHIFT_MODULES,
    call_arg,
    input_arg,
)

__all__ = [
    "cat",
    "expand",
    "getitem",
    "join_layouts",
    "pad",
    "pad_function",
    "pass_module",
    "passthrough",
    "permute",
    "prelu",
    "reduce",
    "repeat",
    "reshape",
    "softmax",
]

_FULL = slice(None, None, None)

# ---- modules: rule(builder, node, module, x) -----------------------------------------


def pass_module(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """An activation/dropout/pooling module (not one that also returns pooling indices)."""
    if getattr(m, "return_indices", False):
        return b.opaque(node)
    return passthrough(b, node, x)


def prelu(b: GroupBuilder, node: torch.fx.Node, m: nn.PReLU, x: torch.fx.Node) -> Any:
    """PReLU with one shared slope passes through; one slope per channel is not followed."""
    if m.num_parameters == 1:
        return passthrough(b, node, x)
    return b.opaque(node)


# ---- ops on one tensor: rule(builder, node, x) ------------------------------------------


def passthrough(b: GroupBuilder, node: torch.fx.Node, x: Any, check_others: bool = True) -> Any:
    """Elementwise / spatial-only ops: the layout of ``x`` goes through unchanged.

    With ``check_others``, any other channel-carrying argument makes the op opaque.
    """
    lay = b.layout(x)
    if lay is None:
        return b.opaque(node)
    if check_others and any(b.carries_channels(a) for a in b.inputs(node) if a is not x):
        return b.opaque(node)
    xs, ys = b.shape(x), b.shape(node)
    if xs is None or ys is None or len(ys) < 2 or ys[:2] != xs[:2]:
        return b.opaque(node)
    if lay.dim != 1 and ys != xs:  # channels-last values: elementwise ops only
        return b.opaque(node)
    t = node.target
    identity_like = (
        (node.op == "call_module" and isinstance(b.modules.get(str(t)), nn.Identity))
        or (node.op == "call_method" and t in IDENTITY_METHODS)
        or (node.op == "call_function" and t in IDENTITY_FUNCS)
    )
    # a norm after an identity-like op still follows the producer directly
    if identity_like:
        return Layout(lay.segs, lay.block, lay.producer, lay.sources, lay.dim)
    if _keeps_shifts(b, node):  # a constant may still be folded across it
        return Layout(lay.segs, lay.block, sources=lay.direct_sources(), dim=lay.dim)
    return Layout(lay.segs, lay.block, dim=lay.dim)


def _keeps_shifts(b: GroupBuilder, node: torch.fx.Node) -> bool:
    """``node`` commutes with adding a per-channel constant (pooling, dropout)."""
    if node.op == "call_function":
        return node.target in SHIFT_FUNCS
    m = b.modules.get(str(node.target)) if node.op == "call_module" else None
    if not isinstance(m, SHIFT_MODULES):
        return False
    pads = getattr(m, "padding", 0)
    padded = any(pads) if isinstance(pads, (tuple, list)) else bool(pads)
    return not (padded and getattr(m, "count_include_pad", False))


def pad(b: GroupBuilder, node: torch.fx.Node, x: Any, n_pad: int) -> Any:
    """Padding by ``n_pad`` numbers (two per trailing dim): followed when it is spatial only."""
    xs = b.shape(x)
    if xs is None or n_pad % 2 or len(xs) - n_pad // 2 <= 1:
        return b.opaque(node, f"padding over the channel dim: {b.describe_op(node)}")
    return passthrough(b, node, x)


def pad_function(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """``F.pad(x, pad)`` with a literal ``pad``."""
    widths = call_arg(node, 1, "pad")
    if not isinstance(widths, (list, tuple)) or not all(isinstance(p, int) for p in widths):
        return b.opaque(node)
    return pad(b, node, input_arg(node), len(widths))


def softmax(b: GroupBuilder, node: torch.fx.Node, x: Any, dim: Any) -> Any:
    """Softmax passes through; over channels it freezes the group, deferred to the end."""
    out = passthrough(b, node, x)
    xs = b.shape(x)
    if not isinstance(out, Layout) or xs is None:
        return out
    if dim is None:
        dim = 0 if len(xs) in (0, 1, 3) else 1
    if not isinstance(dim, int):
        return b.opaque(node)
    if dim % len(xs) == 1:
        for s in out.segs:
            b.groups.defer_freeze(s, f"softmax over channels ({b.describe_op(node)})")
    return out


def reshape(b: GroupBuilder, node: torch.fx.Node, x: Any) -> Any:
    """view/reshape/flatten/squeeze...: follow it when channels stay channel-major."""
    lay = b.layout(x)
    xs, ys = b.shape(x), b.shape(node)
    if lay is None or xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        return b.opaque(node)
    if ys[0] != xs[0]:
        return b.opaque(node, f"reshape across the batch dim: {b.describe_op(node)}")
    channels, rem = divmod(xs[1], lay.block)
    if rem or channels == 0 or ys[1] % channels:
        return b.opaque(node, f"reshape that mixes channels: {b.describe_op(node)} ({xs} -> {ys})")
    # row-major reshape keeping dim 0: output index i along dim 1 holds channel
    # i // (ys[1] / channels) whenever channels divides ys[1] (channel-major blocks)
    return Layout(lay.segs, ys[1] // channels)


def expand(b: GroupBuilder, node: torch.fx.Node, x: Any) -> Any:
    """``x.expand(...)``: followed when batch and channel sizes stay."""
    xs, ys = b.shape(x), b.shape(node)
    if xs and ys and len(xs) == len(ys) and xs[:2] == ys[:2]:
        return passthrough(b, node, x, check_others=False)
    return b.opaque(node)


def reduce(b: GroupBuilder, node: torch.fx.Node, x: Any) -> Any:
    """mean/sum/amax... over spatial dims only."""
    xs = b.shape(x)
    dim = call_arg(node, 1, "dim", "axis")
    if isinstance(dim, int):
        dim = [dim]
    if xs is None or not isinstance(dim, (list, tuple)) or not dim:
        return b.opaque(node)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dim):
        return b.opaque(node)
    if {d % len(xs) for d in dim} & {0, 1}:
        return b.opaque(node, f"reduction over the batch or channel dim: {b.describe_op(node)}")
    return passthrough(b, node, x)


def _permutation(node: torch.fx.Node, n: int) -> list[int] | None:
    """For a permute/transpose of an ``n``-D tensor, the input dim of every output dim (None
    when the dims are not literal ints)."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name == "permute":
        args = list(node.args[1:])
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = list(dims or node.kwargs.get("dims", []))
        if len(dims) != n or not all(isinstance(d, int) for d in dims):
            return None
        return [d % n for d in dims]
    dims = [call_arg(node, 1, "dim0", "axis0"), call_arg(node, 2, "dim1", "axis1")]
    if not all(isinstance(d, int) for d in dims):
        return None
    order = list(range(n))
    i, j = dims[0] % n, dims[1] % n
    order[i], order[j] = order[j], order[i]
    return order


def permute(b: GroupBuilder, node: torch.fx.Node, x: Any) -> Any:
    """permute/transpose that keeps the batch dim first and puts the channels in dim 1 or, for
    a channels-last value (ConvNeXt's blocks), in the last dim."""
    xs, lay = b.shape(x), b.layout(x)
    if xs is None or lay is None:
        return b.opaque(node)
    order = _permutation(node, len(xs))
    if order is not None and order[0] == 0:
        new = order.index(lay.dim)
        if new == 1 or (lay.block == 1 and new == len(xs) - 1):
            return Layout(lay.segs, lay.block, dim=new)
    return b.opaque(node, f"permute/transpose that moves channels: {b.describe_op(node)}")


def repeat(b: GroupBuilder, node: torch.fx.Node, x: Any) -> Any:
    """repeat/tile: followed along other dims; tiling channels freezes the groups."""
    lay, xs = b.layout(x), b.shape(x)
    reps = list(node.args[1:])
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = list(reps[0])
    if not reps:
        reps = call_arg(node, 1, "repeats", "dims", "sizes", default=[])
        reps = list(reps) if isinstance(reps, (list, tuple)) else [reps]
    if lay is None or xs is None or not reps or not all(isinstance(r, int) for r in reps):
        return b.opaque(node)
    if node.target == "tile" or node.target is getattr(torch, "tile", None):
        reps = [1] * (len(xs) - len(reps)) + reps
    if len(reps) != len(xs):
        return b.opaque(node)
    times = reps[1]
    if times == 1:
        return Layout(lay.segs, lay.block)
    if lay.block != 1:
        return b.opaque(node)
    out = Layout(lay.segs * times, 1)
    b.groups.freeze(
        lay.segs,
        f"channel tiling by {b.describe_op(node)} (channel j copies input channel j mod "
        "C): a tiled group cannot be resized consistently",
    )
    return out


def _keeps_all(i: Any, size: int) -> bool:
    """Index ``i`` along a dim of ``size`` is a slice that keeps every entry in order."""
    return (
        isinstance(i, slice)
        and i.step in (None, 1)
        and i.start in (None, 0)
        and (i.stop is None or (isinstance(i.stop, int) and i.stop >= size))
    )


def getitem(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """``x[...]``: followed when it keeps the batch dim and every channel."""
    x, idx = node.args[0], node.args[1]
    v = b.value_of(x)
    if isinstance(v, Opaque):
        return v
    lay = b.layout(x)
    if lay is None:
        return None
    xs = b.shape(x)
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1 or xs is None:
        return b.opaque(node, f"indexing that moves channels: {b.describe_op(node)}")
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (_FULL,) * (len(xs) - len(idx) + 1) + idx[k + 1 :]
    lead = list(idx[:2]) + [_FULL] * (2 - len(idx[:2]))
    if not (isinstance(lead[0], slice) and _keeps_all(lead[1], xs[1])):
        return b.opaque(node, f"indexing that selects channels: {b.describe_op(node)}")
    if not all(isinstance(i, (slice, int)) for i in idx[2:]) or any(
        isinstance(i, torch.fx.Node) for i in idx
    ):
        return b.opaque(node)
    return passthrough(b, node, x, check_others=False)


# ---- ops on several tensors: rule(builder, node) ----------------------------------------


def join_layouts(
    b: GroupBuilder, node: torch.fx.Node, layouts: Sequence[Layout], joined_in: str, mismatch: str
) -> Layout:
    """The layout of a value that joins ``layouts`` channel for channel (a sum, a concatenation
    along another dim than channels).

    Layouts with one signature are unioned segment by segment (a group appearing twice then
    is frozen as tiling in ``joined_in``) and the first is returned. Otherwise all their groups
    are frozen for ``mismatch`` and the output gets a fresh frozen group.
    """
    if b.union_layouts(layouts):
        b.freeze_repeated_groups(layouts[0], node, joined_in)
        return layouts[0]
    b.groups.freeze([s for x in layouts for s in x.segs], mismatch)
    ys = b.shape(node)
    block = layouts[0].block if len({x.block for x in layouts}) == 1 else 1
    width = ys[1] // block if ys is not None and len(ys) >= 2 else None
    g = b.groups.new_group(
        f"opaque:{node.name}", width, frozen=f"output of {node.name!r} mixes layouts"
    )
    return Layout((g,), block, dim=layouts[0].dim)


def cat(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """``torch.cat``: along channels the segments are concatenated, along another dim the
    operands' groups are unioned."""
    tensors = call_arg(node, 0, "tensors")
    dim = call_arg(node, 1, "dim", "axis", default=0)
    ys = b.shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or ys is None:
        return b.opaque(node)
    if len(ys) < 2:
        return b.opaque(node)
    if any(b.shape(t) is None or len(b.shape(t)) != len(ys) for t in tensors):
        return b.opaque(node)
    lays = [b.layout_or_frozen(t, f"operand of {node.name!r}") for t in tensors]
    if len({x.dim for x in lays}) != 1:
        return b.opaque(node)
    if dim % len(ys) == lays[0].dim:
        if len({x.block for x in lays}) != 1:
            return b.opaque(
                node, f"concatenation of differently flattened values: {b.describe_op(node)}"
            )
        sources = tuple(p for x in lays for p in x.direct_sources())
        segs = tuple(s for x in lays for s in x.segs)
        out = Layout(segs, lays[0].block, sources=sources, dim=lays[0].dim)
        b.freeze_repeated_groups(out, node, "one concatenation")
        return out
    out = join_layouts(
        b,
        node,
        lays,
        "one concatenation",
        f"{b.describe_op(node)} joins values with different channel layouts along dim {dim}",
    )
    return Layout(out.segs, out.block, dim=out.dim)
