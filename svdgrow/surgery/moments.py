"""Where the fold's moments come from: the mean and covariance of what each consumer reads on a
group's channels, measured on a batch (:func:`capture_features`, data mode; a Conv2d's input is
kept for the fold on its im2col patches) or predicted from the weights and BatchNorm
statistics (:func:`predict_features`, weights mode).

See docs/design.md, "Stage 4: surgery" (the fold and weights mode's predicted moments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._utils import as_args, column_mean, eval_mode
from ..spectrum import (
    bn_affine,
    bn_output_stats,
    effective_bias,
    group_matrix,
    norm_directly_after,
    producer_matrix,
)
from ..trace import Group
from .context import ResizeContext
from .patches import fits_on_patches, live_taps, tap_fractions
from .pivots import solve_spd

__all__ = [
    "ACTIVATIONS",
    "ConsumerMoments",
    "Moments",
    "capture_features",
    "consumer_offsets",
    "detect_activation",
    "predict_features",
]

#: The elementwise activation modules :func:`detect_activation` recognises.
ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.PReLU,
)


@dataclass
class ConsumerMoments:
    """What one consumer reads on one group's ``n`` channels (float64 tensors).

    Attributes:
        mean (Tensor[n]): the mean per channel.
        cov (Tensor[n, n]): the covariance.
        count: the samples they were taken on.
        taps (Tensor[B] | None): for a Conv2d with ``B = kh*kw`` taps, the fraction of its
            output positions at which each tap reads data rather than zero padding; None when
            not known (then every tap is taken to read data).
        patch_input (Tensor[N, n, H, W] | None): data mode, on a Conv2d that
            :func:`~svdgrow.surgery.patches.fits_on_patches` with more than one tap reading
            data: its input on the group's channels (a view of the batch's activation), for
            the fold on its im2col patches (:func:`~svdgrow.surgery.patches.patch_fold`).
    """

    mean: Tensor
    cov: Tensor
    count: int
    taps: Tensor | None = None
    patch_input: Tensor | None = None


#: (group id, consumer) -> what that consumer reads on that group's channels.
Moments = dict[tuple[int, str], ConsumerMoments]


def detect_activation(model: nn.Module):
    """The model's elementwise activation when it uses one kind only (as modules), else None.

    Two modules are the same kind when their types and ``extra_repr`` (``inplace`` aside)
    match. A PReLU has learned, possibly per-channel slopes: not one function, so None.

    Args:
        model: the network.

    Returns:
        a function of one tensor that never modifies its input, or None.
    """
    kinds = {}
    for m in model.modules():
        if isinstance(m, ACTIVATIONS):
            if isinstance(m, nn.PReLU):
                return None
            key = (type(m), m.extra_repr().replace("inplace=True", "").strip(", "))
            kinds.setdefault(key, m)
    if len(kinds) != 1:
        return None
    act = next(iter(kinds.values()))
    return lambda x: act(x) if not getattr(act, "inplace", False) else act(x.clone())


def consumer_offsets(ctx: ResizeContext, groups: list[Group]) -> dict[tuple[int, str], int]:
    """(group id, consumer) -> channel offset of the group in that consumer's input.

    Args:
        ctx: the model now.
        groups: the groups whose consumers are wanted.
    """
    firsts: dict[str, dict[int, int]] = {}  # consumer -> group id -> first offset
    offsets = {}
    for g in groups:
        for cons in g.consumers:
            if cons not in firsts:  # one walk over each consumer's segments
                first, o = {}, 0
                for seg in ctx.graph.consumers[cons].segments:
                    first.setdefault(seg, o)
                    o += ctx.widths[seg]
                firsts[cons] = first
            if g.id in firsts[cons]:
                offsets[(g.id, cons)] = firsts[cons][g.id]
    return offsets


def _predicted_preactivation(
    ctx: ResizeContext, g: Group, grams: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean and covariance of group ``g``'s pre-activation as weights mode models it (see
    :func:`predict_features`), after any BatchNorm that follows the add, and a factor ``F``
    with ``F F^T = cov`` when the group matrix has fewer columns than rows (None otherwise).
    ``grams``: the producers' ``G_p G_p^T`` when already formed (by stage 2).

    With a factor the covariance is left out (None): its ``n x n`` products per producer cost
    ``n^2 D`` (mobilenet_v2's 1280-wide last group: most of its weights-mode fold) and only a
    linear network, which has no samples to draw, reads it (``F F^T`` then)."""
    after = norm_directly_after(g)
    G, tall = None, False
    if grams is None:
        G, blocks, _, b_eff = group_matrix(ctx.modules, g)
        tall = G.shape[1] < G.shape[0]  # mu in the D columns' space, samples from G itself
        if not tall:
            grams = {p: G[:, start:end] @ G[:, start:end].T for p, start, end in blocks}
    else:
        b_eff = effective_bias(ctx.modules, g)
    n = len(b_eff)
    target = torch.zeros_like(b_eff)
    gram = cov = None
    if not tall:
        gram = torch.zeros(n, n, dtype=b_eff.dtype, device=b_eff.device)  # G G^T
        cov = torch.zeros_like(gram)
    traces = (  # trace(G_p G_p^T) = ||G_p||_F^2
        {p: float(G[:, a:b].square().sum()) for p, a, b in blocks} if tall
        else {p: float(grams[p].diagonal().sum()) for p in g.producers}
    )  # fmt: skip
    alphas = {}
    for p in g.producers:
        if p in after:
            mean_p, std_p = bn_output_stats(ctx.modules[after[p]])
            alphas[p] = float((std_p * std_p).sum()) / max(traces[p], 1e-30)
        else:
            bias = getattr(ctx.modules[p], "bias", None)
            mean_p = bias.detach().double() if bias is not None else torch.zeros_like(b_eff)
            alphas[p] = 1.0
        target += mean_p
        if not tall:
            gram += grams[p]
            cov += alphas[p] * grams[p]
    lam = 1e-10 * sum(traces.values()) + 1e-30
    factor = None
    if tall:
        eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
        mean = b_eff + G @ solve_spd(G.T @ G + lam * eye, G.T @ (target - b_eff))
        factor = torch.cat([G[:, a:b] * alphas[p] ** 0.5 for p, a, b in blocks], 1)
    else:
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
        mean = b_eff + gram @ solve_spd(gram + lam * eye, target - b_eff)  # b + G mu
    for nm, prod in g.norm_after.items():
        if prod is None:  # a BatchNorm after the add: its eval-mode affine map
            scale, shift = bn_affine(ctx.modules[nm])
            mean = scale * mean + shift
            cov = scale[:, None] * cov * scale[None, :] if cov is not None else None
            factor = scale[:, None] * factor if factor is not None else None
    return mean, cov, factor


def _factor_width(ctx: ResizeContext, g: Group) -> int:
    """The number of columns of the factor :func:`predict_features` samples group ``g``
    through: the group matrix's short side, ``min(n, D)`` (the matrix itself when it has fewer
    columns than rows, else a Cholesky factor of the ``n x n`` covariance)."""
    shapes = [producer_matrix(ctx.modules[p]).shape for p in g.producers]
    return min(shapes[0][0], sum(s[1] for s in shapes))


def _gaussian_factor(cov: Tensor) -> Tensor:
    """``L`` with ``L L^T = cov`` up to a jitter of ``1e-12`` of the mean variance (so an
    exact linear relation between channels holds in the samples to about ``1e-6``): a Cholesky
    factor, or the eigendecomposition's where Cholesky fails."""
    jitter = 1e-12 * max(float(cov.diagonal().mean()), 0.0) + 1e-300
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    L, info = torch.linalg.cholesky_ex(cov + jitter * eye)
    if int(info) == 0:
        return L
    ev, Q = torch.linalg.eigh(cov)
    return Q * ev.clamp_min(0).sqrt()[None, :]


@torch.no_grad()
def predict_features(
    ctx: ResizeContext,
    groups: list[Group],
    activation=None,
    samples: int = 2048,
    generator: torch.Generator | None = None,
    input_sizes: dict[str, tuple[int, int]] | None = None,
    grams: dict[int, dict[str, Tensor]] | None = None,
) -> tuple[Moments, dict[tuple[int, str], int]]:
    """Data-free stand-in for :func:`capture_features`: the moments every consumer reads on a
    group's channels, predicted from the weights.

    The group's pre-activation ``z = G x + b`` (group matrix and effective bias of
    :func:`svdgrow.spectrum.group_matrix`) is modelled as Gaussian: covariance
    ``sum_p alpha_p G_p G_p^T`` with each producer's input isotropic and scaled to the variance
    its direct BatchNorm recorded, mean ``b + G mu`` with ``mu`` fitted to the recorded means.
    Samples (float32; ``z = mean + L e`` with ``L`` the scaled group matrix itself when it has
    fewer columns than rows, else a Cholesky factor of the covariance; one draw of ``e`` whose
    leading columns every group shares) go through ``activation``.
    See docs/design.md, "Stage 4: surgery".

    Args:
        ctx: the model now.
        groups: the groups to predict for.
        activation: elementwise activation (see :func:`detect_activation`); None: linear, and
            the moments are exact without sampling.
        samples: Gaussian samples pushed through ``activation``.
        generator: CPU random generator of the samples.
        input_sizes: the input's spatial size of each zero-padded Conv2d consumer, for its
            :func:`~svdgrow.surgery.patches.tap_fractions` (see
            :func:`~svdgrow.surgery.patches.consumer_input_sizes`); one left out is folded as
            if every tap read data.
        grams: group id -> producer -> ``G_p G_p^T`` already formed (see
            :func:`svdgrow.spectrum.analyse_groups`); the others are formed here.

    Returns:
        the same ``(moments, offsets)`` as :func:`capture_features`.
    """
    offsets = consumer_offsets(ctx, groups)
    feats: Moments = {}
    # One draw of standard normals, its leading columns shared by every group: each group's
    # moments still come from `samples` independent draws (only their errors are correlated
    # across groups, which no fold reads), and one large draw costs a fraction of one per group
    # (DenseNet: 120 small draws were a fifth of a weights-mode resize). Its width is the widest
    # factor's, known from the shapes, so the groups are still modelled one at a time.
    noise = None
    if activation is not None and groups:
        width = max(_factor_width(ctx, g) for g in groups)
        noise = torch.randn(samples, width, generator=generator)
    for g in groups:
        mean, cov, factor = _predicted_preactivation(ctx, g, (grams or {}).get(g.id))
        if activation is None:
            mu, fcov = mean, (cov if cov is not None else factor @ factor.T)
        else:
            L = (factor if factor is not None else _gaussian_factor(cov)).float()
            z = noise[:, : L.shape[1]].to(mean.device)  # _factor_width: never narrower
            f = activation(torch.addmm(mean.float()[None, :], z, L.T))
            mu = column_mean(f)
            fc = f - mu.float()
            fcov = (fc.T @ fc).double() / max(samples - 1, 1)
        for cons in g.consumers:
            size = (input_sizes or {}).get(cons)
            taps = tap_fractions(ctx.modules[cons], size) if size is not None else None
            feats[(g.id, cons)] = ConsumerMoments(mu, fcov, samples, taps)
    return feats, offsets


@torch.no_grad()
def capture_features(
    ctx: ResizeContext,
    groups: list[Group],
    data,
    max_samples: int = 16384,
    generator: torch.Generator | None = None,
) -> tuple[Moments, dict[tuple[int, str], int]]:
    """Run the model (``ctx.modules[""]``, in eval mode) on ``data`` and collect, for every
    consumer of every group, the mean and covariance of its INPUT on the group's channels.

    A Conv2d input gives one sample per position, a Linear after Flatten one per channel block.
    For a Conv2d with a kernel wider than 1x1 or zero padding, the fraction of positions each
    tap reads data at is recorded, and its input on the group's channels is kept (a view) when
    more than one tap reads data: the fold is then fitted per column on its im2col patches once
    the kept channels are known (see :func:`~svdgrow.surgery.patches.patch_fold`).

    Args:
        ctx: the model now.
        groups: the groups to measure.
        data: a batch (a tensor, or a tuple of the model's positional inputs).
        max_samples: at most this many samples per consumer (random positions).
        generator: CPU random generator of the sub-sampling.

    Returns:
        (moments, offsets): (group id, consumer) -> :class:`ConsumerMoments`; and
        (group id, consumer) -> channel offset.
    """
    offsets = consumer_offsets(ctx, groups)
    wanted: dict[str, list[tuple[int, int, int]]] = {}
    for (gid, cons), o in offsets.items():
        wanted.setdefault(cons, []).append((gid, o, ctx.widths[gid]))
    feats: Moments = {}

    hooks = [
        ctx.modules[name].register_forward_pre_hook(
            _capture_hook(ctx, name, wanted[name], feats, max_samples, generator)
        )
        for name in wanted
    ]
    try:
        with eval_mode(ctx.modules[""]) as model:
            model(*as_args(data))
    finally:
        for h in hooks:
            h.remove()
    return feats, offsets


def _capture_hook(ctx, name: str, wanted, feats: Moments, max_samples: int, generator):
    """The forward pre-hook of :func:`capture_features` on consumer ``name``: for each
    ``(group id, offset, width)`` in ``wanted``, the moments of its input on those channels."""

    def hook(mod, inputs):
        x = inputs[0].detach()
        C = sum(ctx.widths[s] for s in ctx.graph.consumers[name].segments)
        # linear input [N, C*B]: one sample per channel block; conv [N, C, H, W]: per position;
        # a Linear on a channels-last value [N, ..., C]: per position
        if isinstance(mod, nn.Linear) and x.dim() > 2:
            v = x.reshape(-1, C, 1)
        else:
            v = x.reshape(x.shape[0], C, -1) if x.dim() == 2 else x.flatten(2)
        N, _, P = v.shape
        # the wanted channels' span, one sample per row (sample-major), gathered once for all
        # the groups this consumer reads (a DenseNet layer reads up to 40)
        lo, hi = min(o for _, o, _ in wanted), max(o + n for _, o, n in wanted)
        if N * P > max_samples:
            pick = torch.randperm(N * P, generator=generator)[:max_samples].to(x.device)
            span = v[pick // P, lo:hi, pick % P]  # Tensor[samples, hi - lo]
        else:  # every position: a transposed copy, not a gather
            span = v[:, lo:hi].transpose(1, 2).reshape(N * P, hi - lo)
        taps = live = None
        if fits_on_patches(mod):
            taps = tap_fractions(mod, tuple(x.shape[2:]))
            live = len(live_taps(mod, tuple(x.shape[2:]))) > 1
        for gid, o, n in wanted:
            f = span[:, o - lo : o - lo + n].contiguous()  # Tensor[samples, n]
            mu = column_mean(f)
            fc = f - mu.to(f.dtype)
            cov = (fc.T @ fc).double() / max(f.shape[0] - 1, 1)
            moments = ConsumerMoments(mu, cov, f.shape[0])
            if taps is not None:
                moments.taps = taps  # read only
                if live:
                    moments.patch_input = x[:, o : o + n]
            feats[(gid, name)] = moments

    return hook
