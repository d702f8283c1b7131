"""Stage 2, per-group weight spectra: each group's matrix ``G = [s_1 W_1 | s_2 W_2 | ...]`` (its
producers' weights as ``out x in*kh*kw``, rows scaled by the BatchNorm right after each), its
singular values from the eigenvalues of its Gram matrix on the short side (CPU) or from ONE
``svdgrow.ops.batched_svd`` call for all groups (GPU). See docs/design.md, "Stage 2: spectrum".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from ._utils import all_finite
from .trace import Group

__all__ = [
    "group_cap",
    "GroupSpectrum",
    "bn_affine",
    "bn_output_stats",
    "effective_bias",
    "group_matrix",
    "analyse_groups",
    "feature_spectra",
    "producer_matrix",
    "input_dim",
    "singular_values",
    "norm_directly_after",
]


@dataclass
class GroupSpectrum:
    """The spectrum of one coupling group.

    Attributes:
        name: the group's name.
        group_id: its index in the coupling graph.
        width: its current number of channels ``n``.
        cap: the most channels it may have (:func:`group_cap`).
        singular_values (Tensor[min(n, D)]): descending, float64, on the CPU.
        energy (Tensor[min(n, D)]): ``singular_values ** 2``.
        energy_kept (Tensor[min(n, D)]): ``energy_kept[r-1]`` is the fraction of the total
            energy (``||G||_F**2``) kept by the top ``r`` directions.
        total_energy: ``||G||_F**2``.
    """

    name: str
    group_id: int
    width: int
    cap: int
    singular_values: Tensor
    energy: Tensor
    energy_kept: Tensor
    total_energy: float

    def rank_for(self, eps: float) -> int:
        """Smallest rank whose kept energy is at least ``1 - eps`` (at least 1)."""
        if self.total_energy <= 0 or self.energy_kept.numel() == 0:
            return 1
        ok = (self.energy_kept >= 1.0 - eps - 1e-12).nonzero()
        r = int(ok[0]) + 1 if ok.numel() else int(self.energy_kept.numel())
        return max(1, r)

    def summary(self) -> dict:
        """A JSON-able summary (name, width, cap, singular values, energy kept)."""
        return {
            "name": self.name,
            "width": self.width,
            "cap": self.cap,
            "singular_values": [float(s) for s in self.singular_values],
            "energy_kept": [float(e) for e in self.energy_kept],
        }


def _bn_weight_bias(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """A BatchNorm's affine weight and bias as float64 (ones / zeros when it has none)."""
    C = bn.num_features
    dev = _module_device(bn)
    w = (
        bn.weight.detach().double()
        if bn.weight is not None
        else torch.ones(C, dtype=torch.float64, device=dev)
    )
    b = (
        bn.bias.detach().double()
        if bn.bias is not None
        else torch.zeros(C, dtype=torch.float64, device=dev)
    )
    return w, b


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode per-channel affine map of a BatchNorm: ``y = scale * x + shift``.

    Returns:
        scale, shift (Tensor[C] each, float64). Without running statistics the batch
        statistics are unknown: mean 0, variance 1 are assumed.
    """
    w, b = _bn_weight_bias(bn)
    if bn.running_var is not None and bn.running_mean is not None:
        scale = w / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        shift = b - scale * bn.running_mean.detach().double()
    else:
        scale, shift = w / (1.0 + bn.eps) ** 0.5, b
    return scale, shift


def bn_output_stats(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of a BatchNorm's output over the data its running statistics
    were taken on: ``bias`` and ``|weight| * sqrt(var / (var + eps))`` (float64)."""
    w, b = _bn_weight_bias(bn)
    if bn.running_var is None:
        return b, w.abs()
    v = bn.running_var.detach().double().clamp_min(0)
    return b, w.abs() * torch.sqrt(v / (v + bn.eps))


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def input_dim(module: nn.Module) -> int:
    """``in * kh * kw`` of a Conv2d (``in_features`` of a Linear): the most rows it can span."""
    w = module.weight
    return int(w[0].numel())


def group_cap(modules: dict[str, nn.Module], g: Group) -> int:
    """The most channels group ``g`` can have with every grown direction new: the largest
    input dimension ``in * kh * kw`` among its producers.

    A grown channel's pre-activation is the sum of its producers' new rows applied to their
    inputs; one producer with room for a row orthogonal to its own rows makes the channel's
    row of the group matrix independent of the others (the producers without room add a zero
    row). So a residual group fed by a 1x1 projection of a narrow stream is not capped by that
    stream's width. See docs/design.md, "Growth".

    Args:
        modules: the model's modules by name.
        g: the group.
    """
    return max(input_dim(modules[p]) for p in g.producers)


def producer_matrix(module: nn.Module) -> Tensor:
    """The producer's weight reshaped to ``out x in*kh*kw`` (a view, not detached)."""
    return module.weight.reshape(module.weight.shape[0], -1)


def norm_directly_after(group: Group) -> dict[str, str]:
    """Map producer name -> name of the norm that directly follows it (when one does)."""
    out: dict[str, str] = {}
    for norm, prod in group.norm_after.items():
        if prod is not None:
            out[prod] = norm
    return out


def group_matrix(
    modules: dict[str, nn.Module], group: Group, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, list[tuple[str, int, int]], dict[str, Tensor], Tensor]:
    """Build the group matrix of ``group``.

    Args:
        modules: ``dict(model.named_modules())``.
        group: a coupling group with at least one producer.
        dtype: of ``G`` (the row scales are applied in float64 first).

    Returns:
        G (Tensor[n, D], ``dtype``): the group matrix.
        blocks: ``(producer, start, end)`` column ranges of each producer in ``G``.
        scales: producer -> (Tensor[n]) row scale applied (its direct BatchNorm), when one is.
        b_eff (Tensor[n], float64): the effective bias of the group's pre-activation.
    """
    after = norm_directly_after(group)
    parts, blocks, scales = [], [], {}
    start = 0
    for p in group.producers:
        W = producer_matrix(modules[p]).detach()
        if p in after:
            s = bn_affine(modules[after[p]])[0]
            W = W.to(dtype) * s.to(dtype)[:, None]
            scales[p] = s
        else:
            W = W.to(dtype)
        parts.append(W)
        blocks.append((p, start, start + W.shape[1]))
        start += W.shape[1]
    G = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return G, blocks, scales, effective_bias(modules, group)


def effective_bias(modules: dict[str, nn.Module], group: Group) -> Tensor:
    """The effective bias of a group's pre-activation, ``sum_p s_p * (b_p - mean_p) + beta_p``
    over its producers (``s_p * b_p`` alone for a producer without a direct BatchNorm), as
    :func:`group_matrix` returns it (float64).

    Args:
        modules: ``dict(model.named_modules())``.
        group: a coupling group with at least one producer.
    """
    after = norm_directly_after(group)
    b_eff = None
    for p in group.producers:
        m = modules[p]
        if getattr(m, "bias", None) is not None:
            b = m.bias.detach().double()
        else:
            b = torch.zeros(m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
        if p in after:
            s, t = bn_affine(modules[after[p]])
            b = s * b + t
        b_eff = b if b_eff is None else b_eff + b
    return b_eff


def singular_values(mats: list[Tensor]) -> list[Tensor]:
    """The singular values of every matrix, descending (float64).

    On the CPU from the eigenvalues of the Gram matrix on the short side (see
    :func:`analyse_groups`), on a GPU from one ``svdgrow.ops.batched_svd`` call for all.

    Args:
        mats (list[Tensor[n_i, D_i]]): float32 or float64 matrices on one device.
    """
    if mats[0].device.type != "cpu":
        return [s.double() for s in ops.batched_svd(mats)[0]]
    return [_gram_energies(G, [("", 0, G.shape[1])])[0].sqrt() for G in mats]


def _gram_energies(G: Tensor, blocks) -> tuple[Tensor, dict[str, Tensor] | None]:
    """``sigma**2`` of ``G`` (descending, float64) from the Gram matrix on its short side (in
    ``G``'s dtype); when that is ``G G^T``, it is summed from the blocks' ``G_p G_p^T``, which
    are returned too (float64)."""
    if G.shape[0] > G.shape[1]:
        return _eigenvalues((G.T @ G).double()), None
    parts = {p: (G[:, start:end] @ G[:, start:end].T).double() for p, start, end in blocks}
    return _eigenvalues(sum(parts.values())), parts


def _eigenvalues(gram: Tensor) -> Tensor:
    """Descending eigenvalues of a PSD matrix, rounding below zero clamped."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _checked_group_matrix(modules: dict[str, nn.Module], g: Group, dtype: torch.dtype):
    """:func:`group_matrix` of ``g`` (``G`` and its blocks), refused when not finite."""
    G, blocks, _, _ = group_matrix(modules, g, dtype)
    if not bool(all_finite([G])):
        raise FloatingPointError(
            f"group {g.name!r}: its weights (or its BatchNorm statistics) hold NaN/inf; "
            "refusing to resize. Fix the training run (lower the learning rate, clip "
            "gradients) or reload a checkpoint."
        )
    return G, blocks


def analyse_groups(
    modules: dict[str, nn.Module],
    groups: list[Group],
    widths: dict[int, int],
    grams: dict[int, dict[str, Tensor]] | None = None,
) -> list[GroupSpectrum]:
    """Spectra of ``groups``.

    Only the energies ``sigma**2`` are needed. On the CPU they are the eigenvalues of the
    group matrix's Gram matrix on its short side (``G G^T``, or ``G^T G`` when ``G`` has more
    rows than columns), formed in the weights' precision (float32 for float32 weights) and
    solved in float64: two to four times faster than an SVD, each energy exact to about
    ``1e-6`` of the largest (the rounding of the float32 products), which is all the policy's
    energy fractions read; a singular value far below that is rounding noise. On a GPU all
    group matrices (float64) go to ONE ``svdgrow.ops.batched_svd`` call.

    Args:
        modules: ``dict(model.named_modules())``.
        groups: the groups to analyse (each with producers).
        widths: current width of every group id.
        grams: when given, filled on the CPU with group id -> producer -> the Gram matrix
            ``G_p G_p^T`` (float64) of that producer's block of a group matrix that has no
            more rows than columns (formed for the spectrum; weights mode reuses them while the
            weights stay as they are).

    Raises:
        FloatingPointError: when a group matrix holds a NaN or an infinity.
    """
    if not groups:
        return []
    weight = modules[groups[0].producers[0]].weight
    if weight.device.type != "cpu":
        mats = [_checked_group_matrix(modules, g, torch.float64)[0] for g in groups]
        energies = [s * s for s in singular_values(mats)]
        totals = [float(torch.linalg.vector_norm(G)) ** 2 for G in mats]
    else:
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        energies, totals = [], []
        for g in groups:
            energy, parts = _gram_energies(*_checked_group_matrix(modules, g, dtype))
            energies.append(energy)
            totals.append(float(energy.sum()))
            if grams is not None and parts is not None:
                grams[g.id] = parts
    return [
        _spectrum(modules, g, widths[g.id], e, t)
        for g, e, t in zip(groups, energies, totals, strict=True)
    ]


def feature_spectra(
    modules: dict[str, nn.Module],
    groups: list[Group],
    widths: dict[int, int],
    mats: list[Tensor],
    caps: list[int] | None = None,
) -> list[GroupSpectrum]:
    """Spectra of ``groups`` read in feature space: the eigenvalues of one PSD matrix per group
    (``n x n``, what its consumers read on its ``n`` channels; see
    :func:`svdgrow.surgery.data_pivot_gram`) take the place of ``sigma**2``. Every channel has
    an energy (``n`` of them, whatever the producers' input dimension).

    Args:
        modules: ``dict(model.named_modules())``.
        groups: the groups.
        widths: current width of every group id.
        mats (list[Tensor[n_i, n_i]]): one symmetric PSD matrix per group, float64.
        caps: the most channels each group may grow to (default :func:`group_cap`, the weight
            rank's bound; a resizer reading feature spectra passes the number of feature
            samples its consumers were measured on, which bounds the rank of what they read).

    Raises:
        FloatingPointError: when a matrix holds a NaN or an infinity (the batch or the weights
            do).
    """
    out = []
    caps = caps if caps is not None else [group_cap(modules, g) for g in groups]
    for g, m, cap in zip(groups, mats, caps, strict=True):
        if not bool(all_finite([m])):
            raise FloatingPointError(
                f"group {g.name!r}: its features on this batch hold NaN/inf; refusing to "
                "resize. Fix the training run (lower the learning rate, clip gradients) or "
                "reload a checkpoint."
            )
        energy = _eigenvalues(m.double().cpu())
        out.append(_spectrum(modules, g, widths[g.id], energy, float(energy.sum()), cap))
    return out


def _spectrum(
    modules, g: Group, width: int, energy: Tensor, total: float, cap: int | None = None
) -> GroupSpectrum:
    """The :class:`GroupSpectrum` of ``g`` from its energies (float64, descending)."""
    cum = torch.cumsum(energy, 0) / total if total > 0 else torch.ones_like(energy)
    return GroupSpectrum(
        name=g.name,
        group_id=g.id,
        width=width,
        cap=group_cap(modules, g) if cap is None else int(cap),
        singular_values=energy.sqrt().cpu(),
        energy=energy.cpu(),
        energy_kept=cum.cpu(),
        total_energy=total,
    )
