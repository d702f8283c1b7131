"""What every part of stage 4 reads: the model's modules, its coupling graph and the current
width of every group (:class:`ResizeContext`), the per-layer facts of the layer types surgery
resizes (:data:`LAYERS`), and whether a group can be resized at all (:func:`check_resizable`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..spectrum import group_cap
from ..trace import ConsumerLayout, CouplingGraph, Group

__all__ = [
    "LAYERS",
    "NORMS",
    "LayerFacts",
    "ResizeContext",
    "check_resizable",
    "check_targets",
    "layer_facts",
    "weight_block",
]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LayerFacts:
    """How one resizable layer type names its widths.

    Attributes:
        out_attr: the attribute that holds the output width (the weight's rows).
        in_attr: the attribute that holds the input width.
        in_counts_columns: True when ``in_attr`` counts weight columns (channels times the
            columns per channel: a Linear after Flatten), False when it counts channels (a
            Conv2d, whose ``kh*kw`` columns per channel are not part of ``in_channels``).
    """

    out_attr: str
    in_attr: str
    in_counts_columns: bool


#: The layer types surgery can resize, and how each names its widths.
LAYERS: dict[type[nn.Module], LayerFacts] = {
    nn.Conv1d: LayerFacts("out_channels", "in_channels", in_counts_columns=False),
    nn.Conv2d: LayerFacts("out_channels", "in_channels", in_counts_columns=False),
    nn.Linear: LayerFacts("out_features", "in_features", in_counts_columns=True),
}


def layer_facts(module: nn.Module) -> LayerFacts | None:
    """The :class:`LayerFacts` of ``module`` (subclasses included), or None when surgery
    cannot resize that type."""
    for cls, facts in LAYERS.items():
        if isinstance(module, cls):
            return facts
    return None


@dataclass(frozen=True)
class ResizeContext:
    """The model as stage 4 sees it at one moment.

    Attributes:
        modules: ``dict(model.named_modules())``; ``modules[""]`` is the model itself.
        graph: the model's coupling graph.
        widths: the current width of every group, by group id.
    """

    modules: dict[str, nn.Module]
    graph: CouplingGraph
    widths: dict[int, int]

    @classmethod
    def of(cls, model: nn.Module, graph: CouplingGraph) -> ResizeContext:
        """The context of ``model`` now (widths read by :meth:`CouplingGraph.widths`).

        Args:
            model: the traced model.
            graph: its coupling graph.
        """
        return cls(dict(model.named_modules()), graph, dict(enumerate(graph.widths(model))))

    def weight_block(self, consumer: str) -> int:
        """Columns per input channel of a consumer's weight (see :func:`weight_block`).

        Args:
            consumer: the consumer's module name.
        """
        return weight_block(self.modules[consumer], self.graph.consumers[consumer], self.widths)


def weight_block(module: nn.Module, layout: ConsumerLayout, widths: dict[int, int]) -> int:
    """Columns per input channel of a consumer's weight.

    ``kh*kw`` for a Conv2d, ``h*w`` for a Linear after Flatten, 1 for a plain Linear. It is read
    from the weight, so it does not matter whether the layout's ``block`` counts weight columns
    or activation entries.

    Args:
        module: the consumer.
        layout: its input layout.
        widths: the current width of every group id.

    Raises:
        ValueError: the weight's columns are not a multiple of the channels the layout reads.
    """
    channels = sum(widths[s] for s in layout.segments)
    cols = int(module.weight[0].numel())
    if channels <= 0 or cols % channels:
        raise ValueError(
            f"consumer {layout.module!r}: its weight has {cols} columns per output, not a "
            f"multiple of the {channels} channels its layout says it reads (segments "
            f"{layout.segments}); retrace the model"
        )
    return cols // channels


def check_resizable(
    modules: dict[str, nn.Module], graph: CouplingGraph, group: Group
) -> str | None:
    """Why ``group`` cannot be resized, or None when it can.

    A group is resizable when it has a producer, every producer and consumer is a layer of
    :data:`LAYERS` (a convolution with ``groups == 1``), every consumer has a layout in the
    graph, every norm is a BatchNorm, and every per-channel entry of the graph that holds it
    (``Group.channelwise``) is what its kind says (see :func:`_channelwise_problem`). The
    graph's own ``frozen`` reasons are not looked at here.

    Args:
        modules: ``dict(model.named_modules())``.
        graph: the coupling graph.
        group: the group.
    """
    if not group.producers:
        return "it has no producer (model input)"
    for name in group.producers + group.consumers:
        m = modules.get(name)
        if m is None:
            return f"module {name!r} is not in the model"
        if layer_facts(m) is None:
            return (
                f"module {name!r} is a {type(m).__name__} (only Conv1d, Conv2d and Linear are "
                "supported)"
            )
        if getattr(m, "groups", 1) != 1:
            return f"module {name!r} is a grouped convolution (groups={m.groups})"
    for name in group.consumers:
        if name not in graph.consumers:
            return f"consumer {name!r} has no layout in the coupling graph"
    for name in group.norms:
        if not isinstance(modules.get(name), NORMS):
            return f"norm {name!r} is not a BatchNorm"
    for name in group.channelwise:
        why = _channelwise_problem(modules, graph, name)
        if why is not None:
            return why
    return None


def _channelwise_problem(modules: dict[str, nn.Module], graph: CouplingGraph, name: str):
    """Why the per-channel entry ``name`` of ``graph.channelwise`` cannot follow its groups (a
    ``"layer"`` must be a Conv/Linear with groups 1 or depthwise with multiplier 1, a
    ``"norm"`` a BatchNorm, InstanceNorm or GroupNorm with one channel per group, a
    ``"param"`` a parameter or buffer of the model), or None."""
    c = graph.channelwise.get(name)
    if c is None:
        return f"per-channel entry {name!r} is not in the coupling graph"
    if c.kind == "param":
        owner, _, key = name.rpartition(".")
        m = modules.get(owner)
        if m is None or (key not in m._parameters and key not in m._buffers):
            return f"per-channel tensor {name!r} is not in the model"
        return None
    m = modules.get(name)
    if m is None:
        return f"module {name!r} is not in the model"
    if c.kind == "layer":
        groups = getattr(m, "groups", 1)
        depthwise = groups == getattr(m, "in_channels", 0) == getattr(m, "out_channels", -1)
        if layer_facts(m) is None or not (groups == 1 or depthwise):
            return f"per-channel layer {name!r} is a {type(m).__name__} that cannot follow them"
        return None
    per_channel = isinstance(m, NORMS + (nn.InstanceNorm1d, nn.InstanceNorm2d)) or (
        isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels
    )
    return None if per_channel else f"norm {name!r} ({type(m).__name__}) is not per channel"


def check_targets(
    ctx: ResizeContext, new_widths: dict[str, int], frozen: dict[int, str], past_cap: bool = False
) -> dict[int, int]:
    """Validate requested widths.

    Args:
        ctx: the model now.
        new_widths: group name -> requested width.
        frozen: group id -> why it cannot be resized.
        past_cap: allow grows past the weight cap (a resizer reading feature spectra: the
            channels past it get rows that are new only after the norm and the activation;
            see :func:`~svdgrow.surgery.plan.build_plan`).

    Returns:
        group id -> new width, for the groups whose width changes.

    Raises:
        KeyError: an unknown group.
        ValueError: a width that is not an int, a frozen group, a width below 1, or a grow
            past the group's cap (:func:`svdgrow.spectrum.group_cap`).
    """
    by_name = {g.name: g for g in ctx.graph.groups}
    targets: dict[int, int] = {}
    for name, w in new_widths.items():
        if name not in by_name:
            raise KeyError(f"unknown group {name!r}; groups: {sorted(by_name)}")
        g = by_name[name]
        if isinstance(w, bool) or int(w) != w:
            raise ValueError(f"group {name!r}: width must be an int, got {w!r}")
        w = int(w)
        if w == ctx.widths[g.id]:
            continue
        if g.id in frozen:
            raise ValueError(f"group {name!r} is frozen and cannot be resized: {frozen[g.id]}")
        if w < 1:
            raise ValueError(f"group {name!r}: width {w} < 1; widths never reach 0")
        cap = group_cap(ctx.modules, g)
        if w > ctx.widths[g.id] and w > cap and not past_cap:
            raise ValueError(
                f"group {name!r}: width {w} is past its cap {cap} (the largest input "
                f"dimension in*kh*kw among its producers {g.producers}); new directions "
                "cannot be orthogonal beyond it (a Resizer with spectrum='features' grows "
                "past it)"
            )
        targets[g.id] = w
    return targets
