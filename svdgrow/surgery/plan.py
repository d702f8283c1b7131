"""The resize plan: every tensor a resize rewrites, as a source and index maps, computed before
anything changes (:func:`build_plan`); :func:`svdgrow.surgery.commit_plan` then applies it.

A prune keeps the producer rows ``K`` and folds the dropped consumer columns into the kept ones,
``A_K <- A_K + A_D M``, with the constant ``A_D c`` going into the consumer's bias (or the
BatchNorms that read its output directly); a grow appends orthogonal rows and zero columns. See docs/design.md,
"Stage 4: surgery" and "Stage 5: optimizer-state remap".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from ..optim_state import state_to_slice
from ..spectrum import norm_directly_after, producer_matrix
from .channelwise import changed_channelwise, channelwise_rows, plan_channelwise, shifted
from .context import ResizeContext, check_resizable, layer_facts
from .pivots import grow_rows, grown_row_scale
from .prune import GroupChange

__all__ = ["ResizePlan", "TensorMove", "build_plan"]


@dataclass
class TensorMove:
    """One tensor a resize rewrites. Its new value is ``svdgrow.ops.slice_copy`` of ``src``
    viewed ``[R, C, block]``, taking rows ``rows`` and channels ``cols`` (an index ``-1``
    makes a zero slice; None keeps the dimension whole).

    Attributes:
        kind: ``'param'`` (``owner.data`` is replaced), ``'buffer'`` or ``'state'``
            (``owner[key]`` is replaced).
        owner: the Parameter, the module's ``_buffers`` dict, or the parameter's optimizer
            state dict.
        key: the parameter's name (for messages), the buffer's name, or the state key.
        src (Tensor): the source, already folded or extended where the resize needs it.
        rows (Tensor[R'] | None): source row of every new row.
        cols (Tensor[C'] | None): source channel of every new channel.
        block: columns per channel (``C * block`` columns per row).
        state_rows (Tensor[R'] | None): for a parameter, the rows its optimizer state takes
            (grown rows are new there: ``-1``, while ``src`` already holds them).
        state_cols (Tensor[C'] | None): the same for channels, when they differ from ``cols``
            (a per-channel parameter in dim 1 whose ``src`` holds its new entries).
    """

    kind: str
    owner: object
    key: object
    src: Tensor
    rows: Tensor | None
    cols: Tensor | None
    block: int
    state_rows: Tensor | None = None
    state_cols: Tensor | None = None


@dataclass
class ResizePlan:
    """Everything one resize changes.

    Attributes:
        moves: every tensor to rewrite (parameters, buffers, optimizer state).
        attrs: ``(module, attribute, value)`` width attributes to set (``out_channels``...).
        warnings: approximations made (a folded constant with nowhere to go).
    """

    moves: list[TensorMove] = field(default_factory=list)
    attrs: list[tuple[object, str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _arange_then_new(n: int, added: int, device) -> Tensor:
    """Index map ``0 .. n-1`` followed by ``added`` new slices (``-1``)."""
    old = torch.arange(n, device=device)
    return torch.cat([old, torch.full((added,), -1, dtype=torch.long, device=device)])


@torch.no_grad()
def build_plan(
    ctx: ResizeContext,
    changes: dict[int, GroupChange],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> ResizePlan:
    """Compute every new tensor source and index map of a resize (changes nothing).

    Args:
        ctx: the model now.
        changes: group id -> its :class:`GroupChange` (prunes already planned; grows get
            their new rows here).
        optimizer: whose per-parameter state follows the parameters (stage 5).
        generator: CPU random generator of the grown rows.

    Raises:
        TypeError: a changed group holds a module surgery cannot resize.
        ValueError: an optimizer state entry cannot follow its parameter.
    """
    for ch in changes.values():
        why = check_resizable(ctx.modules, ctx.graph, ch.group)
        if why is not None:
            raise TypeError(f"cannot resize group {ch.group.name!r}: {why}")
    plan = ResizePlan()
    _plan_grown_rows(ctx, changes, generator)
    row_change = {p: ch for ch in changes.values() for p in ch.group.producers}
    touched = []  # producers and per-channel layers (rows), consumers (columns)
    for ch in changes.values():
        touched += [n for n in ch.group.producers + ch.group.consumers if n not in touched]
    touched += [n for n in changed_channelwise(ctx, changes, ("layer",)) if n not in touched]
    mean_shift: dict[str, list] = {}  # norm -> (offset, shift) of bias-free consumers it reads
    for name in touched:
        _plan_layer(ctx, name, changes, row_change.get(name), plan, mean_shift, generator)
    _plan_norms(ctx, changes, plan, mean_shift)
    plan_channelwise(ctx, changes, plan, mean_shift, TensorMove)
    for nm, shifts in mean_shift.items():  # norms whose own group does not change
        buf = ctx.modules[nm]._buffers["running_mean"]
        src = shifted(buf, shifts)
        plan.moves.append(
            TensorMove("buffer", ctx.modules[nm]._buffers, "running_mean", src, None, None, 1)
        )
    _plan_optimizer_state(plan, optimizer)
    return plan


def _plan_grown_rows(ctx: ResizeContext, changes: dict[int, GroupChange], generator) -> None:
    """Fill ``grown_rows`` of every grow (one batched SVD of all growing producers).

    New channel ``j`` of a group gets, from each producer with room for ``j`` more rows, a row
    orthogonal to its rows and to the other new ones; from a producer without room, a zero
    row (:func:`~svdgrow.spectrum.group_cap`). A channel no producer has room for (a grow
    past the cap, allowed with feature spectra) gets a random row from every producer, of
    the same norm as an orthogonal one: its pre-activation is a mix of the existing ones,
    and the norm and the activation after it make it a new feature."""
    growing = [
        (ch, p) for ch in changes.values() if ch.action == "grow" for p in ch.group.producers
    ]
    if not growing:
        return
    mats = [producer_matrix(ctx.modules[p]).detach().double() for _, p in growing]
    svs, _, _ = ops.batched_svd(mats)
    rooms = {}
    for ch, p in growing:
        W = producer_matrix(ctx.modules[p])
        rooms[ch.group.id, p] = max(0, min(ch.new_width - ch.old_width, W.shape[1] - W.shape[0]))
    for (ch, p), sv in zip(growing, svs, strict=True):
        added = ch.new_width - ch.old_width
        W = producer_matrix(ctx.modules[p])
        room = rooms[ch.group.id, p]
        most = max(rooms[ch.group.id, q] for q in ch.group.producers)  # new via some producer
        zeros = W.new_zeros(most - room, W.shape[1], dtype=torch.float64)
        rows = grow_rows(W, room, generator, sv) if room else zeros[:0]
        past = _random_rows(added - most, W.shape[1], sv, generator).to(W.device)
        ch.grown_rows[p] = torch.cat([rows, zeros, past])


def _random_rows(a: int, D: int, sv: Tensor, generator) -> Tensor:
    """``a`` random rows of width ``D`` (float64), each scaled as :func:`grow_rows` scales
    its orthonormal rows (half the smallest nonzero singular value ``sv`` of the producer)."""
    R = torch.randn(a, D, generator=generator, dtype=torch.float64)
    if not a:
        return R
    return grown_row_scale(sv.cpu()) * R / R.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _plan_layer(ctx, name: str, changes, row_change, plan, mean_shift, generator) -> None:
    """Plan a Conv/Linear's weight and bias: rows when it produces a changed group or is a
    per-channel layer of one, columns (with the fold) when it consumes one, the folded
    constant, and its width attributes."""
    m = ctx.modules[name]
    facts = layer_facts(m)
    W = m.weight.detach()
    bias = m.bias.detach() if m.bias is not None else None
    layout = ctx.graph.consumers.get(name)
    cols_change = layout is not None and any(s in changes for s in layout.segments)
    block = ctx.weight_block(name) if cols_change else int(math.prod(W.shape[2:]))
    cw = ctx.graph.channelwise.get(name)
    if cw is not None and cw.kind == "layer" and any(s in changes for s in cw.segments):
        work, bias_work, rows, state_rows, attrs = channelwise_rows(ctx, name, changes, generator)
        plan.attrs += attrs
    else:
        work, bias_work, rows, state_rows = _plan_rows(name, W, bias, row_change)
        if rows is not None and len(rows) != W.shape[0]:
            plan.attrs.append((m, facts.out_attr, len(rows)))
    cols = delta = None
    if cols_change:
        work = W.clone() if work is None else work
        cols, delta = _plan_columns(ctx, name, changes, work, block)
    if delta is not None:
        bias_work = _plan_bias_correction(ctx, name, bias, bias_work, delta, plan, mean_shift)
    src = work if work is not None else W
    plan.moves.append(
        TensorMove("param", m.weight, f"{name}.weight", src, rows, cols, block, state_rows)
    )
    if bias is not None and (rows is not None or bias_work is not None):
        src = bias_work if bias_work is not None else bias
        plan.moves.append(
            TensorMove("param", m.bias, f"{name}.bias", src, rows, None, 1, state_rows)
        )
    if cols is not None:
        plan.attrs.append((m, facts.in_attr, len(cols) * (block if facts.in_counts_columns else 1)))


def _plan_rows(name: str, W: Tensor, bias: Tensor | None, change: GroupChange | None):
    """Row plan of a producer: ``(weight source or None, bias source or None, rows,
    state_rows)``; all None when ``change`` is None (the module produces no changed group)."""
    if change is None:
        return None, None, None, None
    if change.action == "prune":
        keep = change.keep.to(W.device)
        return None, None, keep, keep
    added = change.new_width - change.old_width
    extra = change.grown_rows[name].to(W.dtype).to(W.device).reshape(added, *W.shape[1:])
    work = torch.cat([W, extra], 0)
    bias_work = torch.cat([bias, bias.new_zeros(added)]) if bias is not None else None
    rows = torch.arange(W.shape[0] + added, device=W.device)
    return work, bias_work, rows, _arange_then_new(W.shape[0], added, W.device)


def _plan_columns(ctx, name: str, changes, work: Tensor, block: int):
    """Column plan of a consumer whose input groups change: the source channel of every new
    channel, with each pruned group's dropped columns folded into its kept ones in ``work``
    (in place). Returns ``(cols, delta)``: ``delta`` (Tensor[R], float64) is the folded
    constant per output row, None when nothing was folded."""
    view = work.reshape(work.shape[0], -1, block)
    parts, delta, folded = [], None, set()
    offset = 0
    for seg in ctx.graph.consumers[name].segments:
        n = ctx.widths[seg]
        ch = changes.get(seg)
        if ch is None:
            parts.append(torch.arange(offset, offset + n, device=work.device))
        elif ch.action == "prune":
            keep, drop = ch.keep.to(work.device), ch.drop.to(work.device)
            parts.append(offset + keep)
            if name in ch.folds and seg not in folded:  # no fold: a plain drop
                M, c = (t.to(work.device) for t in ch.folds[name])
                shift = fold_columns_(view, offset + keep, offset + drop, M, c)
                delta = shift if delta is None else delta + shift
                folded.add(seg)
        else:
            added = ch.new_width - ch.old_width
            new = torch.full((added,), -1, dtype=torch.long, device=work.device)
            parts.append(torch.cat([torch.arange(offset, offset + n, device=work.device), new]))
        offset += n
    return torch.cat(parts), delta


def fold_columns_(view: Tensor, keep: Tensor, drop: Tensor, M: Tensor, c: Tensor) -> Tensor:
    """``A_K <- A_K + A_D M`` on a consumer weight viewed ``[R, C, B]`` (in place); returns the
    constant ``A_D c`` per row (float64). ``M`` and ``c`` are per channel or per column (see
    :class:`~svdgrow.surgery.GroupChange`).

    The product ``A_D M`` is formed in the weight's precision and added in place (float32
    weights: each entry within about ``1e-6`` of ``|A_D| |M|`` of the float64 product, the
    rounding the weight itself gets when stored); a per-column ``M`` on a wide consumer is the
    largest product of a data-mode resize, and float64 tripled its time."""
    A_drop = view[:, drop, :]  # [R, |D|, B]
    R, n_drop, B = A_drop.shape
    Mw = M.to(view.dtype)
    if M.shape[0] == n_drop:  # one map for every column of a channel
        update = torch.einsum("rdb,dk->rkb", A_drop, Mw)
    else:
        update = (A_drop.reshape(R, n_drop * B) @ Mw).reshape(R, len(keep), B)
    view.index_add_(1, keep, update)
    A_drop = A_drop.double()
    if c.shape[0] == n_drop:
        return torch.einsum("rdb,d->r", A_drop, c)
    return A_drop.reshape(R, n_drop * B) @ c


def _plan_bias_correction(ctx, name, bias, bias_work, delta, plan, mean_shift):
    """Put a consumer's folded constant ``delta`` into its bias, else into the running mean of
    every BatchNorm that reads its output directly (right after it, or across a
    concatenation), else drop it with a warning. Returns the bias source."""
    if bias is not None:
        base = bias_work if bias_work is not None else bias
        return (base.double() + delta).to(bias.dtype)
    readers = [
        (norm, offset)
        for norm, offset in _norms_reading(ctx, name)
        if getattr(ctx.modules[norm], "running_mean", None) is not None
    ]
    for norm, offset in readers:
        mean_shift.setdefault(norm, []).append((offset, -delta))
    if not readers and float(delta.abs().max()) > 0:
        plan.warnings.append(
            f"consumer {name!r} has no bias and no BatchNorm reads its output directly: the "
            f"folded constant (max |delta| {float(delta.abs().max()):.3g}) was dropped"
        )
    return bias_work


def _norms_reading(ctx: ResizeContext, name: str) -> list[tuple[str, int]]:
    """``(norm, channel offset)`` of every BatchNorm that reads the output of ``name``
    directly: right after it (``Group.norm_after``) or as a segment of a concatenation
    (``CouplingGraph.concat_norms``)."""
    out = []
    for g in ctx.graph.groups:
        if name in g.producers and name in norm_directly_after(g):
            out.append((norm_directly_after(g)[name], 0))
    for norm, segments in ctx.graph.concat_norms.items():
        offset = 0
        for gid, source in segments:
            if source == name:
                out.append((norm, offset))
            offset += ctx.widths[gid]
    return out


def _plan_norms(ctx, changes: dict[int, GroupChange], plan: ResizePlan, mean_shift) -> None:
    """Plan the BatchNorms of every changed group: kept rows for a prune; for a grow new
    channels with weight 1, bias 0, running mean 0 and running var 1."""
    for ch in changes.values():
        for nm in ch.group.norms:
            bn = ctx.modules[nm]
            dev = next(iter(list(bn.parameters()) + list(bn.buffers()))).device
            added = ch.new_width - ch.old_width if ch.action == "grow" else 0
            if ch.action == "prune":
                rows = state_rows = ch.keep.to(dev)
            else:
                rows = torch.arange(ch.new_width, device=dev)
                state_rows = _arange_then_new(ch.old_width, added, dev)

            def extend(t, value, added=added):
                return torch.cat([t, t.new_full((added,), value)]) if added else t

            for pname, value in (("weight", 1.0), ("bias", 0.0)):
                p = getattr(bn, pname)
                if p is not None:
                    src = extend(p.detach(), value)
                    plan.moves.append(
                        TensorMove("param", p, f"{nm}.{pname}", src, rows, None, 1, state_rows)
                    )
            for bname, value in (("running_mean", 0.0), ("running_var", 1.0)):
                buf = bn._buffers.get(bname)
                if buf is not None:
                    src = extend(buf, value)
                    if bname == "running_mean" and nm in mean_shift:
                        src = shifted(src, mean_shift.pop(nm))
                    plan.moves.append(TensorMove("buffer", bn._buffers, bname, src, rows, None, 1))
            plan.attrs.append((bn, "num_features", ch.new_width))


def _plan_optimizer_state(plan: ResizePlan, optimizer) -> None:
    """Stage 5: every state tensor of a resized parameter follows it (same columns, the
    parameter's ``state_rows``). Checked before anything is touched: raises when an entry
    cannot be mapped (see :func:`svdgrow.optim_state.state_to_slice`)."""
    params = [mv for mv in plan.moves if mv.kind == "param"]
    to_slice = state_to_slice(optimizer, {mv.owner: mv.key for mv in params})
    for mv in params:
        for k in to_slice.get(mv.owner, []):
            state = optimizer.state[mv.owner]
            cols = mv.state_cols if mv.state_cols is not None else mv.cols
            plan.moves.append(
                TensorMove("state", state, k, state[k], mv.state_rows, cols, mv.block)
            )
