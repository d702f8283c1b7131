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
from .plan import fold_columns_
from .prune import GroupChange

__all__ = [
    "consumer_inputs",
    "network_change",
    "output_change",
    "prefer_measured",
    "pruned_columns",
]


@torch.no_grad()
def consumer_inputs(ctx: ResizeContext, names: list[str], example) -> dict[str, Tensor]:
    """Every named consumer's input on ``example`` (one forward pass in eval mode).

    Args:
        ctx: the model now.
        names: consumer module names.
        example: an input (or a tuple of inputs) of the model.
    """
    return _inputs_and_output(ctx, names, example)[0]


@torch.no_grad()
def _inputs_and_output(ctx: ResizeContext, names: list[str], example):
    """:func:`consumer_inputs`, and the model's output on ``example`` from the same pass."""
    seen: dict[str, Tensor] = {}

    def make_hook(name):
        def hook(mod, inputs):
            seen.setdefault(name, inputs[0].detach())

        return hook

    hooks = [ctx.modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with eval_mode(ctx.modules[""]) as model:
            out = model(*as_args(example))
    finally:
        for h in hooks:
            h.remove()
    return seen, out


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


def pruned_columns(
    ctx: ResizeContext, change: GroupChange, consumer: str, offset: int, fold
) -> tuple[Tensor, Tensor | None]:
    """A consumer's weight on a group's channels as a prune leaves it, dropped channels zeroed
    (their columns stay, so the shapes do not change), and the folded constant.

    Args:
        ctx: the model now.
        change: the prune (its kept and dropped channels).
        consumer: the consumer's name.
        offset: the group's first channel in the consumer's input.
        fold: the consumer's ``(M, c)`` (see :class:`~svdgrow.surgery.GroupChange`), or None
            (the dropped columns just go).

    Returns:
        ``(Tensor[R, n, B], constant per output row (float64) or None)``.
    """
    A = ctx.modules[consumer].weight.detach()
    A = A.reshape(A.shape[0], -1, ctx.weight_block(consumer))[:, offset : offset + change.old_width]
    new = A.clone()
    shift = None
    if fold is not None:
        M, c = (t.to(A.device) for t in fold)
        shift = fold_columns_(new, change.keep.to(A.device), change.drop.to(A.device), M, c)
    new[:, change.drop.to(A.device)] = 0
    return new, shift


def output_change(
    module: nn.Module, x: Tensor, offset: int, pruned: tuple[Tensor, Tensor | None]
) -> tuple[float, float]:
    """How much a prune changes a consumer's output on ``x``.

    Args:
        module: the consumer (Conv1d/Conv2d or Linear).
        x: its input.
        offset: the group's first channel in that input.
        pruned: the consumer's columns on the group after the prune (see
            :func:`pruned_columns`).

    Returns:
        ``(squared change, squared output)`` of the part of the output the group's channels
        make, summed over the batch (float).
    """
    errs, ref = _output_changes(module, x, offset, [pruned])
    return errs[0], ref


def _output_changes(module, x, offset, candidates) -> tuple[list[float], float]:
    """:func:`output_change` of several prunes of the same channels, the output before them
    computed once: the squared changes, and the squared output."""
    n, B = candidates[0][0].shape[1:]
    A = module.weight.detach()
    A = A.reshape(A.shape[0], -1, B)[:, offset : offset + n]
    before = _restricted(module, x, A, offset, n).double()
    errs = []
    for new, shift in candidates:
        after = _restricted(module, x, new, offset, n).double()
        if shift is not None:  # the folded constant, per output channel
            after = after + shift.view(_channel_shape(module, after))
        errs.append(float((after - before).pow(2).sum()))
    return errs, float(before.pow(2).sum())


def _channel_shape(module: nn.Module, out: Tensor) -> list[int]:
    """The shape that broadcasts a per-output-channel vector over ``out``."""
    dims = [1] * out.dim()
    dims[-1 if isinstance(module, nn.Linear) else 1] = -1
    return dims


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
    weights-mode prune and after every magnitude prune (simulated, see :func:`network_change`)
    decides. A group pruned by magnitude gets a ``note`` with the numbers.

    Args:
        ctx: the model now.
        weights: group id -> its weights-mode :class:`GroupChange` (with folds).
        magnitude: group id -> its magnitude :class:`GroupChange`, the same groups.
        example: the input the candidates are measured on.

    Returns:
        group id -> the chosen :class:`GroupChange`.
    """
    offsets = consumer_offsets(ctx, [ch.group for ch in weights.values()])
    pruned = {}  # (mode, group id, consumer) -> its columns after that prune
    for (gid, cons), o in offsets.items():
        w = weights[gid]
        pruned["weights", gid, cons] = pruned_columns(ctx, w, cons, o, w.folds.get(cons))
        pruned["magnitude", gid, cons] = pruned_columns(ctx, magnitude[gid], cons, o, None)
    local, reference = _local_errors(ctx, offsets, pruned, example)
    pick = {gid: "magnitude" if e_m < e_w else "weights" for gid, (e_w, e_m) in local.items()}
    candidates = {"weights": dict.fromkeys(weights, "weights")}
    candidates["magnitude"] = dict.fromkeys(weights, "magnitude")
    if len(set(pick.values())) > 1:
        candidates["per-group"] = pick
    change = {
        k: network_change(
            ctx, {key: pruned[(c[key[0]], *key)] for key in offsets}, example, reference
        )
        for k, c in candidates.items()
    }
    best = min(change, key=lambda k: (change[k], k != "weights"))  # ties: the fold
    summary = ", ".join(f"{k} {v:.3g}" for k, v in change.items())
    chosen = {}
    for gid, mode in candidates[best].items():
        chosen[gid] = weights[gid] if mode == "weights" else magnitude[gid]
        if mode == "magnitude":
            e_w, e_m = local[gid]
            chosen[gid].note = (
                f"magnitude pruning used (mode='auto' without data): on the example input its "
                f"consumers' outputs change by {e_m:.3g} against {e_w:.3g} with the weights "
                f"fold (relative), the network's output by {summary}"
            )
    return chosen


def _local_errors(ctx, offsets, pruned, example):
    """group id -> the relative change of its consumers' outputs on ``example`` with the
    weights-mode prune and with the magnitude one (0, 0 when they read zeros there); and the
    model's output on ``example`` (from the same forward pass)."""
    inputs, output = _inputs_and_output(ctx, sorted({c for _, c in offsets}), example)
    sums: dict[int, list[float]] = {}
    for (gid, cons), o in offsets.items():
        acc = sums.setdefault(gid, [0.0, 0.0, 0.0])
        if cons not in inputs:
            continue
        keys = [("weights", gid, cons), ("magnitude", gid, cons)]
        (e_w, e_m), ref = _output_changes(
            ctx.modules[cons], inputs[cons], o, [pruned[k] for k in keys]
        )
        acc[0] += e_w
        acc[1] += e_m
        acc[2] += ref
    local = {
        gid: ((e_w / ref) ** 0.5, (e_m / ref) ** 0.5) if ref > 0 else (0.0, 0.0)
        for gid, (e_w, e_m, ref) in sums.items()
    }
    return local, output


@torch.no_grad()
def network_change(ctx: ResizeContext, pruned: dict, example, reference=None) -> float:
    """The relative change of the model's output on ``example`` after some prunes, simulated
    without changing the model: every consumer runs with its columns on each pruned group as
    the prune leaves them (dropped ones zeroed, the fold applied) and its folded constants
    added to its output, which is what the resize computes; ``inf`` when the model's output is
    not one tensor.

    Args:
        ctx: the model now.
        pruned: (group id, consumer) -> that consumer's columns on that group after its prune
            (:func:`pruned_columns`).
        example: an input (or a tuple of inputs) of the model.
        reference: the model's output on ``example`` as it is (computed when None).
    """
    weights: dict[str, Tensor] = {}
    shifts: dict[str, Tensor] = {}
    offsets = consumer_offsets(ctx, [ctx.graph.groups[gid] for gid, _ in pruned])
    for (gid, cons), (cols, shift) in pruned.items():
        A = ctx.modules[cons].weight
        W = weights.setdefault(cons, A.detach().clone())
        o = offsets[(gid, cons)]
        W.view(W.shape[0], -1, cols.shape[2])[:, o : o + cols.shape[1]] = cols
        if shift is not None:
            shifts[cons] = shifts[cons] + shift if cons in shifts else shift
    model = ctx.modules[""]
    with eval_mode(model):
        y0 = model(*as_args(example)) if reference is None else reference
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
        return out + shift.to(out.dtype).view(_channel_shape(mod, out))

    return hook
