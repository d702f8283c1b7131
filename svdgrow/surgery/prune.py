"""Prune planning: which channels a prune keeps and what it folds into the consumers.

Keep a channel set ``K``, drop the rest ``D``, and fit what the dropped channels carried as a
linear function of the kept ones, ``f_D ~ M f_K + c``, on the consumers' input moments
(:mod:`svdgrow.surgery.moments`). See docs/design.md, "Stage 4: surgery".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..spectrum import group_matrix
from ..trace import Group
from .context import ResizeContext
from .moments import Moments, capture_features, predict_features
from .pivots import complement, pivoted_cholesky, pivoted_cholesky_batched

__all__ = [
    "MODES",
    "GroupChange",
    "data_pivot_gram",
    "plan_prune_data",
    "plan_prune_magnitude",
    "plan_prunes",
]

#: How a prune compensates for the dropped channels (see :class:`svdgrow.Resizer`).
MODES = ("data", "weights", "magnitude")


@dataclass
class GroupChange:
    """What happens to one group.

    Attributes:
        group: the group.
        old_width: its width before.
        new_width: its width after.
        action: ``'prune'`` or ``'grow'``.
        keep (Tensor[new_width], int64): the kept channels, ascending (a prune).
        drop (Tensor[old_width - new_width], int64): the dropped channels (a prune).
        grown_rows: producer -> its new rows ``Tensor[new_width - old_width, in*kh*kw]`` (a
            grow; filled by :func:`svdgrow.surgery.build_plan`).
        folds: consumer -> ``(M (Tensor[|D|, |K|]), c (Tensor[|D|]))`` (a prune; a consumer
            without an entry drops its columns without a fold).
    """

    group: Group
    old_width: int
    new_width: int
    action: str
    keep: Tensor | None = None
    drop: Tensor | None = None
    grown_rows: dict[str, Tensor] = field(default_factory=dict)
    folds: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def data_pivot_gram(
    ctx: ResizeContext, group: Group, feats: Moments, offsets: dict[tuple[int, str], int]
) -> Tensor:
    """The Gram matrix whose pivoted Cholesky chooses the kept channels.

    The covariance of the group's features pooled over its consumers, each channel weighted by
    the norm of the consumer columns that read it, trace-normalised per consumer.

    Args:
        ctx: the model now.
        group: the group to prune.
        feats: from :func:`capture_features` or :func:`predict_features`.
        offsets: (group id, consumer) -> channel offset of the group in that consumer.

    Raises:
        RuntimeError: no consumer of the group has moments.
    """
    n = ctx.widths[group.id]
    pooled = None
    for cons in group.consumers:
        key = (group.id, cons)
        if key not in feats:
            continue
        _, cov, _ = feats[key]
        A = ctx.modules[cons].weight.detach().double()
        A = A.reshape(A.shape[0], -1, ctx.weight_block(cons))
        o = offsets[key]
        col_norm = A[:, o : o + n, :].pow(2).sum(dim=(0, 2)).sqrt()
        w = col_norm[:, None] * cov * col_norm[None, :]
        tr = float(torch.diagonal(w).sum())
        w = w / tr if tr > 0 else w
        pooled = w if pooled is None else pooled + w
    if pooled is None:
        raise RuntimeError(
            f"group {group.name!r}: data mode captured no features for its consumers "
            f"{group.consumers}"
        )
    return pooled


def plan_prune_data(
    ctx: ResizeContext,
    group: Group,
    r: int,
    feats: Moments,
    offsets: dict[tuple[int, str], int],
    ridge: float,
    pivots: Tensor | None = None,
) -> GroupChange:
    """Prune ``group`` to ``r`` channels with the fold fitted on its consumers' input moments:
    ``M = S_DK (S_KK + lambda I)^-1``, ``c = mu_D - M mu_K`` per consumer.

    Args:
        ctx: the model now.
        group: the group to prune.
        r: its new width.
        feats: from :func:`capture_features` (data mode) or :func:`predict_features` (weights).
        offsets: (group id, consumer) -> channel offset of the group in that consumer.
        ridge: relative ridge, ``lambda = ridge * trace(S_KK) / r``.
        pivots: the kept channels when already chosen; else chosen here by pivoted Cholesky
            of :func:`data_pivot_gram`.
    """
    n = ctx.widths[group.id]
    if pivots is None:
        pivots = pivoted_cholesky(data_pivot_gram(ctx, group, feats, offsets), r)
    keep = torch.sort(pivots).values
    drop = complement(keep, n)
    change = GroupChange(group, n, r, "prune", keep=keep, drop=drop)
    for cons in group.consumers:
        if (group.id, cons) not in feats:  # this consumer did not run: drop without a fold
            continue
        mu, cov, _ = feats[(group.id, cons)]
        S_KK = cov[keep][:, keep]
        S_KD = cov[keep][:, drop]
        lam = ridge * float(torch.diagonal(S_KK).sum()) / max(r, 1) + 1e-12
        eye = torch.eye(r, dtype=S_KK.dtype, device=S_KK.device)
        M = torch.linalg.solve(S_KK + lam * eye, S_KD).T
        c = mu[drop] - M @ mu[keep]
        change.folds[cons] = (M, c)
    return change


def plan_prune_magnitude(ctx: ResizeContext, group: Group, r: int) -> GroupChange:
    """Baseline prune: keep the ``r`` channels whose group-matrix rows are largest, fold nothing.

    Args:
        ctx: the model now.
        group: the group to prune.
        r: its new width.
    """
    n = ctx.widths[group.id]
    G, _, _, _ = group_matrix(ctx.modules, group)
    keep = torch.sort(torch.topk(G.norm(dim=1), r).indices).values
    return GroupChange(group, n, r, "prune", keep=keep, drop=complement(keep, n))


def plan_prunes(
    mode: str,
    ctx: ResizeContext,
    targets: dict[int, int],
    *,
    data=None,
    activation=None,
    ridge: float = 1e-3,
    max_samples: int = 16384,
    generator: torch.Generator | None = None,
) -> dict[int, GroupChange]:
    """Plan every prune of one resize.

    Data and weights mode are one least-squares fold on the consumers' input moments, measured
    on ``data`` or predicted from the weights; the kept channels of all groups are chosen in
    one batched pivoted Cholesky. Magnitude mode keeps the largest rows and folds nothing.

    Args:
        mode: one of :data:`MODES`.
        ctx: the model now.
        targets: group id -> new width, each below the current one.
        data: the batch data mode measures on.
        activation: what weights mode pushes its predicted pre-activations through.
        ridge: relative ridge of the fold (see :func:`plan_prune_data`).
        max_samples: feature vectors per consumer in data mode.
        generator: CPU random generator (data mode's sub-sampling, weights mode's samples).

    Returns:
        group id -> its :class:`GroupChange`.

    Raises:
        ValueError: an unknown mode, or data mode without ``data``.
    """
    if mode not in MODES:
        raise ValueError(f"prune mode must be one of {MODES}, got {mode!r}")
    groups = [ctx.graph.groups[gid] for gid in targets]
    if not groups:
        return {}
    if mode == "magnitude":
        return {g.id: plan_prune_magnitude(ctx, g, targets[g.id]) for g in groups}
    if mode == "data":
        if data is None:
            raise ValueError("mode='data' prunes need a batch: pass data=... to step() or apply()")
        feats, offsets = capture_features(ctx, groups, data, max_samples, generator)
    else:
        feats, offsets = predict_features(ctx, groups, activation, generator=generator)
    grams = [data_pivot_gram(ctx, g, feats, offsets) for g in groups]
    pivots = pivoted_cholesky_batched(grams, [targets[g.id] for g in groups])
    return {
        g.id: plan_prune_data(ctx, g, targets[g.id], feats, offsets, ridge, piv)
        for g, piv in zip(groups, pivots, strict=True)
    }
