"""The network's cost (parameters or forward FLOPs) as a function of its group widths: what a
budget in stage 3 measures. See docs/design.md, "Stage 3: policy".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._utils import as_args, eval_mode
from .trace import CouplingGraph

__all__ = ["CostModel", "LayerCost"]


@dataclass(frozen=True)
class LayerCost:
    """The width-dependent cost of one Conv2d/Linear.

    Its weight costs ``weight * (rows / rows0) * (cols / cols0)``, its bias
    ``bias * (rows / rows0)``.

    Attributes:
        row_group: name of the group its rows are (None: it produces no group, rows fixed).
        col_groups: names of the groups its input channels are (None: columns fixed).
        weight: the weight's cost now (parameters, or FLOPs of the whole layer).
        rows0: its rows now.
        cols0: its input channels now (None when ``col_groups`` is None).
        bias: the bias's cost now (0 for FLOPs).
        row_groups: the groups its rows follow when it is a per-channel layer of them (a
            depthwise convolution, a gate: ``CouplingGraph.channelwise``); None otherwise.
    """

    row_group: str | None
    col_groups: list[str] | None
    weight: float
    rows0: int
    cols0: int | None
    bias: float
    row_groups: list[str] | None = None


class CostModel:
    """Cost of the network (parameters or forward FLOPs) as a function of group widths.

    Every Conv/Linear weight scales as ``rows * channels`` (its FLOPs too), a bias with its
    rows, a norm's affine parameters and a per-channel parameter with its width; everything
    else is constant. Exact
    for parameters; for FLOPs exact for the convolutions and linears
    (``torch.utils.flop_counter.FlopCounterMode`` on the example input, per module).

    Args:
        model: the network.
        graph: its coupling graph.
        widths: group name -> current width.
        kind: ``"params"`` or ``"flops"``.
        example_input: the input FLOPs are counted on (a tensor or a tuple of inputs).
    """

    def __init__(
        self,
        model: nn.Module,
        graph: CouplingGraph,
        widths: dict[str, int],
        kind: str = "params",
        example_input=None,
    ):
        self.kind = kind
        self.base = dict(widths)
        flops = _module_flops(model, example_input) if kind == "flops" else None
        total = flops.get("Global", 0.0) if flops is not None else _param_count(model)
        self._layers = _layer_costs(model, graph, widths, flops)
        variable = sum(t.weight + t.bias for t in self._layers)
        self._norms: list[tuple[str, int]] = []  # (group name, affine parameters per channel)
        if kind == "params":
            for name, k in _per_channel_params(model, graph, widths):
                self._norms.append((name, k))
                variable += k * widths[name]
        self.const = total - variable

    def __call__(self, widths: dict[str, int] | None) -> float:
        """The cost at ``widths`` (group name -> width; groups left out keep their width now,
        None: the cost now)."""
        w = self.base if widths is None else {**self.base, **widths}
        total = self.const
        for t in self._layers:
            row_f = w[t.row_group] / t.rows0 if t.row_group is not None else 1.0
            if t.row_groups:
                row_f = sum(w[s] for s in t.row_groups) / t.rows0
            col_f = sum(w[s] for s in t.col_groups) / t.cols0 if t.col_groups else 1.0
            total += t.weight * row_f * col_f + t.bias * row_f
        for g, k in self._norms:
            total += k * w[g]
        return total


def _param_count(model: nn.Module) -> float:
    return float(sum(p.numel() for p in model.parameters()))


def _module_flops(model: nn.Module, example_input) -> dict[str, float]:
    """Forward FLOPs per module name (``"Global"``: the whole model), on ``example_input``."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*as_args(example_input))
    root = type(model).__name__
    out = {}
    for key, counts in fc.get_flop_counts().items():
        if key == "Global":
            out[key] = float(sum(counts.values()))
        elif key == root or key.startswith(root + "."):
            out[key[len(root) + 1 :]] = float(sum(counts.values()))
    return out


def _per_channel_params(model, graph: CouplingGraph, widths) -> list[tuple[str, float]]:
    """``(group name, parameters per channel)`` of every norm and per-channel parameter: a
    group's BatchNorms, and each segment of a ``CouplingGraph.channelwise`` norm or param."""
    mods = dict(model.named_modules())
    names = {g.id: g.name for g in graph.groups}

    def affine(m):
        return sum(getattr(m, a, None) is not None for a in ("weight", "bias"))

    out = [(g.name, affine(mods[nm])) for g in graph.groups if g.name in widths for nm in g.norms]
    for c in graph.channelwise.values():
        segs = [names[s] for s in c.segments]
        if c.kind == "norm":
            k = affine(mods[c.name])
        elif c.kind == "param" and c.name in dict(model.named_parameters()):
            k = model.get_parameter(c.name).numel() / sum(widths[s] for s in segs)
        else:
            continue
        out += [(s, k) for s in segs]
    return [(n, k) for n, k in out if k]


def _layer_costs(model, graph: CouplingGraph, widths, flops) -> list[LayerCost]:
    """One :class:`LayerCost` per producer, consumer or per-channel layer of the graph, in
    name order."""
    mods = dict(model.named_modules())
    producer_group = {p: g.name for g in graph.groups for p in g.producers}
    names = {g.id: g.name for g in graph.groups}
    row_segments = {
        n: [names[s] for s in c.segments] for n, c in graph.channelwise.items() if c.kind == "layer"
    }
    out = []
    for name in sorted(set(producer_group) | set(graph.consumers) | set(row_segments)):
        m = mods[name]
        layout = graph.consumers.get(name)
        cols = [names[s] for s in layout.segments] if layout is not None else None
        cols0 = sum(widths[s] for s in cols) if cols else None
        if not cols0:
            cols, cols0 = None, None
        if flops is not None:
            weight, bias = float(flops.get(name, 0)), 0.0
        else:
            weight = float(m.weight.numel())
            bias = float(m.bias.numel()) if getattr(m, "bias", None) is not None else 0.0
        rows0 = m.weight.shape[0]
        out.append(
            LayerCost(
                producer_group.get(name), cols, weight, rows0, cols0, bias, row_segments.get(name)
            )
        )
    return out
