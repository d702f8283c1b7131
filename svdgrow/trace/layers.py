"""Rules for the layers that own weights: Conv1d/Conv2d and Linear (producers and consumers;
a depthwise convolution's rows follow its input group) and BatchNorm (a norm of one group, or
per-channel over a concatenation).

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
from .optable import UNSUPPORTED_LAYERS

__all__ = ["batch_norm", "conv", "linear", "unsupported"]


def conv(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """Conv1d/Conv2d: a consumer of ``x``'s layout and the producer of a new group; a
    depthwise convolution (groups == in_channels == out_channels) instead passes its input's
    layout through, its rows following those channels."""
    name = str(node.target)
    kind = type(m).__name__
    xs, ys = b.shape(x), b.shape(node)
    want = 3 if isinstance(m, nn.Conv1d) else 4
    if len(xs) != want:
        return b.opaque(
            node,
            f"{kind} {name!r} called on a {len(xs)}-D input (only batched {want}-D [N, C, ...] "
            "inputs are followed)",
        )
    lay = b.layout_or_frozen(x, f"input of {name!r}")
    if lay.block != 1:
        # channels merged by a reshape: the conv's input channels are not whole groups.
        # Freeze what flows in; the conv still reads (a frozen group) and produces.
        b.groups.freeze(lay.segs, f"{kind} {name!r} reads a channel-merging reshape")
        g = b.groups.new_group(f"opaque:{x.name}", xs[1], f"reshaped input of {name!r}")
        lay = Layout((g,))
    if m.groups != 1:
        return _grouped_conv(b, node, m, lay, ys[1])
    _register_consumer(b, name, node, lay)
    return Layout((_register_producer(b, name, node, ys[1]),), 1, name)


def _grouped_conv(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, lay: Layout, width: int):
    """A convolution with ``groups > 1``: followed when depthwise with multiplier 1 (output
    channel ``i`` reads input channel ``i`` only, so its rows follow the input's groups like a
    per-channel op); otherwise its input and output groups are frozen, saying why."""
    name = str(node.target)
    if m.groups == m.in_channels == m.out_channels:
        b.register_channelwise(name, node, lay, "layer")
        return Layout(lay.segs, 1)
    out = _register_producer(b, name, node, width)
    if m.groups == m.in_channels:
        mult = m.out_channels // m.in_channels
        why = (
            f"depthwise convolution {name!r} with channel multiplier {mult} (groups="
            f"{m.groups}): each input channel feeds {mult} output channels, while surgery "
            "keeps one row per channel; its input and output groups are frozen (a depthwise "
            "convolution with multiplier 1 followed by a 1x1 convolution is resizable)"
        )
    else:
        why = (
            f"grouped convolution {name!r} (groups={m.groups}) ties its input and output "
            f"channels group by group ({m.in_channels // m.groups} in, "
            f"{m.out_channels // m.groups} out per group), which surgery does not resize; "
            "its input and output groups are frozen (groups=1 or depthwise convolutions are "
            "resizable)"
        )
    b.groups.freeze(list(lay.segs) + [out], why)
    return Layout((out,), 1, name)


def linear(b: GroupBuilder, node: torch.fx.Node, m: nn.Linear, x: torch.fx.Node) -> Any:
    """Linear on a 2-D input, or on a channels-last value (channels in its last dim, after a
    permute): a consumer of ``x``'s layout and the producer of a new group."""
    name = str(node.target)
    xs, ys = b.shape(x), b.shape(node)
    lay = b.layout(x)
    last = len(xs) - 1
    if len(xs) != 2 and (lay is None or lay.dim != last):
        return b.opaque(
            node,
            f"Linear {name!r} is applied to a {len(xs)}-D input (on its last dim, not on "
            "channels): it is not a channel consumer",
        )
    lay = b.layout_or_frozen(x, f"input of {name!r}")
    _register_consumer(b, name, node, lay)
    return Layout((_register_producer(b, name, node, ys[-1]),), 1, name, dim=last)


def batch_norm(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """BatchNorm: its parameters and buffers follow the one group it normalises."""
    name = str(node.target)
    lay = b.layout(x)
    if lay is None:
        return b.opaque(node)
    if lay.block != 1:
        b.groups.freeze(lay.segs, f"BatchNorm {name!r} normalises a flattened value")
        return Layout(lay.segs, lay.block)
    if len(lay.segs) != 1:  # over a concatenation: per channel, segment by segment
        b.register_channelwise(name, node, lay, "norm")
        # surgery puts a constant folded into a segment's producer into its running mean
        b.concat_norms.setdefault(name, list(zip(lay.segs, lay.direct_sources(), strict=True)))
        return Layout(lay.segs, 1)
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


def unsupported(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """A layer type that is not followed (``optable.UNSUPPORTED_LAYERS``): the groups it
    touches are frozen with a message that names it and says what is resizable instead."""
    why = next(w for t, w in UNSUPPORTED_LAYERS if isinstance(m, t))
    return b.opaque(node, f"{type(m).__name__} {str(node.target)!r}: {why}")


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
