"""Zero padding in the fold: which kernel taps of a padded Conv2d read data rather than padding
(:func:`tap_fractions`), and the moments of its im2col patches, padding included
(:func:`patch_moments`). See docs/design.md, "Stage 4: surgery" (zero padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import as_args, eval_mode

__all__ = [
    "consumer_input_sizes",
    "fits_on_patches",
    "patch_moments",
    "tap_fractions",
    "zero_padding",
]

_CHUNK = 2048  # patches gathered at once (bounds the memory of a wide layer's moments)


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


def patch_moments(
    x: Tensor,
    module: nn.Conv2d,
    channels: slice,
    max_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and covariance of a Conv2d's im2col patches on some of its input channels, at
    random output positions, zero padding included (border taps read 0).

    Args:
        x (Tensor[N, C, H, W]): the convolution's input.
        module: the convolution.
        channels: the input channels wanted (a group's ``n`` channels).
        max_samples: at most this many (sample, output position) pairs.
        generator: CPU random generator of the sub-sampling.

    Returns:
        mean (Tensor[n*B]) and covariance (Tensor[n*B, n*B]), float64, features
        channel-major (``channel * B + tap``, ``B = kh*kw``) like the weight's columns.
    """
    xp = F.pad(x[:, channels], zero_padding(module) or (0, 0, 0, 0))
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    total = x.shape[0] * oh * ow
    if total > max_samples:
        pick = torch.randperm(total, generator=generator)[:max_samples].to(x.device)
    else:
        pick = torch.arange(total, device=x.device)
    taps_y = (torch.arange(kh, device=x.device) * dh)[:, None].expand(kh, kw).flatten()
    taps_x = (torch.arange(kw, device=x.device) * dw)[None, :].expand(kh, kw).flatten()

    def gather(part: Tensor) -> Tensor:  # Tensor[len(part), n * B]
        sample, pos = part // (oh * ow), part % (oh * ow)
        iy = (pos // ow * sh)[:, None] + taps_y[None, :]
        ix = (pos % ow * sw)[:, None] + taps_x[None, :]
        p = xp[sample[:, None], :, iy, ix]  # [S, B, n]
        return p.transpose(1, 2).reshape(len(part), -1)

    parts = pick.split(_CHUNK)
    mean = sum(gather(part).double().sum(0) for part in parts) / len(pick)
    cov = 0
    for part in parts:
        p = gather(part) - mean.to(x.dtype)
        cov = cov + (p.T @ p).double()
    return mean, cov / max(len(pick) - 1, 1)


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
