"""The result of stage 1: coupling groups, consumer layouts, and the widths a model has now.

See ``docs/design.md`` (section "Stage 1: trace") for what a group and a layout are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["ChannelwiseLayout", "ConsumerLayout", "CouplingGraph", "CouplingWarning", "Group"]


class CouplingWarning(UserWarning):
    """Warned when :func:`trace` freezes a group because of an op it cannot follow."""


@dataclass
class Group:
    """One channel space whose width changes as a unit.

    Attributes:
        id: index in ``CouplingGraph.groups``.
        name: stable, human-readable name (the first producer's module name, or "input").
        producers: names of Conv2d/Linear modules whose output channels (weight dim 0, bias)
            are this group's channels. Several when residual adds merge spaces.
        norms: names of BatchNorm1d/2d modules whose per-channel parameters and buffers
            follow this group.
        norm_after: for each norm, the producer it directly follows (its input is that
            producer's output), or None when it sits after an add / elsewhere.
        consumers: names of Conv2d/Linear modules that read this group in their input.
        channelwise: names of the entries of ``CouplingGraph.channelwise`` that hold this
            group's channels (depthwise convolutions, squeeze-and-excitation gates, norms over
            concatenations, per-channel parameters).
        frozen: None when the group may be resized, else the reason it may not (model input,
            model output, an op the tracer cannot follow, ...).
        width: the group's width (channels) when the model was traced.
    """

    id: int
    name: str
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    norm_after: dict[str, str | None] = field(default_factory=dict)
    consumers: list[str] = field(default_factory=list)
    frozen: str | None = None
    width: int | None = None
    channelwise: list[str] = field(default_factory=list)


@dataclass
class ConsumerLayout:
    """How a consumer's input channels are laid out.

    A consumer's weight is viewed as ``[out, C, B_w]``: for Conv2d ``C = in_channels`` and
    ``B_w = kh*kw``; for a Linear after Flatten ``C`` channels of ``h*w`` columns each; for a
    plain Linear one column each. The C channels are the concatenation of ``segments`` (group
    ids, in order; more than one after torch.cat), each as wide as that group currently is.

    ``block`` counts *activation entries* per channel at the consumer's input: ``h*w`` for a
    Linear after Flatten, 1 for a Conv2d (its ``kh*kw`` is a property of the weight, which
    surgery reads from the weight itself: ``svdgrow.surgery.weight_block``).
    """

    module: str
    segments: list[int]
    block: int


@dataclass
class ChannelwiseLayout:
    """A module or tensor whose per-channel entries follow groups without mixing channels.

    Its entries along one dim are the channels of ``segments`` concatenated (one entry per
    channel), so surgery keeps, drops and adds them with the groups, and folds nothing into
    them (what a dropped channel carried is folded into the consumers further on).

    Attributes:
        name: a module name (kinds ``"layer"`` and ``"norm"``) or the qualified name of a
            parameter or buffer (kind ``"param"``).
        segments: group ids, in order.
        kind: ``"layer"``: a Conv/Linear whose output rows (weight dim 0, bias) follow the
            groups while its input is something else: a depthwise convolution (groups ==
            in_channels == out_channels, which reads row ``i`` from channel ``i``), or the
            last layer of a squeeze-and-excitation gate (its output multiplies the groups
            channel for channel). ``"norm"``: a per-channel norm that is not a single group's
            BatchNorm (``Group.norms``): a BatchNorm over a concatenation, a GroupNorm with one
            channel per group, an InstanceNorm with parameters. ``"param"``: a tensor used
            directly as a per-channel scale or shift (``x * self.gamma``).
        dim: for a ``"param"``, the tensor dim that holds the channels (0 or 1).
        grow_value: for a ``"param"``, what a new channel's entry is: ``"mean"`` (the mean
            of the others: a scale) or ``"zero"`` (a shift).
    """

    name: str
    segments: list[int]
    kind: str
    dim: int = 0
    grow_value: str = "mean"


@dataclass
class CouplingGraph:
    """The coupling groups of a model, as found by :func:`trace`.

    Attributes:
        groups: every group, ``groups[i].id == i``, numbered in graph order (the model input
            first).
        consumers: for each consumer module name (Conv2d with ``groups == 1``, Linear on a
            2-D input), the layout of its input channels; in graph order.
        warnings: one line per reason a group was frozen by an op the tracer could not
            follow (the same lines are issued as :class:`CouplingWarning`).
        concat_norms: each BatchNorm that normalises a concatenation of groups (those groups
            are frozen), with its segments in order: (group id, the producer whose output
            that segment is directly, or None). Surgery puts a constant folded into such a
            producer into the norm's running mean.
        channelwise: every module or tensor whose per-channel entries follow groups without
            being a producer, consumer or single-group BatchNorm, by name (see
            :class:`ChannelwiseLayout`); a BatchNorm over a concatenation is here and in
            ``concat_norms``.
    """

    groups: list[Group]
    consumers: dict[str, ConsumerLayout]
    warnings: list[str] = field(default_factory=list)
    concat_norms: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)
    channelwise: dict[str, ChannelwiseLayout] = field(default_factory=dict)

    def resizable(self) -> list[Group]:
        """Groups that may be resized (``frozen is None``)."""
        return [g for g in self.groups if g.frozen is None]

    def group_of(self, module_name: str) -> Group:
        """The group a producer (or norm) module writes.

        Args:
            module_name: a Conv2d/Linear producer name or a BatchNorm name, as in
                ``model.named_modules()``.

        Raises:
            KeyError: the module is neither a producer nor a norm of any group.
        """
        for g in self.groups:
            if module_name in g.producers or module_name in g.norms:
                return g
        raise KeyError(
            f"{module_name!r} is not a producer or norm of any group; producers are "
            f"{[p for g in self.groups for p in g.producers]}"
        )

    def consumers_of(self, group_id: int) -> list[ConsumerLayout]:
        """Layouts of every consumer that reads group ``group_id`` (in graph order)."""
        return [c for c in self.consumers.values() if group_id in c.segments]

    def widths(self, model: nn.Module) -> list[int]:
        """Current width of every group, read from the modules of ``model``.

        The width comes from each producer (``out_channels``/``out_features``) and norm
        (``num_features``); groups with neither (model input, opaque values) keep their
        traced width, or in a hand-built graph without one, the input width of a consumer
        that reads only that group. Every consumer's input size, and every per-channel entry's
        size (``channelwise``), is checked against its layout.

        Args:
            model: the traced model, possibly after surgery.

        Returns:
            ``widths[i]`` is the width of ``groups[i]``.

        Raises:
            ValueError: the modules of one group disagree, a consumer's input size is not
                ``block * sum(widths of its segments)``, or a per-channel entry's size is not
                the sum of its segments' widths.
        """
        mods = dict(model.named_modules())
        out: list[int] = []
        for g in self.groups:
            seen: dict[str, int] = {}
            for name in g.producers:
                m = _lookup(mods, name)
                seen[name] = _out_width(m)
            for name in g.norms:
                seen[name] = int(_lookup(mods, name).num_features)
            values = set(seen.values())
            if len(values) > 1:
                raise ValueError(
                    f"group {g.id} ({g.name!r}) has inconsistent widths {seen}; every "
                    "producer and norm of a group must be resized together"
                )
            if values:
                out.append(values.pop())
            elif g.width is not None:
                out.append(g.width)
            else:  # a hand-built graph: read it from a consumer of this group alone
                only = [c for c in self.consumers.values() if c.segments == [g.id]]
                if not only:
                    raise ValueError(f"group {g.id} ({g.name!r}) has no known width")
                out.append(_in_width(_lookup(mods, only[0].module)) // max(only[0].block, 1))
        self._check_layouts(model, mods, out)
        return out

    def _check_layouts(self, model: nn.Module, mods: dict[str, nn.Module], out: list[int]):
        """Raise a ValueError when a consumer's input or a per-channel entry's size is not
        what its segments at widths ``out`` say."""
        for c in self.consumers.values():
            m = _lookup(mods, c.module)
            have = _in_width(m)
            want = c.block * sum(out[s] for s in c.segments)
            if have != want:
                raise ValueError(
                    f"consumer {c.module!r} reads {have} input channels/features but its "
                    f"layout (segments {c.segments}, widths "
                    f"{[out[s] for s in c.segments]}, block {c.block}) says {want}"
                )
        for c in self.channelwise.values():
            have = _channelwise_width(model, mods, c)
            want = sum(out[s] for s in c.segments)
            if have != want:
                raise ValueError(
                    f"{c.kind} {c.name!r} has {have} per-channel entries but its groups "
                    f"{c.segments} are {[out[s] for s in c.segments]} wide"
                )

    def describe(self, model: nn.Module | None = None) -> str:
        """A text table of the groups (one line each), then the consumers' layouts.

        Args:
            model: when given, widths are read from it (see :meth:`widths`); otherwise the
                traced widths are shown.
        """
        widths = self.widths(model) if model is not None else [g.width for g in self.groups]
        rows = [("id", "name", "width", "frozen", "producers", "norms", "consumers")]
        for g, w in zip(self.groups, widths, strict=True):
            rows.append(
                (
                    str(g.id),
                    g.name,
                    "?" if w is None else str(w),
                    g.frozen or "-",
                    ", ".join(g.producers) or "-",
                    ", ".join(g.norms) or "-",
                    ", ".join(g.consumers) or "-",
                )
            )
        cols = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        cols[3] = min(cols[3], 40)
        lines = []
        for r in rows:
            cells = [c if i != 3 or len(c) <= 40 else c[:37] + "..." for i, c in enumerate(r)]
            lines.append("  ".join(c.ljust(cols[i]) for i, c in enumerate(cells)).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        frozen = [g for g in self.groups if g.frozen and len(g.frozen) > 40]
        if frozen:
            lines.append("")
            lines.append("frozen because")
            for g in frozen:
                lines.append(f"  {g.id} {g.name}: {g.frozen}")
        if self.consumers:
            lines.append("")
            lines.append("consumer layouts (module: segments x block)")
            for c in self.consumers.values():
                lines.append(f"  {c.module}: {c.segments} x {c.block}")
        if self.channelwise:
            lines.append("")
            lines.append("per-channel modules and tensors (name: kind over segments)")
            for c in self.channelwise.values():
                lines.append(f"  {c.name}: {c.kind} over {c.segments}")
        return "\n".join(lines)


# module lookups for CouplingGraph.widths


def _lookup(mods: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in mods:
        raise KeyError(f"module {name!r} of the coupling graph is not in the model")
    return mods[name]


def _out_width(m: nn.Module) -> int:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return int(m.out_channels)
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    raise TypeError(f"expected a Conv1d, Conv2d or Linear producer, got {type(m).__name__}")


def _in_width(m: nn.Module) -> int:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return int(m.in_channels)
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    raise TypeError(f"expected a Conv1d, Conv2d or Linear consumer, got {type(m).__name__}")


def _channelwise_width(model: nn.Module, mods: dict[str, nn.Module], c: ChannelwiseLayout) -> int:
    """How many per-channel entries a :class:`ChannelwiseLayout` entry has now."""
    if c.kind == "param":
        try:
            t = model.get_parameter(c.name)
        except AttributeError:
            t = model.get_buffer(c.name)
        return int(t.shape[c.dim])
    m = _lookup(mods, c.name)
    if c.kind == "layer":
        return _out_width(m)
    for attr in ("num_features", "num_channels"):
        if hasattr(m, attr):
            return int(getattr(m, attr))
    raise TypeError(f"norm {c.name!r} is a {type(m).__name__}, which has no channel count")
