"""Rules for the norms other than a single group's BatchNorm: GroupNorm, InstanceNorm and
LayerNorm (module or ``F.layer_norm``).

A norm whose statistics are per channel follows its groups like any per-channel op (its
parameters become a ``"norm"`` entry of ``CouplingGraph.channelwise``). A norm whose statistics
pool several channels (a GroupNorm with more than one channel per group, a LayerNorm over the
channel dim) changes every one of those channels' outputs when a channel is added or removed,
which neither a fold nor a grow can undo: its groups are frozen, with a message that says so
and what would be resizable instead. The value keeps its layout either way, so the layers
after it stay producers and consumers as usual. ``docs/design.md`` (section "Stage 1: trace").
"""

from __future__ import annotations

from typing import Any

import torch.fx
import torch.nn as nn

from .builder import GroupBuilder
from .groups import Layout
from .optable import call_arg, input_arg
from .rules import passthrough

__all__ = ["group_norm", "instance_norm", "layer_norm", "layer_norm_function"]


def group_norm(b: GroupBuilder, node: torch.fx.Node, m: nn.GroupNorm, x: torch.fx.Node) -> Any:
    """GroupNorm: per channel (and followed) with one channel per group; otherwise frozen."""
    name = str(node.target)
    lay = b.layout(x)
    if lay is None or lay.block != 1:
        return b.opaque(node)
    if m.num_groups == m.num_channels:
        b.register_channelwise(name, node, lay, "norm")
        return Layout(lay.segs, 1)
    per = m.num_channels // m.num_groups
    b.groups.freeze(
        lay.segs,
        f"GroupNorm {name!r} ({m.num_groups} groups of {per} channels) normalises {per} "
        "channels together: adding or removing one changes its group's mean and variance, "
        "which neither a fold nor a grow can undo. Use GroupNorm(num_groups=num_channels) or "
        "BatchNorm to make these channels resizable",
    )
    return Layout(lay.segs, 1)


def instance_norm(b: GroupBuilder, node: torch.fx.Node, m: nn.Module, x: torch.fx.Node) -> Any:
    """InstanceNorm: statistics per sample and channel. With parameters or running statistics
    it is a per-channel norm of its groups; without, it passes the layout through."""
    lay = b.layout(x)
    if lay is None or lay.block != 1:
        return b.opaque(node)
    if m.affine or m.track_running_stats:
        b.register_channelwise(str(node.target), node, lay, "norm")
    return Layout(lay.segs, 1)


def _normalised_over_channels(b: GroupBuilder, node: torch.fx.Node, x: Any, n_dims: int) -> Any:
    """A layer norm over the last ``n_dims`` dims of ``x``: passes through when they do not
    hold the channels; freezes the groups (keeping the layout) when they do."""
    lay, xs = b.layout(x), b.shape(x)
    if lay is None or xs is None:
        return b.opaque(node)
    if lay.dim < len(xs) - n_dims:  # statistics over dims after the channels: per channel
        return passthrough(b, node, x, check_others=False)
    b.groups.freeze(
        lay.segs,
        f"layer norm over the channel dim ({b.describe_op(node)}): adding or removing a "
        "channel changes every position's mean and variance, which neither a fold nor a grow "
        "can undo. The layers between such norms (the hidden width of a ConvNeXt or "
        "transformer block) stay resizable. Use BatchNorm, or GroupNorm with one channel per "
        "group, to make these channels resizable too",
    )
    return Layout(lay.segs, lay.block, dim=lay.dim)


def layer_norm(b: GroupBuilder, node: torch.fx.Node, m: nn.LayerNorm, x: torch.fx.Node) -> Any:
    """``nn.LayerNorm``: see :func:`_normalised_over_channels`."""
    return _normalised_over_channels(b, node, x, len(m.normalized_shape))


def layer_norm_function(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """``F.layer_norm(x, normalized_shape, ...)``: see :func:`_normalised_over_channels`."""
    shape = call_arg(node, 1, "normalized_shape")
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (list, tuple)):
        return b.opaque(node)
    return _normalised_over_channels(b, node, input_arg(node), len(shape))
