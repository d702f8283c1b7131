"""Broadcasting adds and products: residual unions, squeeze-and-excitation gates, and per-channel
parameters used as scales or shifts.

``binary`` sorts the operands of an add/sub/mul/div into layouts coupled channel for channel,
groups broadcast across channels, and per-channel constants, then:

* layouts coupled by an add are unioned (``rules.join_layouts``);
* a product of a full-size value and a *gate* of the same channels (broadcast over every other
  dim, ``[N, C, 1, 1]``, or computed from the value: squeeze-and-excitation) unions the two
  channel spaces; the gate's producers become per-channel layers of the group (their rows
  follow its channels, but they are not producers of its spectrum);
* a parameter or buffer with one entry per channel (``x * self.gamma``, possibly through views)
  follows the groups as a ``"param"`` entry of ``CouplingGraph.channelwise``.

Everything else that couples channels freezes them. ``docs/design.md`` ("Stage 1: trace").
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .builder import GroupBuilder
from .graph import ChannelwiseLayout
from .groups import Layout, Opaque
from .optable import (
    IDENTITY_FUNCS,
    IDENTITY_METHODS,
    RESHAPE_FUNCS,
    RESHAPE_METHODS,
    call_arg,
    input_arg,
)
from .rules import join_layouts

__all__ = ["binary", "param_source"]

# ops that only reshape a tensor: on a vector (one dim > 1), they keep its entries in order
_VIEW_METHODS = RESHAPE_METHODS | IDENTITY_METHODS | {"expand", "expand_as", "permute", "transpose"}
_VIEW_FUNCS = RESHAPE_FUNCS | IDENTITY_FUNCS | {torch.permute, torch.transpose}


def _operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [
        a for a in (input_arg(node), call_arg(node, 1, "other")) if isinstance(a, torch.fx.Node)
    ]


def _channel_dim(b: GroupBuilder, node: torch.fx.Node, ndim: int) -> int:
    """The channel dim of the output: that of the first operand with a full-rank layout."""
    for a in _operands(node):
        lay, s = b.layout(a), b.shape(a)
        if lay is not None and s is not None and len(s) == ndim:
            return lay.dim
    return 1


def _sort_operands(b: GroupBuilder, node: torch.fx.Node, ndim: int, channels: int, d: int):
    """Split the operands of a broadcasting op with ``channels`` channels in output dim ``d``
    into (node, layout) pairs coupled channel for channel, groups broadcast across channels,
    and nodes of per-channel constants or untracked tensors."""
    coupled: list[tuple[torch.fx.Node, Layout]] = []
    broadcast: list[int] = []
    per_channel: list[torch.fx.Node] = []
    for a in _operands(node):
        s, lay = b.shape(a), b.layout(a)
        if s is None:
            if isinstance(b.value_of(a), Opaque) and channels > 1:
                per_channel.append(a)
            continue
        if lay is not None and len(s) == ndim and lay.dim == d and s[d] == channels:
            coupled.append((a, lay))
            continue
        if lay is not None:
            broadcast += list(lay.segs)
        j = d - ndim + len(s)  # the operand's dim that broadcasts onto the channel dim
        if j >= 0 and s[j] == channels and channels > 1:
            per_channel.append(a)
    return coupled, broadcast, per_channel


def _is_gate(shape: tuple[int, ...], out: tuple[int, ...], d: int) -> bool:
    """``shape`` is broadcast over every dim of ``out`` but the batch and channel dims, and
    ``out`` has such a dim wider than 1 (so a gate and a full-size value can be told apart)."""
    others = [i for i in range(len(out)) if i not in (0, d)]
    return all(shape[i] == 1 for i in others) and any(out[i] > 1 for i in others)


def _depends_on(b: GroupBuilder, n: torch.fx.Node, other: torch.fx.Node) -> bool:
    """``n`` is computed from ``other`` (searching back no further than ``other``)."""
    stop = b.node_index[other]
    seen, todo = set(), [n]
    while todo:
        cur = todo.pop()
        if cur is other:
            return True
        if cur in seen or b.node_index.get(cur, -1) < stop:
            continue
        seen.add(cur)
        todo.extend(b.inputs(cur))
    return False


def _value_and_gate(b: GroupBuilder, coupled, ys):
    """Which of two coupled operands is the value and which the gate: the one broadcast over
    every other dim is the gate, or else the one computed from the other (at a 1x1 map a
    squeeze-and-excitation gate has the value's shape). None when neither is."""
    (a, la), (g, lg) = coupled
    a_gate, g_gate = (_is_gate(b.shape(n), ys, la.dim) for n in (a, g))
    if a_gate != g_gate:
        return ((g, lg), (a, la)) if a_gate else ((a, la), (g, lg))
    if not a_gate and b.shape(a) == b.shape(g) == ys:
        if _depends_on(b, g, a):
            return (a, la), (g, lg)
        if _depends_on(b, a, g):
            return (g, lg), (a, la)
    return None


def _gate(b: GroupBuilder, node: torch.fx.Node, coupled, ys) -> Layout | None:
    """The product of a value and a gate of the same channels (see :func:`_value_and_gate`):
    the gate's groups are unioned into the value's, their producers demoted to per-channel
    layers. None when ``coupled`` is not such a pair of one layout signature."""
    pair = _value_and_gate(b, coupled, ys) if len(coupled) == 2 else None
    if pair is None:
        return None
    (_, la), (_, lg) = pair
    if b.shape(pair[0][0]) != ys or b.layout_signature(la) != b.layout_signature(lg):
        return None
    for seg in lg.segs:
        r = b.groups.record(seg)
        if r.frozen:
            continue  # the union below freezes the value's groups too
        for idx, p in r.producers:
            b.channelwise[p] = ChannelwiseLayout(p, [seg], "layer")
            r.channelwise.append((idx, p))
        r.producers.clear()
    b.union_layouts([la, lg])
    b.freeze_repeated_groups(la, node, "one gated product")
    return Layout(la.segs, la.block, dim=la.dim)


def param_source(b: GroupBuilder, n: torch.fx.Node, channels: int):
    """The parameter or buffer behind operand ``n`` when ``n`` is one (through views, each
    node used once) with one entry per channel in its dim 0 or 1: ``(get_attr node, dim)``;
    else None."""
    while n.op != "get_attr":
        ok_method = n.op == "call_method" and n.target in _VIEW_METHODS
        ok_func = n.op == "call_function" and (n.target in _VIEW_FUNCS or _plain_index(n))
        if not (ok_method or ok_func) or len(n.users) != 1 or not n.args:
            return None
        if not isinstance(n.args[0], torch.fx.Node):
            return None
        n = n.args[0]
    if len(n.users) != 1:
        return None
    t = b.gm
    for part in str(n.target).split("."):
        t = getattr(t, part, None)
    if not isinstance(t, torch.Tensor) or t.numel() != channels:
        return None
    dims = [i for i, s in enumerate(t.shape) if s == channels]
    return (n, dims[0]) if len(dims) == 1 and dims[0] in (0, 1) else None


def _plain_index(n: torch.fx.Node) -> bool:
    """``x[...]`` with only None, Ellipsis and full slices: adds dims, keeps every entry."""
    if n.target is not operator.getitem or len(n.args) != 2:
        return False
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    full = slice(None, None, None)
    return all(i is None or i is Ellipsis or i == full for i in idx)


def _follow_params(b: GroupBuilder, node: torch.fx.Node, per_channel, out: Layout, kind: str):
    """Register each per-channel operand as a ``"param"`` entry following ``out``; returns the
    names of those that cannot be (not a parameter or buffer with one entry per channel)."""
    left = []
    channels = b.shape(node)[out.dim]
    for a in per_channel:
        src = param_source(b, a, channels) if out.block == 1 else None
        if src is None:
            left.append(a.name)
            continue
        attr, dim = src
        name = str(attr.target)
        grow = "zero" if kind == "add" else "mean"
        b.register_channelwise(name, node, out, "param", dim=dim, grow_value=grow)
        b.param_uses.setdefault(name, set()).add(attr)
    return left


def binary(b: GroupBuilder, node: torch.fx.Node, kind: str) -> Any:
    """Broadcasting add/sub (``kind="add"``: unions groups) or mul/div (``"mul"``: scaling,
    or a squeeze-and-excitation gate)."""
    ys = b.shape(node)
    if ys is None or len(ys) < 2:
        return b.opaque(node)
    d = _channel_dim(b, node, len(ys))
    coupled, broadcast, per_channel = _sort_operands(b, node, len(ys), ys[d], d)
    if broadcast:
        b.groups.freeze(broadcast, f"operand broadcast across channels in {b.describe_op(node)}")
    if not coupled:
        return b.opaque(node)
    lays = [lay for _, lay in coupled]
    same = all(b.layout_roots(x) == b.layout_roots(lays[0]) for x in lays)
    out = lays[0]
    if kind == "mul" and len(lays) > 1 and not same:
        out = _gate(b, node, coupled, ys)
        if out is None:
            return b.opaque(
                node,
                f"channel-wise product of two activations in {b.describe_op(node)} (only a "
                "gate broadcast over every other dim, as in squeeze-and-excitation, is "
                "followed)",
            )
    elif len(lays) > 1:
        widths = [b.layout_signature(x)[1] for x in lays]
        out = join_layouts(
            b,
            node,
            lays,
            "one residual sum",
            f"residual add {b.describe_op(node)} sums values with different channel layouts "
            f"{widths}",
        )
    left = _follow_params(b, node, per_channel, out, kind)
    if left:
        b.groups.freeze(
            out.segs,
            f"per-channel constant or untracked tensor {left} in {b.describe_op(node)} (a "
            "parameter or buffer with one entry per channel is followed)",
        )
    return Layout(out.segs, out.block, dim=out.dim)
