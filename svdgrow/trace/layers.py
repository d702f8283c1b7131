"""Rules for the layers that own weights: Conv2d and Linear (producers and consumers) and
BatchNorm (norms that follow one group).

Each is ``rule(builder, node, module, x)``, ``x`` being the layer's input node;
:mod:`svdgrow.trace.dispatch` calls them. A producer starts a group for its output (one group
per module, however often it is called); a consumer records the layout it reads, which
becomes its :class:`ConsumerLayout`.
"""

from __future__ import annotations

from typing import Any

import torch.fx
import torch.nn as nn

from .builder import GroupBuilder
from .groups import Layout

__all__ = ["batch_norm", "conv", "linear"]


def conv(b: GroupBuilder, node: torch.fx.Node, m: nn.Conv2d, x: torch.fx.Node) -> Any:
    """Conv2d: a consumer of ``x``'s layout and the producer of a new group."""
    name = str(node.target)
    xs, ys = b.shape(x), b.shape(node)
    if len(xs) != 4:
        return b.opaque(
            node,
            f"Conv2d {name!r} called on a {len(xs)}-D input (only batched [N, C, H, W] "
            "inputs are followed)",
        )
    lay = b.layout_or_frozen(x, f"input of {name!r}")
    if lay.block != 1:
        # channels merged by a reshape: the conv's input channels are not whole groups.
        # Freeze what flows in; the conv still reads (a frozen group) and produces.
        b.groups.freeze(lay.segs, f"Conv2d {name!r} reads a channel-merging reshape")
        g = b.groups.new_group(f"opaque:{x.name}", xs[1], f"reshaped input of {name!r}")
        lay = Layout((g,))
    if m.groups != 1:
        out = _register_producer(b, name, node, ys[1])
        b.groups.freeze(
            list(lay.segs) + [out],
            f"grouped convolution {name!r} (groups={m.groups}) ties its input and output channels",
        )
        return Layout((out,), 1, name)
    _register_consumer(b, name, node, lay)
    return Layout((_register_producer(b, name, node, ys[1]),), 1, name)


def linear(b: GroupBuilder, node: torch.fx.Node, m: nn.Linear, x: torch.fx.Node) -> Any:
    """Linear on a 2-D input: a consumer of ``x``'s layout and the producer of a new group."""
    name = str(node.target)
    xs, ys = b.shape(x), b.shape(node)
    if len(xs) != 2:
        return b.opaque(
            node,
            f"Linear {name!r} is applied to a {len(xs)}-D input (on its last dim, not on "
            "channels): it is not a channel consumer",
        )
    lay = b.layout_or_frozen(x, f"input of {name!r}")
    _register_consumer(b, name, node, lay)
    return Layout((_register_producer(b, name, node, ys[1]),), 1, name)


def batch_norm(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """BatchNorm: its parameters and buffers follow the one group it normalises."""
    name = str(node.target)
    lay = b.layout(x)
    if lay is None:
        return b.opaque(node)
    if len(lay.segs) != 1 or lay.block != 1:
        why = "a concatenation of groups" if len(lay.segs) != 1 else "a flattened value"
        b.groups.freeze(lay.segs, f"BatchNorm {name!r} normalises {why}")
        if lay.block == 1:  # surgery puts a folded constant into its running mean
            b.concat_norms.setdefault(name, list(zip(lay.segs, lay.direct_sources(), strict=True)))
        return Layout(lay.segs, lay.block)
    gid = lay.segs[0]
    if name in b.norm_group:  # one norm called on two values ties their channels
        gid = b.groups.union(b.norm_group[name], gid)
    else:
        b.norm_group[name] = gid
    r = b.groups.record(gid)
    if name in r.norm_after and r.norm_after[name] != lay.producer:
        r.norm_after[name] = None
    else:
        r.norm_after[name] = lay.producer
    r.norms.append((b.node_index[node], name))
    return Layout(lay.segs, 1)


def _register_producer(b: GroupBuilder, name: str, node: torch.fx.Node, width: int) -> int:
    """A group for the output of producer ``name``, the same for every call of it."""
    g = b.groups.new_group(name, width)
    b.groups.raw[g].producers.append((b.node_index[node], name))
    if name in b.producer_group:  # the module is called more than once
        g = b.groups.union(b.producer_group[name], g)
    else:
        b.producer_group[name] = g
    return g


def _register_consumer(b: GroupBuilder, name: str, node: torch.fx.Node, lay: Layout) -> None:
    """Record that consumer ``name`` reads ``lay``; a second call must read the same layout
    (its groups are unioned with the first call's), or both are frozen."""
    if name in b.consumer_segments:  # called more than once: both inputs share columns
        old = Layout(b.consumer_segments[name], b.consumer_block[name])
        if not b.union_layouts([old, lay]):
            b.groups.freeze(
                list(old.segs) + list(lay.segs),
                f"module {name!r} is called on inputs with different channel layouts",
            )
        return
    b.consumer_segments[name] = lay.segs
    b.consumer_block[name] = lay.block
    for s in lay.segs:
        b.groups.record(s).consumers.append((b.node_index[node], name))
