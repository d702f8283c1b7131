"""Row renormalisation after a resize: folding pruned channels into a consumer inflates its rows;
behind a BatchNorm a row's scale does not change the function but divides its effective
learning rate by the scale squared. :func:`renormalize_rows_` scales those rows back.
See docs/design.md, "Stage 4: surgery" (row renormalisation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..optim_state import KNOWN_STATE
from ..trace import CouplingGraph
from .context import NORMS, layer_facts

__all__ = ["normed_producers", "renormalize_rows_", "row_norm_snapshot"]

#: module name -> (weight shape, RMS row norm), from :func:`row_norm_snapshot`.
RowNorms = dict[str, tuple[tuple[int, ...], float]]


def normed_producers(
    model: nn.Module, graph: CouplingGraph
) -> list[tuple[str, nn.Module, nn.Module]]:
    """Every Conv2d/Linear directly followed by a BatchNorm (``Group.norm_after``), as
    ``(name, layer, norm)`` in the model's module order.

    Such a layer is scale-invariant per output row: scaling row ``i`` (and its bias) by ``c``
    and the norm's ``running_mean[i]`` by ``c`` and ``running_var[i]`` by ``c**2`` keeps the
    function (exactly in training mode; in eval mode up to the norm's ``eps``).

    Args:
        model: the traced model.
        graph: its coupling graph.
    """
    modules = dict(model.named_modules())
    norm_of = {
        prod: norm
        for g in graph.groups
        for norm, prod in g.norm_after.items()
        if prod is not None and isinstance(modules.get(norm), NORMS)
    }
    return [
        (name, m, modules[norm_of[name]])
        for name, m in modules.items()
        if name in norm_of and layer_facts(m) is not None
    ]


@torch.no_grad()
def row_norm_snapshot(model: nn.Module, graph: CouplingGraph) -> RowNorms:
    """Weight shape and RMS row norm of every BatchNorm-followed layer (see
    :func:`normed_producers`), to take just before a resize.

    Args:
        model: the traced model.
        graph: its coupling graph.

    Returns:
        module name -> (weight shape, RMS of its rows' L2 norms).
    """
    out = {}
    for name, layer, _ in normed_producers(model, graph):
        w = layer.weight
        rms = w.reshape(w.shape[0], -1).norm(dim=1).pow(2).mean().sqrt()
        out[name] = (tuple(w.shape), float(rms))
    return out


def _only_grew(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a weight kept or enlarged every dimension (unchanged counts as grown)."""
    return len(after) == len(before) and all(a >= b for a, b in zip(after, before, strict=True))


@torch.no_grad()
def renormalize_rows_(
    model: nn.Module,
    graph: CouplingGraph,
    optimizer: torch.optim.Optimizer | None,
    before: RowNorms,
) -> dict[str, float]:
    """Scale the rows of every BatchNorm-followed layer that lost rows or columns since
    ``before`` back to that layer's RMS row norm from ``before``.

    A layer that only grew (rows or input columns added, none removed) is left alone: growth
    does not inflate rows, and rescaling would move the function through the norm's ``eps``
    (in training mode the norm divides by ``sqrt(c**2 var + eps)``, not ``c sqrt(var + eps)``).

    Each row ``i`` gets a factor ``c_i``; its bias is scaled by ``c_i``, the norm's running
    mean by ``c_i`` and running var by ``c_i**2`` (the function is unchanged), and the
    optimizer's per-row state as the gradients scale: a state entry holding the ``k``-th
    power of the gradient (:data:`svdgrow.optim_state.KNOWN_STATE`) is divided by ``c_i**k``.
    State of an optimizer not in ``KNOWN_STATE`` is left as it is.

    Args:
        model: the traced model, just after a resize.
        graph: its coupling graph.
        optimizer: whose state follows (None: no state).
        before: :func:`row_norm_snapshot` taken just before the resize.

    Returns:
        module name -> mean factor applied to its rows, for every rescaled layer.
    """
    powers = KNOWN_STATE.get(type(optimizer), {}) if optimizer is not None else {}
    applied: dict[str, float] = {}
    for name, layer, norm in normed_producers(model, graph):
        shape, target = before.get(name, (None, 0.0))
        w = layer.weight
        if shape is None or not target > 0 or _only_grew(shape, tuple(w.shape)):
            continue
        rows = w.reshape(w.shape[0], -1).norm(dim=1)
        c = torch.where(rows > 0, target / rows.clamp_min(1e-30), torch.ones_like(rows))
        for p in (w, layer.bias):
            if p is None:
                continue
            view = c.view(-1, *([1] * (p.dim() - 1)))
            p.mul_(view)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key, t in state.items():
                if powers.get(key, 0) and isinstance(t, torch.Tensor) and t.shape == p.shape:
                    t.div_(view ** powers[key])
        if norm.running_mean is not None:
            norm.running_mean.mul_(c)
            norm.running_var.mul_(c * c)
        applied[name] = float(c.mean())
    return applied
