"""Stage 2, per-group weight spectra: each group's matrix ``G = [s_1 W_1 | s_2 W_2 | ...]`` (its
producers' weights as ``out x in*kh*kw``, rows scaled by the BatchNorm right after each), all
decomposed in ONE ``svdgrow.ops.batched_svd`` call. See docs/design.md, "Stage 2: spectrum".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from ._utils import all_finite
from .trace import Group

__all__ = [
    "GroupSpectrum",
    "bn_affine",
    "bn_output_stats",
    "group_matrix",
    "analyse_groups",
    "producer_matrix",
    "input_dim",
    "norm_directly_after",
]


@dataclass
class GroupSpectrum:
    """The spectrum of one coupling group.

    Attributes:
        name: the group's name.
        group_id: its index in the coupling graph.
        width: its current number of channels ``n``.
        cap: the most channels it may have: min over producers of ``in * kh * kw``.
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
    modules: dict[str, nn.Module], group: Group
) -> tuple[Tensor, list[tuple[str, int, int]], dict[str, Tensor], Tensor]:
    """Build the group matrix of ``group``.

    Args:
        modules: ``dict(model.named_modules())``.
        group: a coupling group with at least one producer.

    Returns:
        G (Tensor[n, D], float64): the group matrix.
        blocks: ``(producer, start, end)`` column ranges of each producer in ``G``.
        scales: producer -> (Tensor[n]) row scale applied (its direct BatchNorm), when one is.
        b_eff (Tensor[n], float64): the effective bias of the group's pre-activation.
    """
    after = norm_directly_after(group)
    parts, blocks, scales = [], [], {}
    b_eff = None
    start = 0
    for p in group.producers:
        m = modules[p]
        W = producer_matrix(m).detach().double()
        n = W.shape[0]
        b = (
            m.bias.detach().double()
            if getattr(m, "bias", None) is not None
            else torch.zeros(n, dtype=torch.float64, device=W.device)
        )
        if p in after:
            s, t = bn_affine(modules[after[p]])
            W = W * s[:, None]
            b = s * b + t
            scales[p] = s
        parts.append(W)
        blocks.append((p, start, start + W.shape[1]))
        start += W.shape[1]
        b_eff = b if b_eff is None else b_eff + b
    G = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return G, blocks, scales, b_eff


def analyse_groups(
    modules: dict[str, nn.Module],
    groups: list[Group],
    widths: dict[int, int],
) -> list[GroupSpectrum]:
    """Spectra of ``groups`` (all group matrices in ONE batched SVD call).

    Args:
        modules: ``dict(model.named_modules())``.
        groups: the groups to analyse (each with producers).
        widths: current width of every group id.

    Raises:
        FloatingPointError: when a group matrix holds a NaN or an infinity.
    """
    mats, metas = [], []
    for g in groups:
        G = group_matrix(modules, g)[0]
        if not bool(all_finite([G])):
            raise FloatingPointError(
                f"group {g.name!r}: its weights (or its BatchNorm statistics) hold NaN/inf; "
                "refusing to resize. Fix the training run (lower the learning rate, clip "
                "gradients) or reload a checkpoint."
            )
        mats.append(G)
        metas.append((g, G))
    if not mats:
        return []
    S, _, _ = ops.batched_svd(mats)
    out = []
    for (g, G), s in zip(metas, S, strict=True):
        s64 = s.detach().double()
        total = float((G * G).sum())
        energy = s64 * s64
        cum = torch.cumsum(energy, 0) / total if total > 0 else torch.ones_like(energy)
        cap = min(input_dim(modules[p]) for p in g.producers)
        out.append(
            GroupSpectrum(
                name=g.name,
                group_id=g.id,
                width=widths[g.id],
                cap=cap,
                singular_values=s64.cpu(),
                energy=energy.cpu(),
                energy_kept=cum.cpu(),
                total_energy=total,
            )
        )
    return out
