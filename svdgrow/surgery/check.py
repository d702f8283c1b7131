"""``mode="auto"`` without data: the weights-mode fold or magnitude pruning, group by group,
whichever is measured better on the example input (:func:`prefer_measured`).

The weights fold predicts what the consumers read from the weights alone; where that
prediction is poor (a linear bottleneck read without an activation, norms the model does not
see, features far from Gaussian), folding can do worse than dropping the smallest channels.
The Resizer always holds an example input (a few real samples in the application), so the
candidate prunes are compared there before anything changes. See docs/design.md,
"Stage 4: surgery" (the modes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._utils import as_args, eval_mode
from .context import ResizeContext
from .moments import consumer_offsets
from .plan import _fold_columns_
from .prune import GroupChange

__all__ = ["consumer_inputs", "network_change", "output_change", "prefer_measured"]


@torch.no_grad()
def consumer_inputs(ctx: ResizeContext, names: list[str], example) -> dict[str, Tensor]:
    """Every named consumer's input on ``example`` (one forward pass in eval mode).

    Args:
        ctx: the model now.
        names: consumer module names.
        example: an input (or a tuple of inputs) of the model.
    """
    seen: dict[str, Tensor] = {}

    def make_hook(name):
        def hook(mod, inputs):
            seen.setdefault(name, inputs[0].detach())

        return hook

    hooks = [ctx.modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with eval_mode(ctx.modules[""]) as model:
            model(*as_args(example))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _restricted(module: nn.Module, x: Tensor, W: Tensor, offset: int, n: int) -> Tensor:
    """The consumer's output from channels ``offset .. offset + n`` of its input alone, with
    weight ``W`` (Tensor[R, n, B]) on them, no bias."""
    if isinstance(module, nn.Linear):
        if x.dim() > 2:  # channels last: one column per channel
            return x[..., offset : offset + n] @ W.reshape(W.shape[0], n).T
        B = W.shape[2]
        xs = x.reshape(x.shape[0], -1, B)[:, offset : offset + n].reshape(x.shape[0], n * B)
        return xs @ W.reshape(W.shape[0], n * B).T
    weight = W.reshape(W.shape[0], n, *module.weight.shape[2:])
    return module._conv_forward(x[:, offset : offset + n], weight, None)


def output_change(
    module: nn.Module, x: Tensor, offset: int, change: GroupChange, fold, block: int
) -> tuple[float, float]:
    """How much a prune changes a consumer's output on ``x``.

    Args:
        module: the consumer (Conv1d/Conv2d or Linear).
        x: its input.
        offset: the group's first channel in that input.
        change: the prune (its kept and dropped channels).
        fold: the consumer's ``(M, c)`` (see :class:`~svdgrow.surgery.GroupChange`), or None
            (the dropped columns just go).
        block: the consumer's columns per channel.

    Returns:
        ``(squared change, squared output)`` of the part of the output the group's channels
        make, summed over the batch (float).
    """
    n = change.old_width
    A = module.weight.detach()
    A = A.reshape(A.shape[0], -1, block)[:, offset : offset + n]
    new = A.clone()
    shift = None
    if fold is not None:
        M, c = (t.to(A.device) for t in fold)
        shift = _fold_columns_(new, change.keep.to(A.device), change.drop.to(A.device), M, c)
    new[:, change.drop.to(A.device)] = 0
    before = _restricted(module, x, A, offset, n).double()
    after = _restricted(module, x, new, offset, n).double()
    if shift is not None:  # the folded constant, per output channel
        dims = [1] * after.dim()
        dims[-1 if isinstance(module, nn.Linear) else 1] = -1
        after = after + shift.view(dims)
    return float((after - before).pow(2).sum()), float(before.pow(2).sum())


def prefer_measured(
    ctx: ResizeContext,
    weights: dict[int, GroupChange],
    magnitude: dict[int, GroupChange],
    example,
) -> dict[int, GroupChange]:
    """The weights-mode prunes, the magnitude ones, or a mix, whichever changes the network's
    output least on ``example``.

    First, per group, the one that changes the outputs of the group's consumers less there
    (relative squared change over its consumers; a group whose consumers read zeros keeps the
    weights fold). Then the whole network's output on ``example`` after that mix, after every
    weights-mode prune and after every magnitude prune
    (simulated, see :func:`network_change`) decides. A group pruned by magnitude gets a ``note``
    with the numbers.

    Args:
        ctx: the model now.
        weights: group id -> its weights-mode :class:`GroupChange` (with folds).
        magnitude: group id -> its magnitude :class:`GroupChange`, the same groups.
        example: the input the candidates are measured on.

    Returns:
        group id -> the chosen :class:`GroupChange`.
    """
    local = _local_errors(ctx, weights, magnitude, example)
    mix = {gid: magnitude[gid] if e_m < e_w else weights[gid] for gid, (e_w, e_m) in local.items()}
    candidates = {"weights": weights, "magnitude": magnitude, "per-group": mix}
    if all(mix[g] is weights[g] for g in mix) or all(mix[g] is magnitude[g] for g in mix):
        del candidates["per-group"]
    change = {k: network_change(ctx, c, example) for k, c in candidates.items()}
    best = min(change, key=lambda k: (change[k], k != "weights"))  # ties: the fold
    summary = ", ".join(f"{k} {v:.3g}" for k, v in change.items())
    for gid, ch in candidates[best].items():
        if ch is magnitude[gid]:
            e_w, e_m = local[gid]
            ch.note = (
                f"magnitude pruning used (mode='auto' without data): on the example input its "
                f"consumers' outputs change by {e_m:.3g} against {e_w:.3g} with the weights "
                f"fold (relative), the network's output by {summary}"
            )
    return candidates[best]


def _local_errors(ctx, weights, magnitude, example) -> dict[int, tuple[float, float]]:
    """group id -> the relative change of its consumers' outputs on ``example`` with the
    weights-mode prune and with the magnitude one (0, 0 when they read zeros there)."""
    offsets = consumer_offsets(ctx, [ch.group for ch in weights.values()])
    inputs = consumer_inputs(ctx, sorted({c for _, c in offsets}), example)
    out = {}
    for gid, w_change in weights.items():
        e_w = e_m = ref = 0.0
        for cons in w_change.group.consumers:
            if (gid, cons) not in offsets or cons not in inputs:
                continue
            args = (ctx.modules[cons], inputs[cons], offsets[(gid, cons)])
            block = ctx.weight_block(cons)
            err, ref_c = output_change(*args, w_change, w_change.folds.get(cons), block)
            e_w, ref = e_w + err, ref + ref_c
            e_m += output_change(*args, magnitude[gid], None, block)[0]
        out[gid] = ((e_w / ref) ** 0.5, (e_m / ref) ** 0.5) if ref > 0 else (0.0, 0.0)
    return out


@torch.no_grad()
def network_change(ctx: ResizeContext, changes: dict[int, GroupChange], example) -> float:
    """The relative change of the model's output on ``example`` after ``changes`` (prunes),
    simulated without changing the model: every consumer runs with its dropped columns zeroed
    and its fold applied (its folded constant added to its output), which is what the resize
    computes; ``inf`` when the model's output is not one tensor.

    Args:
        ctx: the model now.
        changes: group id -> a prune's :class:`GroupChange`.
        example: an input (or a tuple of inputs) of the model.
    """
    weights: dict[str, Tensor] = {}
    shifts: dict[str, Tensor] = {}
    offsets = consumer_offsets(ctx, [ch.group for ch in changes.values()])
    for (gid, cons), offset in offsets.items():
        ch, A = changes[gid], ctx.modules[cons].weight
        W = weights.setdefault(cons, A.detach().clone())
        view = W.view(W.shape[0], -1, ctx.weight_block(cons))[:, offset : offset + ch.old_width]
        keep, drop = ch.keep.to(W.device), ch.drop.to(W.device)
        if cons in ch.folds:
            M, c = (t.to(W.device) for t in ch.folds[cons])
            shift = _fold_columns_(view, keep, drop, M, c)
            shifts[cons] = shifts[cons] + shift if cons in shifts else shift
        view[:, drop] = 0
    model = ctx.modules[""]
    with eval_mode(model):
        y0 = model(*as_args(example))
        hooks = [ctx.modules[c].register_forward_hook(_add_shift(t)) for c, t in shifts.items()]
        try:
            params = {f"{cons}.weight": W for cons, W in weights.items()}
            y1 = torch.func.functional_call(model, params, as_args(example))
        finally:
            for h in hooks:
                h.remove()
    if not (isinstance(y0, Tensor) and isinstance(y1, Tensor)):
        return float("inf")
    scale = float(y0.double().norm())
    return float((y1 - y0).double().norm()) / scale if scale > 0 else 0.0


def _add_shift(shift: Tensor):
    """A forward hook adding ``shift`` per output channel (dim 1, or last for a Linear)."""

    def hook(mod, inputs, out):
        dims = [1] * out.dim()
        dims[-1 if isinstance(mod, nn.Linear) else 1] = -1
        return out + shift.to(out.dtype).view(dims)

    return hook
