"""The state of one walk over a model's fx graph, and the helpers every per-op rule shares.

:mod:`svdgrow.trace.dispatch` walks the graph and hands each node to its rule in
:mod:`svdgrow.trace.layers` or :mod:`svdgrow.trace.rules`; the rules read values and change
groups through a :class:`GroupBuilder`, whose :meth:`GroupBuilder.finish` returns the
:class:`CouplingGraph`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from .graph import ChannelwiseLayout, ConsumerLayout, CouplingGraph, Group
from .groups import GroupSet, Layout, Opaque
from .optable import format_target

__all__ = ["GroupBuilder"]


class GroupBuilder:
    """Builds the coupling groups of a shape-propagated fx graph.

    Args:
        gm: the traced model, after :class:`torch.fx.passes.shape_prop.ShapeProp` (every node
            that yields a tensor has ``meta["tensor_meta"]``).
        strict: raise instead of warning when an op freezes a group (see :class:`GroupSet`).
        failed: submodules torch.fx could not trace into, each with its error text; they are
            leaves of ``gm``.

    Attributes:
        groups: the raw groups (union-find, freeze reasons, warning lines).
        values: what each node yields: a :class:`Layout` when it carries channels, an
            :class:`Opaque` when it was derived from channels by an op that is not followed,
            None for constants and shapes.
        node_index: each node's position in the graph (orders group members).
        modules: the submodules of ``gm`` by qualified name.
        consumer_segments: the raw groups each consumer reads, by consumer name.
        consumer_block: the activation entries per channel each consumer reads.
        producer_group: the raw group of each producer's output (one per module).
        norm_group: the raw group each BatchNorm normalises.
        concat_norms: each BatchNorm on a concatenation: its (raw group, direct producer)
            segments.
        fresh_layouts: the frozen layouts given to tensors without one (see
            :meth:`layout_or_frozen`).
        channelwise: each module or tensor whose per-channel entries follow groups (see
            :class:`~svdgrow.trace.graph.ChannelwiseLayout`): its raw segments, kind, dim and
            grow value.
        param_uses: for each per-channel parameter, the get_attr nodes it was followed from.
    """

    def __init__(self, gm: torch.fx.GraphModule, strict: bool, failed: dict[str, str]) -> None:
        self.gm = gm
        self.failed = failed
        self.modules = dict(gm.named_modules())
        self.groups = GroupSet(strict)
        self.values: dict[torch.fx.Node, Any] = {}
        self.node_index: dict[torch.fx.Node, int] = {}
        self.consumer_segments: dict[str, tuple[int, ...]] = {}
        self.consumer_block: dict[str, int] = {}
        self.producer_group: dict[str, int] = {}
        self.norm_group: dict[str, int] = {}
        self.concat_norms: dict[str, list[tuple[int, str | None]]] = {}
        self.fresh_layouts: dict[torch.fx.Node, Layout] = {}
        self.channelwise: dict[str, ChannelwiseLayout] = {}
        self.param_uses: dict[str, set[torch.fx.Node]] = {}

    # ---- naming ops in messages -------------------------------------------------------

    def where(self, node: torch.fx.Node) -> str:
        """The module ``node`` runs in, for messages."""
        if node.op == "call_module":
            m = self.modules.get(str(node.target))
            return f"module {node.target!r} ({type(m).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, typ = list(stack.values())[-1]
            tname = getattr(typ, "__name__", str(typ))
            return f"module {path!r} ({tname})"
        return "the top-level forward"

    def describe_op(self, node: torch.fx.Node) -> str:
        """The op of ``node`` and where it runs, for messages."""
        if node.op == "call_module":
            return self.where(node)
        return f"{format_target(node)} (node {node.name!r}) in {self.where(node)}"

    # ---- values -----------------------------------------------------------------------

    @staticmethod
    def meta(n: Any) -> TensorMetadata | None:
        """The tensor metadata ShapeProp recorded for node ``n`` (None for non-tensors)."""
        if isinstance(n, torch.fx.Node):
            m = n.meta.get("tensor_meta")
            if isinstance(m, TensorMetadata):
                return m
        return None

    def shape(self, n: Any) -> tuple[int, ...] | None:
        """The shape of the tensor node ``n`` yields, None when it yields no tensor."""
        m = self.meta(n)
        return tuple(int(s) for s in m.shape) if m is not None else None

    def value_of(self, n: Any) -> Any:
        """What node ``n`` yields (see ``values``); None for an argument that is no node."""
        return self.values.get(n) if isinstance(n, torch.fx.Node) else None

    def layout(self, n: Any) -> Layout | None:
        """The layout of ``n``, None when it carries no followed channels."""
        v = self.value_of(n)
        return v if isinstance(v, Layout) else None

    def carries_channels(self, n: Any) -> bool:
        """``n`` carries channels, followed (a layout) or not (opaque)."""
        return isinstance(self.value_of(n), (Layout, Opaque))

    def inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Every node among the arguments of ``node``, in order."""
        seen: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: seen.append(a) or a)
        return seen

    def layout_or_frozen(self, n: torch.fx.Node, why: str) -> Layout:
        """The layout of ``n``; for a tensor without one (a constant or an opaque value), a
        fresh frozen group, the same one each time ``n`` is asked for."""
        lay = self.layout(n)
        if lay is not None:
            return lay
        if n in self.fresh_layouts:
            return self.fresh_layouts[n]
        shp = self.shape(n)
        width = shp[1] if shp is not None and len(shp) >= 2 else None
        kind = "opaque" if isinstance(self.value_of(n), Opaque) else "constant"
        reason = f"channels come from {kind} value {n.name!r} ({why})"
        g = self.groups.new_group(f"{kind}:{n.name}", width, frozen=reason)
        lay = Layout((g,))
        self.fresh_layouts[n] = lay
        return lay

    # ---- layouts ----------------------------------------------------------------------

    def layout_roots(self, lay: Layout) -> list[int]:
        """The root group of each segment of ``lay``."""
        return [self.groups.find(s) for s in lay.segs]

    def layout_signature(self, lay: Layout) -> tuple[int, tuple[int | None, ...]]:
        """``(block, segment widths)``: layouts with equal signatures can be unioned."""
        return lay.block, tuple(self.groups.width(s) for s in lay.segs)

    def union_layouts(self, layouts: Sequence[Layout]) -> bool:
        """Union the groups of ``layouts`` segment by segment when all have the same
        signature (True); change nothing when they do not (False)."""
        first = layouts[0]
        if any(self.layout_signature(x) != self.layout_signature(first) for x in layouts[1:]):
            return False
        for other in layouts[1:]:
            for a, b in zip(first.segs, other.segs, strict=True):
                self.groups.union(a, b)
        return True

    def freeze_repeated_groups(self, lay: Layout, node: torch.fx.Node, what: str) -> None:
        """Freeze every group that appears more than once in ``lay`` (channel tiling)."""
        roots = self.layout_roots(lay)
        dups = {r for r in roots if roots.count(r) > 1}
        if dups:
            self.groups.freeze(
                dups,
                f"channel tiling: the same channels appear more than once in {what} "
                f"({self.describe_op(node)}); such groups cannot be resized consistently",
            )

    def register_channelwise(
        self,
        name: str,
        node: torch.fx.Node,
        lay: Layout,
        kind: str,
        dim: int = 0,
        grow_value: str = "mean",
    ) -> None:
        """Record that the per-channel entries of ``name`` follow the segments of ``lay``.

        A second registration (a module called twice, a parameter used twice) must see the
        same layout: the groups are unioned segment by segment, or all are frozen.
        """
        old = self.channelwise.get(name)
        if old is not None:
            if not self.union_layouts([Layout(tuple(old.segments)), Layout(lay.segs)]):
                self.groups.freeze(
                    list(old.segments) + list(lay.segs),
                    f"{name!r} is applied to values with different channel layouts",
                )
            return
        self.channelwise[name] = ChannelwiseLayout(name, list(lay.segs), kind, dim, grow_value)
        for s in lay.segs:
            self.groups.record(s).channelwise.append((self.node_index[node], name))

    def opaque(self, node: torch.fx.Node, reason: str | None = None) -> Any:
        """Freeze every channel group reaching ``node``; give its output a frozen group."""
        lays = [x for x in (self.layout(a) for a in self.inputs(node)) if x is not None]
        if node.op == "call_module" and str(node.target) in self.failed:
            reason = reason or (
                f"torch.fx could not trace into {self.where(node)} "
                f"({self.failed[str(node.target)]}), so it was kept as an opaque leaf"
            )
        any_opaque = any(isinstance(self.value_of(a), Opaque) for a in self.inputs(node))
        if not lays and not any_opaque:
            return None  # a computation on constants and shapes only
        if lays:
            groups = [s for x in lays for s in x.segs]
            what = "module" if node.op == "call_module" else "op"
            self.groups.freeze(groups, reason or f"unsupported {what}: {self.describe_op(node)}")
        shp = self.shape(node)
        if shp is not None and len(shp) >= 2:
            g = self.groups.new_group(
                f"opaque:{node.name}", shp[1], frozen=f"output of unsupported op {node.name!r}"
            )
            return Layout((g,))
        return Opaque(node.name)

    # ---- result -----------------------------------------------------------------------

    def finish(self) -> CouplingGraph:
        """Apply the end-of-walk freezes and number the groups that carry weights."""
        self._freeze_tiled_consumer_inputs()
        self._freeze_params_used_elsewhere()
        self.groups.apply_deferred_freezes()
        # groups nothing produces, normalises or reads (an opaque op's output that only goes
        # to the model output, say) carry no weights: leave them out, except model inputs
        roots = [
            r
            for r in self.groups.all_roots()
            if self.groups.raw[r].producers
            or self.groups.raw[r].norms
            or self.groups.raw[r].consumers
            or self.groups.raw[r].channelwise
            or "model input" in self.groups.raw[r].frozen
        ]
        new_id = {r: i for i, r in enumerate(roots)}
        groups = [self._group(r, new_id[r]) for r in roots]
        consumers = {
            name: ConsumerLayout(
                module=name,
                segments=[new_id[self.groups.find(s)] for s in segs],
                block=self.consumer_block[name],
            )
            for name, segs in self.consumer_segments.items()
        }
        concat_norms = {
            name: [(new_id[self.groups.find(s)], p) for s, p in segs]
            for name, segs in self.concat_norms.items()
            if all(self.groups.find(s) in new_id for s, _ in segs)
        }
        channelwise = {
            name: ChannelwiseLayout(
                name, [new_id[self.groups.find(s)] for s in c.segments], c.kind, c.dim, c.grow_value
            )
            for name, c in self.channelwise.items()
        }
        return CouplingGraph(
            groups=groups,
            consumers=consumers,
            warnings=list(self.groups.messages),
            concat_norms=concat_norms,
            channelwise=channelwise,
        )

    def _freeze_tiled_consumer_inputs(self) -> None:
        """Freeze groups a consumer reads twice (they may have been unioned after the read)."""
        for name, segs in self.consumer_segments.items():
            roots = [self.groups.find(s) for s in segs]
            dups = {r for r in roots if roots.count(r) > 1}
            if dups:
                self.groups.freeze(
                    dups,
                    f"channel tiling: the same group appears more than once in the input of "
                    f"consumer {name!r}",
                )

    def _freeze_params_used_elsewhere(self) -> None:
        """Freeze the groups of a per-channel parameter that is also read by an op that was
        not followed as a per-channel scale or shift (resizing it would break that op)."""
        for node in self.gm.graph.nodes:
            target = str(node.target)
            if node.op != "get_attr" or target not in self.param_uses:
                continue
            if node not in self.param_uses[target]:
                self.groups.freeze(
                    self.channelwise[target].segments,
                    f"per-channel parameter {target!r} is also used by an op that is not a "
                    "per-channel scale or shift",
                )

    def _group(self, root: int, gid: int) -> Group:
        """The public :class:`Group` ``gid`` of the raw group ``root``."""
        raw = self.groups.raw[root]
        producers = _names_in_graph_order(raw.producers)
        norms = _names_in_graph_order(raw.norms)
        return Group(
            id=gid,
            name=producers[0] if producers else raw.name,
            producers=producers,
            norms=norms,
            norm_after={n: raw.norm_after.get(n) for n in norms},
            consumers=_names_in_graph_order(raw.consumers),
            frozen="; ".join(dict.fromkeys(raw.frozen)) or None,
            width=raw.width,
            channelwise=_names_in_graph_order(raw.channelwise),
        )


def _names_in_graph_order(items: list[tuple[int, str]]) -> list[str]:
    """The names of ``(node index, name)`` pairs, sorted, each once."""
    out: list[str] = []
    for _, name in sorted(items):
        if name not in out:
            out.append(name)
    return out
