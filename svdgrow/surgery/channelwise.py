"""Per-channel modules and tensors in a resize: the entries of ``CouplingGraph.channelwise``
(depthwise convolutions, squeeze-and-excitation gates, norms over concatenations or other than
a group's BatchNorm, per-channel parameters) keep, drop and add entries with their groups.

Their entries are the channels of their segments concatenated, so one index map per entry
follows every changed segment at its offset. Nothing is folded into them: a dropped channel's
entry goes with it, and what the channel carried is folded into the consumers further on. A
grown channel gets a neutral entry: norm weight 1, bias 0, running mean 0, running var 1; a
parameter the mean of the others (a scale) or 0 (a shift); a layer a random row as long as the
others on average, bias 0 (the consumers' new columns are 0, so the output does not change,
and the new channel is not dead). See docs/design.md, "Stage 4: surgery".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..trace import ChannelwiseLayout
from .context import ResizeContext

__all__ = [
    "NORM_DEFAULTS",
    "changed_channelwise",
    "channelwise_rows",
    "plan_channelwise",
    "segment_index",
    "shifted",
]

#: What a new channel of a per-channel norm gets, per tensor.
NORM_DEFAULTS = (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))


def segment_index(ctx: ResizeContext, segments: list[int], changes, device) -> tuple[Tensor, int]:
    """For entries laid out as ``segments`` concatenated: the old entry of every new entry
    (``-1`` for a new channel), and the old number of entries.

    Args:
        ctx: the model now.
        segments: group ids, in order.
        changes: group id -> :class:`~svdgrow.surgery.GroupChange`.
        device: where the index lives.
    """
    parts, offset = [], 0
    for seg in segments:
        n = ctx.widths[seg]
        ch = changes.get(seg)
        old = torch.arange(offset, offset + n, device=device)
        if ch is None:
            parts.append(old)
        elif ch.action == "prune":
            parts.append(offset + ch.keep.to(device))
        else:
            new = torch.full((ch.new_width - n,), -1, dtype=torch.long, device=device)
            parts.append(torch.cat([old, new]))
        offset += n
    return torch.cat(parts), offset


def _new_slots(index: Tensor, total: int) -> tuple[Tensor, int]:
    """``index`` over a source extended by its new entries: the ``i``-th ``-1`` becomes
    ``total + i``. Returns the source index and how many new entries there are."""
    new = index < 0
    added = int(new.sum())
    rows = index.clone()
    rows[new] = total + torch.arange(added, device=index.device)
    return rows, added


def changed_channelwise(ctx: ResizeContext, changes, kinds: tuple[str, ...]) -> list[str]:
    """Names of the channelwise entries of ``kinds`` with a changed segment, in graph order."""
    return [
        name
        for name, c in ctx.graph.channelwise.items()
        if c.kind in kinds and any(s in changes for s in c.segments)
    ]


def channelwise_rows(ctx: ResizeContext, name: str, changes, generator):
    """The row plan of a per-channel layer (a depthwise convolution, a gate):
    ``(weight source or None, bias source or None, rows, state_rows, attrs)``; ``attrs`` are
    the width attributes to set (a depthwise convolution's input channels and groups too)."""
    m = ctx.modules[name]
    W = m.weight.detach()
    index, total = segment_index(ctx, ctx.graph.channelwise[name].segments, changes, W.device)
    rows, added = _new_slots(index, total)
    work = bias_work = None
    if added:
        flat = W.reshape(W.shape[0], -1).double()
        rms = float(flat.norm(dim=1).pow(2).mean().sqrt()) if W.shape[0] else 1.0
        extra = torch.randn(added, flat.shape[1], generator=generator, dtype=torch.float64)
        extra = extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-30) * (rms or 1.0)
        work = torch.cat([W, extra.to(W).reshape(added, *W.shape[1:])])
        if m.bias is not None:
            bias_work = torch.cat([m.bias.detach(), m.bias.new_zeros(added)])
    n = len(rows)
    attrs = [(m, "out_features" if isinstance(m, nn.Linear) else "out_channels", n)]
    if getattr(m, "groups", 1) > 1:  # depthwise: one input channel per row
        attrs += [(m, "in_channels", n), (m, "groups", n)]
    return work, bias_work, rows, index, attrs


def shifted(buf: Tensor, shifts: list[tuple[int, Tensor]]) -> Tensor:
    """``buf`` (float64 sum, cast back) with each ``(offset, shift)`` added from ``offset``."""
    out = buf.double()
    for offset, shift in shifts:
        out[offset : offset + len(shift)] += shift
    return out.to(buf.dtype)


def plan_channelwise(ctx: ResizeContext, changes, plan, mean_shift, move) -> None:
    """Plan every per-channel norm and parameter with a changed segment (layers are planned
    with the other layers, through :func:`channelwise_rows`).

    Args:
        ctx: the model now.
        changes: group id -> :class:`~svdgrow.surgery.GroupChange`.
        plan: the :class:`~svdgrow.surgery.ResizePlan` to add to.
        mean_shift: norm -> ``(offset, shift)`` of folded constants for its running mean
            (popped for the norms planned here).
        move: the :class:`~svdgrow.surgery.TensorMove` class.
    """
    for name in changed_channelwise(ctx, changes, ("norm", "param")):
        c = ctx.graph.channelwise[name]
        if c.kind == "norm":
            _plan_norm(ctx, c, changes, plan, mean_shift, move)
        else:
            _plan_param(ctx, c, changes, plan, move)


def _plan_norm(ctx, c: ChannelwiseLayout, changes, plan, mean_shift, move) -> None:
    """A per-channel norm over segments: its affine parameters and running statistics."""
    norm = ctx.modules[c.name]
    tensors = [
        (key, value, t)
        for key, value in NORM_DEFAULTS
        if (t := getattr(norm, key, None)) is not None
    ]
    if not tensors:
        return
    index, total = segment_index(ctx, c.segments, changes, tensors[0][2].device)
    rows, added = _new_slots(index, total)
    for key, value, t in tensors:
        src = torch.cat([t.detach(), t.new_full((added,), value)])
        if key == "running_mean" and c.name in mean_shift:
            src = shifted(src, mean_shift.pop(c.name))
        if isinstance(t, nn.Parameter):
            plan.moves.append(move("param", t, f"{c.name}.{key}", src, rows, None, 1, index))
        else:
            plan.moves.append(move("buffer", norm._buffers, key, src, rows, None, 1))
    n = len(rows)
    for attr in ("num_features", "num_channels", "num_groups"):
        if hasattr(norm, attr):
            plan.attrs.append((norm, attr, n))


def _plan_param(ctx, c: ChannelwiseLayout, changes, plan, move) -> None:
    """A parameter or buffer with one entry per channel in dim ``c.dim`` (0 or 1)."""
    owner_name, _, key = c.name.rpartition(".")
    owner = ctx.modules[owner_name]
    t = owner._parameters.get(key)
    t = t if t is not None else owner._buffers[key]
    index, total = segment_index(ctx, c.segments, changes, t.device)
    src_index, added = _new_slots(index, total)
    data = t.detach()
    fill_shape = list(data.shape)
    fill_shape[c.dim] = added
    fill = data.mean() if c.grow_value == "mean" else 0.0
    src = torch.cat([data, data.new_full(fill_shape, float(fill))], dim=c.dim)
    block = math.prod(data.shape[c.dim + 1 :])
    if c.dim == 0:
        rows, cols, state_rows, state_cols = src_index, None, index, None
    else:
        rows, cols, state_rows, state_cols = None, src_index, None, index
    if isinstance(t, nn.Parameter):
        mv = move("param", t, c.name, src, rows, cols, block, state_rows)
        mv.state_cols = state_cols
    else:
        mv = move("buffer", owner._buffers, key, src, rows, cols, block)
    plan.moves.append(mv)
