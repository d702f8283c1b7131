"""The fold per column of a Conv2d consumer: which kernel taps read data rather than zero
padding (:func:`tap_fractions`, :func:`live_taps`), its im2col patches, padding included
(:func:`gather_patches`), and the fold fitted on them (:func:`patch_fold`). See
docs/design.md, "Stage 4: surgery" (zero padding: the fold per column).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import as_args, column_mean, eval_mode
from .pivots import solve_spd

__all__ = [
    "PATCH_COST",
    "PATCH_DIM",
    "PATCH_MIN_MACS",
    "SAMPLES_PER_DIM",
    "consumer_input_sizes",
    "fits_on_patches",
    "gather_patches",
    "live_taps",
    "patch_fold",
    "tap_fractions",
    "zero_padding",
]

#: The most columns the least-squares system of :func:`patch_fold` has: kept channels'
#: principal directions times live taps (all kept channels when they fit).
PATCH_DIM = 512
#: Positions per column of that system at the least (fewer directions when the batch is short).
SAMPLES_PER_DIM = 4
#: The system's Gram matrix (``positions * columns**2`` multiply-adds) costs at most this
#: many times the consumer's own forward pass on the batch...
PATCH_COST = 1.0
#: ... or this many multiply-adds, when more (small layers keep every column and position).
PATCH_MIN_MACS = 2**24


def zero_padding(module: nn.Module) -> tuple[int, int, int, int] | None:
    """The zero padding a Conv2d adds, in ``F.pad`` order (left, right, top, bottom), or None
    when it adds none (another layer type, no padding, or a non-zero ``padding_mode``, whose
    border taps read copies of data).

    Args:
        module: the consumer.
    """
    if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return None
    if module.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = module.padding
        pads = [pw, pw, ph, ph]
    return tuple(pads) if any(pads) else None


def fits_on_patches(module: nn.Module) -> bool:
    """Whether data mode fits a consumer's fold on its im2col patches, one column at a time:
    a Conv2d whose kernel is wider than 1x1 (each tap may take its own share of the dropped
    channels) or that zero-pads (its border taps read zeros, which no per-channel constant
    can follow). Other consumers (Linear, 1x1 Conv2d without padding) read each channel
    one way, and their per-channel fold is already the least-squares optimum on patches.

    Args:
        module: the consumer.
    """
    if not isinstance(module, nn.Conv2d):
        return False
    return module.kernel_size != (1, 1) or zero_padding(module) is not None


def tap_fractions(module: nn.Conv2d, in_size: tuple[int, int]) -> Tensor:
    """For each kernel tap of a Conv2d, the fraction of its output positions at which that tap
    reads data rather than zero padding.

    Args:
        module: the convolution.
        in_size: its input's spatial size ``(H, W)``.

    Returns:
        Tensor[kh*kw] (float64), taps in the weight's row-major order.
    """
    pads = zero_padding(module) or (0, 0, 0, 0)
    axes = []
    for i, n_in in enumerate(in_size):
        k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
        before, after = pads[2 - 2 * i], pads[3 - 2 * i]
        n_out = (n_in + before + after - d * (k - 1) - 1) // s + 1
        pos = torch.arange(n_out)[:, None] * s - before + torch.arange(k)[None, :] * d
        axes.append(((pos >= 0) & (pos < n_in)).double().mean(0))
    return (axes[0][:, None] * axes[1][None, :]).flatten()


def live_taps(module: nn.Conv2d, in_size: tuple[int, int]) -> Tensor:
    """The kernel taps of a Conv2d that read data at one output position at least (the others
    read zero padding only, e.g. every tap but the centre one of a padded 3x3 on a 1x1 map).

    Args:
        module: the convolution.
        in_size: its input's spatial size ``(H, W)``.

    Returns:
        Tensor[B_live] (int64), ascending, in the weight's row-major tap order.
    """
    return (tap_fractions(module, in_size) > 0).nonzero().flatten()


def _output_size(hp: int, wp: int, module: nn.Conv2d) -> tuple[int, int]:
    """Output size of a Conv2d on a padded input of size ``(hp, wp)``."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1


def gather_patches(
    x: Tensor, module: nn.Conv2d, pick: Tensor, channels: Tensor, taps: Tensor
) -> Tensor:
    """Im2col patches of a Conv2d at some output positions, zero padding included.

    Args:
        x (Tensor[N, C, H, W]): the convolution's input (or the part of its channels wanted).
        module: the convolution.
        pick (Tensor[S], int64): output positions, numbered ``sample * oh * ow + y * ow + x``.
        channels (Tensor[c], int64): the input channels wanted (of ``x``).
        taps (Tensor[b], int64): the taps wanted, in the weight's row-major tap order.

    Returns:
        Tensor[S, c, b], in ``x``'s dtype.
    """
    pads = zero_padding(module) or (0, 0, 0, 0)
    # channels last: each gathered entry is one contiguous run of c values
    xp = F.pad(x[:, channels], pads).permute(0, 2, 3, 1).contiguous()
    oh, ow = _output_size(xp.shape[1], xp.shape[2], module)
    (_, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    sample, pos = pick // (oh * ow), pick % (oh * ow)
    iy = (pos // ow * sh)[:, None] + (taps // kw * dh)[None, :]  # [S, b]
    ix = (pos % ow * sw)[:, None] + (taps % kw * dw)[None, :]
    _, hp, wp, c = xp.shape
    rows = ((sample[:, None] * hp + iy) * wp + ix).flatten()  # one index per pixel: rows of c
    patches = xp.reshape(-1, c).index_select(0, rows).reshape(len(pick), len(taps), c)
    return patches.transpose(1, 2)  # [S, b, c] -> [S, c, b]


def patch_fold(
    x: Tensor,
    module: nn.Conv2d,
    keep: Tensor,
    drop: Tensor,
    fold: tuple[Tensor, Tensor],
    max_samples: int,
    ridge: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The fold of a Conv2d consumer fitted on its im2col patches, one column at a time.

    The per-channel fold ``M0`` (``fold``: ``M0`` and the covariance ``S_KK`` of the kept
    channels) is the first stage; its residual on the patches, ``e = f_D - (M0 x I) f_K``,
    is then fitted by least squares on ``z = (U^T x I) f_K``, the kept channels' ``q``
    leading principal directions ``U`` (eigenvectors of ``S_KK``) at every live tap, with
    an intercept: ``e ~ C z + c``. So ``M = M0 x I + C (U^T x I)`` and ``c`` per column.
    With every kept channel (``q = |K|``) this is the least-squares optimum on the patches
    (docs/design.md, "Zero padding: the fold per column"). The cost is kept in proportion: at
    most :data:`PATCH_DIM` columns, at least :data:`SAMPLES_PER_DIM` positions per column, and
    a Gram matrix of at most :data:`PATCH_COST` times the consumer's forward multiply-adds on
    the batch (or :data:`PATCH_MIN_MACS`); ``q`` and the positions shrink to fit.

    Args:
        x (Tensor[N, n, H, W]): the consumer's input on the group's ``n`` channels.
        module: the consumer.
        keep (Tensor[r], int64): the kept channels, ascending.
        drop (Tensor[n - r], int64): the dropped channels, ascending.
        fold: ``(M0 (Tensor[n-r, r]), S_KK (Tensor[r, r]))``, float64.
        max_samples: at most this many output positions.
        ridge: relative ridge, ``lambda = ridge * trace(S_zz) / dim(z)``.
        generator: CPU random generator of the positions.

    Returns:
        ``(M (Tensor[(n-r)*B, r*B]), c (Tensor[(n-r)*B]))``, float64, columns channel-major
        (``channel * B + tap``; zero at taps that only read padding), or None when the batch
        has too few positions for even one direction per tap.
    """
    M0, S_KK = fold
    B = module.kernel_size[0] * module.kernel_size[1]
    taps = live_taps(module, tuple(x.shape[2:])).to(x.device)
    left, right, top, bottom = zero_padding(module) or (0, 0, 0, 0)
    oh, ow = _output_size(x.shape[2] + top + bottom, x.shape[3] + left + right, module)
    total, b, nK = x.shape[0] * oh * ow, len(taps), len(keep)
    forward = total * module.out_channels * module.in_channels // module.groups * B
    budget = max(PATCH_COST * forward, PATCH_MIN_MACS)
    q_max = min(PATCH_DIM, int((budget / SAMPLES_PER_DIM) ** (1 / 3)))
    qc = min(nK, q_max // b, total // (SAMPLES_PER_DIM * b))
    if qc < 1:
        return None
    q = qc * b
    count = min(total, max_samples, max(SAMPLES_PER_DIM * q, int(budget) // q**2))
    if total > count:
        pick = torch.randperm(total, generator=generator)[:count].to(x.device)
    else:
        pick = torch.arange(total, device=x.device)
    U = None
    if qc < nK:  # the kept channels' leading principal directions
        U = torch.linalg.eigh(S_KK)[1][:, -qc:].flip(1)
    # Both sides of the fit are channel mixes of x, z = U^T x_K and e = x_D - M0 x_K, so they
    # are formed per pixel first (one matmul over the batch) and their patches gathered after: fewer
    # multiply-adds than mixing every gathered patch, and qc + |D| channels gathered, not n.
    # Zero padding maps to zero on both sides, as on the raw patches.
    nD = len(drop)
    P = x.new_zeros(qc + nD, x.shape[1])
    P[:qc, keep.to(x.device)] = (U.T if U is not None else torch.eye(nK, dtype=M0.dtype)).to(x)
    P[qc:, keep.to(x.device)] = -M0.to(x)
    P[qc:, drop.to(x.device)] = torch.eye(nD, dtype=x.dtype, device=x.device)
    y = torch.matmul(P, x.reshape(x.shape[0], x.shape[1], -1)).reshape(-1, len(P), *x.shape[2:])
    X = gather_patches(y, module, pick, torch.arange(qc + nD, device=x.device), taps)
    Z, E = X[:, :qc], X[:, qc:]  # [S, qc, b], [S, |D|, b]
    C, c = _least_squares(Z.reshape(count, q), E.reshape(count, -1), ridge)
    C = C.reshape(len(drop), b, qc, b)
    if U is not None:
        C = torch.einsum("dtqu,kq->dtku", C, U)
    C = C + torch.einsum("dk,tu->dtku", M0, torch.eye(b, dtype=C.dtype, device=C.device))
    M = C.new_zeros(len(drop), B, nK, B)
    M[:, taps[:, None], :, taps[None, :]] = C.permute(1, 3, 0, 2)
    c_full = c.new_zeros(len(drop), B)
    c_full[:, taps] = c.reshape(len(drop), b)
    return M.reshape(len(drop) * B, nK * B), c_full.flatten()


def _least_squares(Z: Tensor, E: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Ridge least squares with an intercept on samples: ``E ~ Z C^T + c``; float32 products,
    float64 solve. Returns ``C`` (Tensor[e, z]) and ``c`` (Tensor[e]), float64."""
    zm, em = column_mean(Z), column_mean(E)
    Zc, Ec = Z - zm.to(Z.dtype), E - em.to(E.dtype)
    S_zz = (Zc.T @ Zc).double()
    S_ze = (Zc.T @ Ec).double()
    lam = ridge * float(torch.diagonal(S_zz).sum()) / max(S_zz.shape[0], 1) + 1e-12
    S_zz.diagonal().add_(lam)
    C = solve_spd(S_zz, S_ze).T
    return C, em - C @ zm


@torch.no_grad()
def consumer_input_sizes(model: nn.Module, example_input, names) -> dict[str, tuple[int, int]]:
    """The spatial size of the input of every zero-padded Conv2d among ``names``, from one
    forward pass on ``example_input`` (in eval mode).

    Args:
        model: the network.
        example_input: an input (or a tuple of inputs).
        names: consumer module names.
    """
    modules = dict(model.named_modules())
    sizes: dict[str, tuple[int, int]] = {}

    def make_hook(name):
        def hook(mod, inputs):
            sizes.setdefault(name, tuple(inputs[0].shape[2:]))

        return hook

    wanted = [n for n in names if zero_padding(modules[n]) is not None]
    hooks = [modules[n].register_forward_pre_hook(make_hook(n)) for n in wanted]
    try:
        with eval_mode(model):
            model(*as_args(example_input))
    finally:
        for h in hooks:
            h.remove()
    return sizes
