"""Prune planning: which channels a prune keeps and what it folds into the consumers.

Keep a channel set ``K``, drop the rest ``D``, and fit what the dropped channels carried as a
linear function of the kept ones, ``f_D ~ M f_K + c``, on the consumers' input moments
(:mod:`svdgrow.surgery.moments`). See docs/design.md, "Stage 4: surgery".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..spectrum import bn_affine, norm_directly_after, producer_matrix
from ..trace import Group
from .context import ResizeContext
from .moments import Moments, capture_features, predict_features
from .patches import patch_fold
from .pivots import complement, pivoted_cholesky_batched, solve_spd

__all__ = [
    "MODES",
    "GroupChange",
    "data_pivot_gram",
    "group_row_norms",
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
        folds: consumer -> ``(M, c)`` (a prune; a consumer without an entry drops its columns
            without a fold): ``A_K <- A_K + A_D M``, ``bias <- bias + A_D c`` over the
            consumer's columns. ``M`` (Tensor[|D|, |K|]) maps every column of a channel alike,
            or (Tensor[|D|*B, |K|*B], columns channel-major) each column on its own; ``c``
            (Tensor[|D|]) is the same at every column of a channel, or (Tensor[|D|*B]) given
            per column.
        note: why this prune is not the one its mode asked for, when it is not (``mode="auto"``
            without data falling back to magnitude pruning, see
            :func:`svdgrow.surgery.check.prefer_measured`).
    """

    group: Group
    old_width: int
    new_width: int
    action: str
    keep: Tensor | None = None
    drop: Tensor | None = None
    grown_rows: dict[str, Tensor] = field(default_factory=dict)
    folds: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    note: str | None = None


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
        cov = feats[key].cov
        A = ctx.modules[cons].weight.detach()
        A = A.reshape(A.shape[0], -1, ctx.weight_block(cons))
        o = offsets[key]
        col_norm = torch.linalg.vector_norm(A[:, o : o + n, :], dim=(0, 2), dtype=torch.float64)
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
    max_samples: int = 16384,
    generator: torch.Generator | None = None,
) -> GroupChange:
    """Prune ``group`` to ``r`` channels with the fold fitted on its consumers' input moments:
    ``M = S_DK (S_KK + lambda I)^-1``, ``c = mu_D - M mu_K`` per consumer, on channels, then
    refitted on the im2col patches of a Conv2d measured on data
    (:func:`~svdgrow.surgery.patches.patch_fold`: each tap its own share, and the border taps
    that read zeros, which no per-channel constant can follow). A per-channel constant is
    weighted by the fraction of positions each tap reads data at, when that is known.

    Args:
        ctx: the model now.
        group: the group to prune.
        r: its new width.
        feats: from :func:`capture_features` (data mode) or :func:`predict_features` (weights).
        offsets: (group id, consumer) -> channel offset of the group in that consumer.
        ridge: relative ridge, ``lambda = ridge * trace(S_KK) / r``.
        pivots: the kept channels when already chosen; else chosen here by pivoted Cholesky
            of :func:`data_pivot_gram`.
        max_samples: the most output positions a patch fold is fitted on.
        generator: CPU random generator of those positions.
    """
    patch_args = {"max_samples": max_samples, "ridge": ridge, "generator": generator}
    n = ctx.widths[group.id]
    if pivots is None:
        pivots = pivoted_cholesky_batched([data_pivot_gram(ctx, group, feats, offsets)], [r])[0]
    keep = torch.sort(pivots).values
    drop = complement(keep, n)
    change = GroupChange(group, n, r, "prune", keep=keep, drop=drop)
    fits: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}  # one per moments object
    for cons in group.consumers:
        if (group.id, cons) not in feats:  # this consumer did not run: drop without a fold
            continue
        moments = feats[(group.id, cons)]
        shared = (id(moments.mean), id(moments.cov))  # weights mode: one pair for every consumer
        if shared not in fits:
            fits[shared] = _fit(moments.mean, moments.cov, keep, drop, ridge)
        M, c, S_KK = fits[shared]
        fold = None
        if moments.patch_input is not None:
            fold = patch_fold(
                moments.patch_input, ctx.modules[cons], keep, drop, (M, S_KK), **patch_args
            )
        if fold is not None:
            M, c = fold
        elif moments.taps is not None:  # the constant reaches only the taps that read data
            c = (c[:, None] * moments.taps.to(c)[None, :]).flatten()
        change.folds[cons] = (M, c)
    return change


def _fit(mu: Tensor, cov: Tensor, keep: Tensor, drop: Tensor, ridge: float):
    """The least-squares fold ``f_drop ~ M f_keep + c`` on the moments ``mu``, ``cov``:
    ``M = S_DK (S_KK + lambda I)^-1``, ``c = mu_D - M mu_K``,
    ``lambda = ridge * trace(S_KK) / |K|``. Returns ``(M, c, S_KK)``."""
    rows = cov[keep]
    S_KK, S_KD = rows[:, keep], rows[:, drop]
    lam = ridge * float(torch.diagonal(S_KK).sum()) / max(len(keep), 1) + 1e-12
    eye = torch.eye(len(keep), dtype=S_KK.dtype, device=S_KK.device)
    M = solve_spd(S_KK + lam * eye, S_KD).T
    return M, mu[drop] - M @ mu[keep], S_KK


def plan_prune_magnitude(ctx: ResizeContext, group: Group, r: int) -> GroupChange:
    """Baseline prune: keep the ``r`` channels whose group-matrix rows are largest, fold nothing.

    Args:
        ctx: the model now.
        group: the group to prune.
        r: its new width.
    """
    n = ctx.widths[group.id]
    keep = torch.sort(torch.topk(group_row_norms(ctx, group), r).indices).values
    return GroupChange(group, n, r, "prune", keep=keep, drop=complement(keep, n))


def group_row_norms(ctx: ResizeContext, group: Group) -> Tensor:
    """The norms of the group matrix's rows (float64), from its producers' rows and their
    direct BatchNorms' scales, without forming the matrix (see
    :func:`svdgrow.spectrum.group_matrix`).

    Args:
        ctx: the model now.
        group: a group with producers.
    """
    after = norm_directly_after(group)
    total = None
    for p in group.producers:
        W = producer_matrix(ctx.modules[p]).detach()
        sq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float64) ** 2
        if p in after:
            sq = sq * bn_affine(ctx.modules[after[p]])[0] ** 2
        total = sq if total is None else total + sq
    return total.sqrt()


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
    input_sizes: dict[str, tuple[int, int]] | None = None,
    grams: dict[int, dict[str, Tensor]] | None = None,
    features: tuple[Moments, dict[tuple[int, str], int]] | None = None,
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
        input_sizes: weights mode: the input's spatial size of each zero-padded Conv2d
            consumer (see :func:`~svdgrow.surgery.patches.consumer_input_sizes`).
        grams: weights mode: the producers' ``G_p G_p^T`` stage 2 formed on the same weights
            (see :func:`svdgrow.spectrum.analyse_groups`).
        features: data mode: :func:`capture_features`'s result on ``data`` for these groups (or
            more), measured on the same weights (a feature spectrum's); captured here when None.

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
        if features is None:
            features = capture_features(ctx, groups, data, max_samples, generator)
        feats, offsets = features
    else:
        feats, offsets = predict_features(
            ctx, groups, activation, generator=generator, input_sizes=input_sizes, grams=grams
        )
    grams = [data_pivot_gram(ctx, g, feats, offsets) for g in groups]
    pivots = pivoted_cholesky_batched(grams, [targets[g.id] for g in groups])
    return {
        g.id: plan_prune_data(
            ctx, g, targets[g.id], feats, offsets, ridge, piv, max_samples, generator
        )
        for g, piv in zip(groups, pivots, strict=True)
    }
