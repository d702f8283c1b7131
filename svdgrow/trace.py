"""Find coupling groups: every tensor dimension that must change together with one width.

Stage 1 of the data flow in DESIGN.md. ``trace(model, example_input)`` runs torch.fx on the
model, propagates channel layouts through its graph, and returns a :class:`CouplingGraph`.

How it works: the model is traced with :mod:`torch.fx` and run once on ``example_input``
with :class:`torch.fx.passes.shape_prop.ShapeProp` so every value's shape is known. Then
every value that carries channels (dim 1 of an ``[N, C, ...]`` activation) gets a *layout*:
an ordered list of segments, each a channel group, plus a block size (``h*w`` after a
channel-major Flatten). Producers (Conv2d/Linear) start new groups; residual adds union
groups (union-find); ``torch.cat`` along channels concatenates segment lists; elementwise ops,
pooling and dropout pass layouts through. Anything the tracer cannot follow freezes the
groups it touches, with a warning naming the op and its module (or a ``ValueError`` when
``strict=True``).

What is frozen (``Group.frozen`` says why):

* the model input and every group that reaches the model output;
* grouped/depthwise Conv2d (input and output groups);
* Linear applied to a tensor that is still more than 2-D (it acts on the last dim);
* BatchNorm on a multi-segment layout (after a ``torch.cat``) or on a flattened value;
* channel tiling (``x.repeat(1, t, 1, 1)``, ``torch.cat([x, x], 1)``...): any group that
  appears twice in one layout;
* residual adds whose operands have different segment structures, operands broadcast across
  channels, per-channel constants (parameters used directly, e.g. ``x * self.gamma``);
* channel-wise products of two activations (gating, squeeze-excitation);
* softmax over the channel dim (only matters if the group is not at the output anyway);
* every unknown module, function or method that receives a channel-carrying tensor
  (LayerNorm, GroupNorm, Conv1d, ConvTranspose2d, ``x.mean(1)``, ``x[:, :3]``,
  channel-mixing reshapes or permutes, custom ops...). Its output gets a fresh frozen group.

What is followed without freezing: Conv2d (groups=1) and Linear on a 2-D input as producers
and consumers; BatchNorm1d/2d on one group (``norm_after`` names the producer it reads
directly, through Identity/contiguous/clone/dtype casts); activations, dropout, max/avg/
adaptive pooling, interpolation, spatial padding and slicing, spatial permutes, reductions over
spatial dims (``x.mean((2, 3))``); reshapes that keep dim 0 and keep channels channel-major
(``nn.Flatten``, ``torch.flatten``, ``x.view(x.size(0), -1)``, ``nn.Unflatten`` back to
channels, squeezes); adds/subtracts (groups unioned), products with scalars or with tensors
broadcast over channels; ``torch.cat`` along channels (segments) or along another dim
(groups unioned); a module called several times (its inputs, outputs or norms unioned).

Submodules torch.fx cannot trace into (data-dependent control flow...) are kept as opaque
leaves with a warning when ``strict=False``; ``leaf_modules`` does the same on purpose.

Use a batch of at least 2 in ``example_input``: with a batch of 1 some batch reshapes
cannot be told apart from channel reshapes.

Example::

    graph = trace(model, torch.randn(2, 1, 28, 28))
    print(graph.describe(model))
    for group in graph.resizable():
        ...  # group.producers, group.norms, graph.consumers_of(group.id)
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["Group", "ConsumerLayout", "CouplingGraph", "CouplingWarning", "trace"]


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
class CouplingGraph:
    """The coupling groups of a model, as found by :func:`trace`.

    Attributes:
        groups: every group, ``groups[i].id == i``, numbered in graph order (the model input
            first).
        consumers: for each consumer module name (Conv2d with ``groups == 1``, Linear on a
            2-D input), the layout of its input channels; in graph order.
        warnings: one line per reason a group was frozen by an op the tracer could not
            follow (the same lines are issued as :class:`CouplingWarning`).
    """

    groups: list[Group]
    consumers: dict[str, ConsumerLayout]
    warnings: list[str] = field(default_factory=list)

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
        traced width. Every consumer's input size is checked against its layout.

        Args:
            model: the traced model, possibly after surgery.

        Returns:
            ``widths[i]`` is the width of ``groups[i]``.

        Raises:
            ValueError: the modules of one group disagree, or a consumer's input size is
                not ``block * sum(widths of its segments)``.
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
            else:  # pragma: no cover - every traced group records a width
                raise ValueError(f"group {g.id} ({g.name!r}) has no known width")
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
        return out

    def describe(self, model: nn.Module | None = None) -> str:
        """A text table of the groups (one line each), then the consumers' layouts.

        Args:
            model: when given, widths are read from it (see :meth:`widths`); otherwise the
                traced widths are shown.
        """
        widths = self.widths(model) if model is not None else [g.width for g in self.groups]
        rows = [("id", "name", "width", "frozen", "producers", "norms", "consumers")]
        for g, w in zip(self.groups, widths):
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
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# helpers on modules


def _lookup(mods: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in mods:
        raise KeyError(f"module {name!r} of the coupling graph is not in the model")
    return mods[name]


def _out_width(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return int(m.out_channels)
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    raise TypeError(f"expected a Conv2d or Linear producer, got {type(m).__name__}")


def _in_width(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return int(m.in_channels)
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    raise TypeError(f"expected a Conv2d or Linear consumer, got {type(m).__name__}")


# --------------------------------------------------------------------------------------
# op tables


def _objs(owner: Any, names: str) -> set[Any]:
    return {getattr(owner, n) for n in names.split() if hasattr(owner, n)}


_PASS_MODULES: tuple[type, ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 LeakyReLU RReLU GELU SiLU ELU SELU CELU Tanh Sigmoid Hardswish Hardsigmoid "
        "Hardtanh Mish Softplus Softsign Tanhshrink Hardshrink Softshrink LogSigmoid Threshold "
        "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout "
        "MaxPool1d MaxPool2d AvgPool1d AvgPool2d AdaptiveAvgPool1d AdaptiveAvgPool2d "
        "AdaptiveMaxPool1d AdaptiveMaxPool2d LPPool1d LPPool2d Identity Upsample "
        "UpsamplingNearest2d UpsamplingBilinear2d"
    ).split()
    if hasattr(nn, n)
)
_PAD_MODULES: tuple[type, ...] = tuple(
    getattr(nn, n)
    for n in (
        "ZeroPad1d ZeroPad2d ConstantPad1d ConstantPad2d ReflectionPad1d ReflectionPad2d "
        "ReplicationPad1d ReplicationPad2d CircularPad1d CircularPad2d"
    ).split()
    if hasattr(nn, n)
)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)

_PASS_FUNCS = _objs(
    F,
    "relu relu_ relu6 leaky_relu leaky_relu_ rrelu gelu silu elu elu_ selu celu hardswish "
    "hardsigmoid hardtanh hardtanh_ mish softplus softsign tanhshrink hardshrink softshrink "
    "logsigmoid sigmoid tanh threshold dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout max_pool1d max_pool2d avg_pool1d avg_pool2d adaptive_avg_pool1d "
    "adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d lp_pool1d lp_pool2d "
    "interpolate upsample upsample_nearest upsample_bilinear",
) | _objs(
    torch,
    "relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ clip abs neg negative exp square "
    "clone detach max_pool2d avg_pool1d",
) | {operator.neg, operator.pos}
_PASS_METHODS = set(
    (
        "relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ clip clip_ abs abs_ neg neg_ "
        "exp exp_ square contiguous clone detach detach_ float double half bfloat16 to type "
        "cpu cuda requires_grad_"
    ).split()
)
_IDENTITY_METHODS = set(
    "contiguous clone detach float double half bfloat16 to type type_as cpu cuda requires_grad_".split()
)
_IDENTITY_FUNCS = _objs(torch, "clone detach")
_ADD_FUNCS = {operator.add, operator.sub, operator.iadd, operator.isub} | _objs(
    torch, "add sub subtract"
)
_ADD_METHODS = {"add", "add_", "sub", "sub_", "subtract", "subtract_"}
_MUL_FUNCS = {operator.mul, operator.imul, operator.truediv, operator.itruediv} | _objs(
    torch, "mul multiply div divide true_divide"
)
_MUL_METHODS = set("mul mul_ multiply div div_ divide true_divide".split())
_CAT_FUNCS = _objs(torch, "cat concat concatenate")
_RESHAPE_FUNCS = _objs(torch, "flatten reshape squeeze unsqueeze unflatten")
_RESHAPE_METHODS = set("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split())
_EXPAND_METHODS = {"expand", "expand_as"}
_REDUCE_FUNCS = _objs(torch, "mean sum amax amin std var logsumexp")
_REDUCE_METHODS = set("mean sum amax amin std var logsumexp".split())
_PERMUTE_FUNCS = _objs(torch, "permute transpose swapaxes swapdims")
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
_REPEAT_FUNCS = _objs(torch, "tile")
_REPEAT_METHODS = {"repeat", "tile"}
_SOFTMAX_FUNCS = _objs(F, "softmax log_softmax softmin") | _objs(torch, "softmax log_softmax")
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_PAD_FUNCS = {F.pad}
_SHAPE_METHODS = set(
    "size dim ndimension numel nelement get_device is_contiguous element_size stride".split()
)
_SHAPE_FUNCS = {getattr, len, torch.numel}


# --------------------------------------------------------------------------------------
# the tracer


@dataclass(frozen=True)
class _Layout:
    """Channel layout of one value: segments (raw group ids) of ``block`` entries each."""

    segs: tuple[int, ...]
    block: int = 1
    producer: str | None = None  # the producer whose output this value is, directly


@dataclass(frozen=True)
class _Opaque:
    """A value derived from channels through an op the tracer does not follow."""

    origin: str


@dataclass
class _RawGroup:
    name: str
    width: int | None
    producers: list[tuple[int, str]] = field(default_factory=list)
    norms: list[tuple[int, str]] = field(default_factory=list)
    norm_after: dict[str, str | None] = field(default_factory=dict)
    consumers: list[tuple[int, str]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def _fmt_target(node: torch.fx.Node) -> str:
    """A readable name for the op of ``node``: ``torch.cat``, ``Tensor.view``, ``F.pad``..."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return str(t)
    name = getattr(t, "__name__", None) or repr(t)
    for prefix, owner in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(owner, name, None) is t:
            return f"{prefix}.{name}"
    mod = getattr(t, "__module__", None)
    return f"{mod}.{getattr(t, '__qualname__', name)}" if mod else name


def _arg(node: torch.fx.Node, i: int, *names: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, given by position or by one of its keyword ``names``."""
    if len(node.args) > i:
        return node.args[i]
    for n in names:
        if n in node.kwargs:
            return node.kwargs[n]
    return default


def _self_arg(node: torch.fx.Node) -> Any:
    """The tensor an op acts on: ``self`` of a method, ``input`` (or ``x``) of a function."""
    return _arg(node, 0, "input", "self", "x")


class _Builder:
    """Walks a shape-propagated fx graph and builds the coupling groups."""

    def __init__(self, gm: torch.fx.GraphModule, strict: bool, failed: dict[str, str]):
        self.gm = gm
        self.strict = strict
        self.failed = failed  # submodules fx could not trace -> error text
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.raw: list[_RawGroup] = []
        self.env: dict[torch.fx.Node, Any] = {}
        self.order: dict[torch.fx.Node, int] = {}
        self.consumer_raw: dict[str, tuple[int, ...]] = {}
        self.consumer_block: dict[str, int] = {}
        self.producer_group: dict[str, int] = {}
        self.norm_group: dict[str, int] = {}
        self.fresh_cache: dict[torch.fx.Node, _Layout] = {}
        self.messages: list[str] = []

    # ---- union-find -------------------------------------------------------------------

    def new_group(self, name: str, width: int | None, frozen: str | None = None) -> int:
        gid = len(self.raw)
        self.parent.append(gid)
        self.raw.append(_RawGroup(name=name, width=width))
        if frozen:
            self.raw[gid].frozen.append(frozen)
        return gid

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        ga, gb = self.raw[ra], self.raw[rb]
        if ga.width is None:
            ga.width = gb.width
        ga.producers += gb.producers
        ga.norms += gb.norms
        for k, v in gb.norm_after.items():
            ga.norm_after.setdefault(k, v)
        ga.consumers += gb.consumers
        ga.frozen += gb.frozen
        ga.pending += gb.pending
        self.parent[rb] = ra
        return ra

    def gname(self, g: int) -> str:
        r = self.raw[self.find(g)]
        return min(r.producers)[1] if r.producers else r.name

    def width(self, g: int) -> int | None:
        return self.raw[self.find(g)].width

    # ---- reporting --------------------------------------------------------------------

    def where(self, node: torch.fx.Node) -> str:
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
        if node.op == "call_module":
            return self.where(node)
        return f"{_fmt_target(node)} (node {node.name!r}) in {self.where(node)}"

    def freeze(self, groups: Iterable[int], reason: str, warn: bool = True) -> None:
        roots = sorted({self.find(g) for g in groups})
        if not roots:
            return
        # an op that only touches groups already frozen changes nothing: no warning
        if warn and any(not self.raw[r].frozen for r in roots):
            names = ", ".join(self.gname(r) for r in roots)
            msg = f"{reason}; frozen group(s): {names}"
            if self.strict:
                raise ValueError(
                    f"svdgrow.trace(strict=True): {msg}. Rewrite that part of the model with "
                    "supported ops, or call trace(..., strict=False) to freeze those groups "
                    "instead of failing."
                )
            if msg not in self.messages:
                self.messages.append(msg)
        for r in roots:
            if reason not in self.raw[r].frozen:
                self.raw[r].frozen.append(reason)

    # ---- values -----------------------------------------------------------------------

    @staticmethod
    def meta(n: Any) -> TensorMetadata | None:
        if isinstance(n, torch.fx.Node):
            m = n.meta.get("tensor_meta")
            if isinstance(m, TensorMetadata):
                return m
        return None

    def shape(self, n: Any) -> tuple[int, ...] | None:
        m = self.meta(n)
        return tuple(int(s) for s in m.shape) if m is not None else None

    def val(self, n: Any) -> Any:
        return self.env.get(n) if isinstance(n, torch.fx.Node) else None

    def layout(self, n: Any) -> _Layout | None:
        v = self.val(n)
        return v if isinstance(v, _Layout) else None

    def need_layout(self, n: torch.fx.Node, why: str) -> _Layout:
        """The layout of ``n``; a fresh frozen group for a tensor without one."""
        lay = self.layout(n)
        if lay is not None:
            return lay
        if n in self.fresh_cache:
            return self.fresh_cache[n]
        shp = self.shape(n)
        width = shp[1] if shp is not None and len(shp) >= 2 else None
        v = self.val(n)
        kind = "opaque" if isinstance(v, _Opaque) else "constant"
        reason = f"channels come from {kind} value {n.name!r} ({why})"
        g = self.new_group(f"{kind}:{n.name}", width, frozen=reason)
        lay = _Layout((g,))
        self.fresh_cache[n] = lay
        return lay

    def roots(self, lay: _Layout) -> list[int]:
        return [self.find(s) for s in lay.segs]

    def struct(self, lay: _Layout) -> tuple[int, tuple[int | None, ...]]:
        return lay.block, tuple(self.width(s) for s in lay.segs)

    def inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        seen: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: seen.append(a) or a)
        return seen

    def check_dups(self, lay: _Layout, node: torch.fx.Node, what: str) -> None:
        roots = self.roots(lay)
        dups = {r for r in roots if roots.count(r) > 1}
        if dups:
            self.freeze(
                dups,
                f"channel tiling: the same channels appear more than once in {what} "
                f"({self.describe_op(node)}); such groups cannot be resized consistently",
            )

    def opaque(self, node: torch.fx.Node, reason: str | None = None) -> Any:
        """Freeze every channel group reaching ``node``; give its output a frozen group."""
        lays = [self.layout(a) for a in self.inputs(node)]
        lays = [x for x in lays if x is not None]
        if node.op == "call_module" and str(node.target) in self.failed:
            reason = reason or (
                f"torch.fx could not trace into {self.where(node)} "
                f"({self.failed[str(node.target)]}), so it was kept as an opaque leaf"
            )
        any_opaque = any(isinstance(self.val(a), _Opaque) for a in self.inputs(node))
        if not lays and not any_opaque:
            return None  # a computation on constants and shapes only
        if lays:
            groups = [s for x in lays for s in x.segs]
            what = "module" if node.op == "call_module" else "op"
            self.freeze(groups, reason or f"unsupported {what}: {self.describe_op(node)}")
        shp = self.shape(node)
        if shp is not None and len(shp) >= 2:
            g = self.new_group(
                f"opaque:{node.name}", shp[1], frozen=f"output of unsupported op {node.name!r}"
            )
            return _Layout((g,))
        return _Opaque(node.name)

    # ---- the walk ---------------------------------------------------------------------

    def run(self) -> CouplingGraph:
        n_inputs = 0
        for i, node in enumerate(self.gm.graph.nodes):
            self.order[node] = i
            if node.op == "placeholder":
                shp = self.shape(node)
                if shp is None:
                    self.env[node] = None
                    continue
                if len(shp) < 2:
                    self.env[node] = _Opaque(node.name)
                    continue
                name = "input" if n_inputs == 0 else f"input:{node.name}"
                n_inputs += 1
                g = self.new_group(name, shp[1], frozen="model input")
                self.env[node] = _Layout((g,))
            elif node.op == "get_attr":
                self.env[node] = None
            elif node.op == "output":
                for a in self.inputs(node):
                    lay = self.layout(a)
                    if lay is not None:
                        self.freeze(lay.segs, "model output", warn=False)
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.env[node] = self.call_op(node)
            else:  # pragma: no cover - fx has no other ops
                self.env[node] = self.opaque(node)
        return self.finish()

    # modules

    def call_module(self, node: torch.fx.Node) -> Any:
        name = str(node.target)
        m = self.modules[name]
        x = node.args[0] if node.args else None
        if not isinstance(x, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
            return self.opaque(node)
        if self.val(x) is None and not isinstance(m, (nn.Conv2d, nn.Linear)):
            return None  # a module applied to constants: no channels of ours flow in
        xs, ys = self.shape(x), self.shape(node)
        if xs is None or ys is None:
            return self.opaque(node)
        if isinstance(m, nn.Conv2d):
            return self.conv(node, m, x, xs, ys)
        if isinstance(m, nn.Linear):
            return self.linear(node, m, x, xs, ys)
        if isinstance(m, _NORM_MODULES):
            return self.norm(node, x, xs, ys)
        if isinstance(m, _PASS_MODULES):
            if getattr(m, "return_indices", False):
                return self.opaque(node)
            return self.passthrough(node, x)
        if isinstance(m, _PAD_MODULES):
            return self.pad(node, x, len(m.padding))
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return self.passthrough(node, x)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if isinstance(m, _SOFTMAX_MODULES):
            return self.softmax(node, x, m.dim)
        return self.opaque(node)

    def register_producer(self, name: str, node: torch.fx.Node, width: int) -> int:
        g = self.new_group(name, width)
        self.raw[g].producers.append((self.order[node], name))
        if name in self.producer_group:  # the module is called more than once
            g = self.union(self.producer_group[name], g)
        else:
            self.producer_group[name] = g
        return g

    def register_consumer(self, name: str, node: torch.fx.Node, lay: _Layout) -> None:
        if name in self.consumer_raw:  # called more than once: both inputs share columns
            old = _Layout(self.consumer_raw[name], self.consumer_block[name])
            if self.struct(old) == self.struct(lay):
                for a, b in zip(old.segs, lay.segs):
                    self.union(a, b)
            else:
                self.freeze(
                    list(old.segs) + list(lay.segs),
                    f"module {name!r} is called on inputs with different channel layouts",
                )
            return
        self.consumer_raw[name] = lay.segs
        self.consumer_block[name] = lay.block
        for s in lay.segs:
            self.raw[self.find(s)].consumers.append((self.order[node], name))

    def conv(self, node, m: nn.Conv2d, x, xs, ys) -> Any:
        name = str(node.target)
        if len(xs) != 4:
            return self.opaque(
                node,
                f"Conv2d {name!r} called on a {len(xs)}-D input (only batched [N, C, H, W] "
                "inputs are followed)",
            )
        lay = self.need_layout(x, f"input of {name!r}")
        if lay.block != 1:
            # channels merged by a reshape: the conv's input channels are not whole groups.
            # Freeze what flows in; the conv still reads (a frozen group) and produces.
            self.freeze(lay.segs, f"Conv2d {name!r} reads a channel-merging reshape")
            lay = _Layout((self.new_group(f"opaque:{x.name}", xs[1], f"reshaped input of {name!r}"),))
        if m.groups != 1:
            out = self.register_producer(name, node, ys[1])
            self.freeze(
                list(lay.segs) + [out],
                f"grouped convolution {name!r} (groups={m.groups}) ties its input and output "
                "channels",
            )
            return _Layout((out,), 1, name)
        self.register_consumer(name, node, lay)
        return _Layout((self.register_producer(name, node, ys[1]),), 1, name)

    def linear(self, node, m: nn.Linear, x, xs, ys) -> Any:
        name = str(node.target)
        if len(xs) != 2:
            return self.opaque(
                node,
                f"Linear {name!r} is applied to a {len(xs)}-D input (on its last dim, not on "
                "channels): it is not a channel consumer",
            )
        lay = self.need_layout(x, f"input of {name!r}")
        self.register_consumer(name, node, lay)
        return _Layout((self.register_producer(name, node, ys[1]),), 1, name)

    def norm(self, node, x, xs, ys) -> Any:
        name = str(node.target)
        lay = self.layout(x)
        if lay is None:
            return self.opaque(node)
        if len(lay.segs) != 1 or lay.block != 1:
            why = "a concatenation of groups" if len(lay.segs) != 1 else "a flattened value"
            self.freeze(lay.segs, f"BatchNorm {name!r} normalises {why}")
            return _Layout(lay.segs, lay.block)
        gid = lay.segs[0]
        if name in self.norm_group:  # one norm called on two values ties their channels
            gid = self.union(self.norm_group[name], gid)
        else:
            self.norm_group[name] = gid
        r = self.raw[self.find(gid)]
        if name in r.norm_after and r.norm_after[name] != lay.producer:
            r.norm_after[name] = None
        else:
            r.norm_after[name] = lay.producer
        r.norms.append((self.order[node], name))
        return _Layout(lay.segs, 1)

    # functions and methods

    def call_op(self, node: torch.fx.Node) -> Any:
        t = node.target
        fn = node.op == "call_function"
        first = _self_arg(node)
        if (fn and t in _SHAPE_FUNCS) or (not fn and t in _SHAPE_METHODS):
            return None
        if fn and t is operator.getitem:
            return self.getitem(node)
        if not any(
            self.layout(a) is not None or isinstance(self.val(a), _Opaque)
            for a in self.inputs(node)
        ):
            return None  # constants and shapes only
        if (fn and t in _ADD_FUNCS) or (not fn and t in _ADD_METHODS):
            return self.binary(node, "add")
        if (fn and t in _MUL_FUNCS) or (not fn and t in _MUL_METHODS):
            return self.binary(node, "mul")
        if fn and t in _CAT_FUNCS:
            return self.cat(node)
        if (fn and t in _PASS_FUNCS) or (not fn and t in _PASS_METHODS):
            return self.passthrough(node, first)
        if (fn and t in _RESHAPE_FUNCS) or (not fn and t in _RESHAPE_METHODS):
            return self.reshape(node, first)
        if not fn and t == "type_as":
            return self.passthrough(node, first, check_others=False)
        if not fn and t in _EXPAND_METHODS:
            xs, ys = self.shape(first), self.shape(node)
            if xs and ys and len(xs) == len(ys) and xs[:2] == ys[:2]:
                return self.passthrough(node, first, check_others=False)
            return self.opaque(node)
        if (fn and t in _REDUCE_FUNCS) or (not fn and t in _REDUCE_METHODS):
            return self.reduce(node, first)
        if (fn and t in _PERMUTE_FUNCS) or (not fn and t in _PERMUTE_METHODS):
            return self.permute(node, first)
        if (fn and t in _REPEAT_FUNCS) or (not fn and t in _REPEAT_METHODS):
            return self.repeat(node, first)
        if (fn and t in _SOFTMAX_FUNCS) or (not fn and t in _SOFTMAX_METHODS):
            return self.softmax(node, first, _arg(node, 1, "dim"))
        if fn and t in _PAD_FUNCS:
            pad = _arg(node, 1, "pad")
            if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
                return self.opaque(node)
            return self.pad(node, first, len(pad))
        return self.opaque(node)

    def passthrough(self, node, x, check_others: bool = True) -> Any:
        """Elementwise / spatial-only ops: the layout of ``x`` goes through unchanged."""
        lay = self.layout(x)
        if lay is None:
            return self.opaque(node)
        if check_others:
            others = [a for a in self.inputs(node) if a is not x]
            if any(self.layout(a) is not None or isinstance(self.val(a), _Opaque) for a in others):
                return self.opaque(node)
        xs, ys = self.shape(x), self.shape(node)
        if xs is None or ys is None or len(ys) < 2 or ys[:2] != xs[:2]:
            return self.opaque(node)
        t = node.target
        ident = (
            (node.op == "call_module" and isinstance(self.modules.get(str(t)), nn.Identity))
            or (node.op == "call_method" and t in _IDENTITY_METHODS)
            or (node.op == "call_function" and t in _IDENTITY_FUNCS)
        )
        # a norm after an identity-like op still follows the producer directly
        return _Layout(lay.segs, lay.block, lay.producer if ident else None)

    def pad(self, node, x, n_pad: int) -> Any:
        xs = self.shape(x)
        if xs is None or n_pad % 2 or len(xs) - n_pad // 2 <= 1:
            return self.opaque(node, f"padding over the channel dim: {self.describe_op(node)}")
        return self.passthrough(node, x)

    def softmax(self, node, x, dim: Any) -> Any:
        out = self.passthrough(node, x)
        xs = self.shape(x)
        if not isinstance(out, _Layout) or xs is None:
            return out
        if dim is None:
            dim = 0 if len(xs) in (0, 1, 3) else 1
        if not isinstance(dim, int):
            return self.opaque(node)
        if dim % len(xs) == 1:
            for s in out.segs:
                reason = f"softmax over channels ({self.describe_op(node)})"
                r = self.raw[self.find(s)]
                if reason not in r.pending:
                    r.pending.append(reason)
        return out

    def reshape(self, node, x) -> Any:
        """view/reshape/flatten/squeeze...: follow it when channels stay channel-major."""
        lay = self.layout(x)
        xs, ys = self.shape(x), self.shape(node)
        if lay is None or xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
            return self.opaque(node)
        if ys[0] != xs[0]:
            return self.opaque(node, f"reshape across the batch dim: {self.describe_op(node)}")
        channels, rem = divmod(xs[1], lay.block)
        if rem or channels == 0 or ys[1] % channels:
            return self.opaque(
                node, f"reshape that mixes channels: {self.describe_op(node)} ({xs} -> {ys})"
            )
        # row-major reshape keeping dim 0: output index i along dim 1 holds channel
        # i // (ys[1] / channels) whenever channels divides ys[1] (channel-major blocks)
        return _Layout(lay.segs, ys[1] // channels)

    def reduce(self, node, x) -> Any:
        xs = self.shape(x)
        dim = _arg(node, 1, "dim", "axis")
        if isinstance(dim, int):
            dim = [dim]
        if xs is None or not isinstance(dim, (list, tuple)) or not dim:
            return self.opaque(node)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in dim):
            return self.opaque(node)
        if {d % len(xs) for d in dim} & {0, 1}:
            return self.opaque(node, f"reduction over the batch or channel dim: {self.describe_op(node)}")
        return self.passthrough(node, x)

    def permute(self, node, x) -> Any:
        xs = self.shape(x)
        if xs is None:
            return self.opaque(node)
        args = list(node.args[1:])
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            dims = list(dims or node.kwargs.get("dims", []))
            if len(dims) == len(xs) and all(isinstance(d, int) for d in dims):
                if [d % len(xs) for d in dims[:2]] == [0, 1]:
                    return self.passthrough(node, x)
        else:
            dims = [_arg(node, 1, "dim0", "axis0"), _arg(node, 2, "dim1", "axis1")]
            if len(dims) == 2 and all(isinstance(d, int) for d in dims):
                if not {d % len(xs) for d in dims} & {0, 1} or dims[0] % len(xs) == dims[1] % len(xs):
                    return self.passthrough(node, x)
        return self.opaque(node, f"permute/transpose that moves channels: {self.describe_op(node)}")

    def repeat(self, node, x) -> Any:
        lay, xs = self.layout(x), self.shape(x)
        reps = list(node.args[1:])
        if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
            reps = list(reps[0])
        if not reps:
            reps = _arg(node, 1, "repeats", "dims", "sizes", default=[])
            reps = list(reps) if isinstance(reps, (list, tuple)) else [reps]
        if lay is None or xs is None or not reps or not all(isinstance(r, int) for r in reps):
            return self.opaque(node)
        if node.target == "tile" or node.target is getattr(torch, "tile", None):
            reps = [1] * (len(xs) - len(reps)) + reps
        if len(reps) != len(xs):
            return self.opaque(node)
        t = reps[1]
        if t == 1:
            return _Layout(lay.segs, lay.block)
        if lay.block != 1:
            return self.opaque(node)
        out = _Layout(lay.segs * t, 1)
        self.freeze(
            lay.segs,
            f"channel tiling by {self.describe_op(node)} (channel j copies input channel j mod "
            "C): a tiled group cannot be resized consistently",
        )
        return out

    def getitem(self, node) -> Any:
        x, idx = node.args[0], node.args[1]
        v = self.val(x)
        if isinstance(v, _Opaque):
            return v
        lay = self.layout(x)
        if lay is None:
            return None
        xs = self.shape(x)
        if not isinstance(idx, tuple):
            idx = (idx,)
        full = slice(None, None, None)
        if any(i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1 or xs is None:
            return self.opaque(node, f"indexing that moves channels: {self.describe_op(node)}")
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (full,) * (len(xs) - len(idx) + 1) + idx[k + 1 :]
        lead = list(idx[:2]) + [full] * (2 - len(idx[:2]))

        def keeps(i: Any, size: int) -> bool:
            return isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) and (
                i.stop is None or (isinstance(i.stop, int) and i.stop >= size)
            )

        if not (isinstance(lead[0], slice) and keeps(lead[1], xs[1])):
            return self.opaque(node, f"indexing that selects channels: {self.describe_op(node)}")
        if not all(isinstance(i, (slice, int)) for i in idx[2:]) or any(
            isinstance(i, torch.fx.Node) for i in idx
        ):
            return self.opaque(node)
        return self.passthrough(node, x, check_others=False)

    def mixed(self, node: torch.fx.Node, lays: list[_Layout]) -> _Layout:
        """A fresh frozen group for the output of an op that mixes incompatible layouts."""
        ys = self.shape(node)
        block = lays[0].block if len({x.block for x in lays}) == 1 else 1
        width = ys[1] // block if ys is not None and len(ys) >= 2 else None
        g = self.new_group(f"opaque:{node.name}", width, frozen=f"output of {node.name!r} mixes layouts")
        return _Layout((g,), block)

    def binary(self, node, kind: str) -> Any:
        """Broadcasting add/sub (unions groups) or mul/div (scaling only)."""
        ys = self.shape(node)
        operands = [_self_arg(node), _arg(node, 1, "other")]
        if ys is None or len(ys) < 2:
            return self.opaque(node)
        k, c = len(ys), ys[1]
        coupled: list[_Layout] = []
        loose: list[int] = []
        per_channel_const: list[str] = []
        for a in operands:
            if not isinstance(a, torch.fx.Node):
                continue
            s = self.shape(a)
            lay = self.layout(a)
            if s is None:
                if isinstance(self.val(a), _Opaque) and c > 1:
                    per_channel_const.append(a.name)
                continue
            m = len(s)
            if lay is not None and m == k and s[1] == c:
                coupled.append(lay)
                continue
            if lay is not None:
                loose += list(lay.segs)
            j = 1 - k + m
            if j >= 0 and s[j] == c and c > 1:
                per_channel_const.append(a.name)
        if loose:
            self.freeze(loose, f"operand broadcast across channels in {self.describe_op(node)}")
        if not coupled:
            return self.opaque(node)
        same = all(self.roots(x) == self.roots(coupled[0]) for x in coupled)
        if kind == "mul" and len(coupled) > 1 and not same:
            return self.opaque(
                node,
                f"channel-wise product of two activations in {self.describe_op(node)} "
                "(gating is not followed)",
            )
        out = coupled[0]
        if len(coupled) > 1:
            if all(self.struct(x) == self.struct(out) for x in coupled[1:]):
                for other in coupled[1:]:
                    for a, b in zip(out.segs, other.segs):
                        self.union(a, b)
                self.check_dups(out, node, "one residual sum")
            else:
                self.freeze(
                    [s for x in coupled for s in x.segs],
                    f"residual add {self.describe_op(node)} sums values with different "
                    f"channel layouts {[self.struct(x)[1] for x in coupled]}",
                )
                out = self.mixed(node, coupled)
        if per_channel_const:
            self.freeze(
                out.segs,
                f"per-channel constant or untracked tensor {per_channel_const} in "
                f"{self.describe_op(node)}",
            )
        return _Layout(out.segs, out.block)

    def cat(self, node) -> Any:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", "axis", default=0)
        ys = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or ys is None:
            return self.opaque(node)
        if len(ys) < 2:
            return self.opaque(node)
        if any(self.shape(t) is None or len(self.shape(t)) != len(ys) for t in tensors):
            return self.opaque(node)
        lays = [self.need_layout(t, f"operand of {node.name!r}") for t in tensors]
        if dim % len(ys) == 1:
            if len({x.block for x in lays}) != 1:
                return self.opaque(
                    node, f"concatenation of differently flattened values: {self.describe_op(node)}"
                )
            out = _Layout(tuple(s for x in lays for s in x.segs), lays[0].block)
            self.check_dups(out, node, "one concatenation")
            return out
        out = lays[0]
        if all(self.struct(x) == self.struct(out) for x in lays[1:]):
            for other in lays[1:]:
                for a, b in zip(out.segs, other.segs):
                    self.union(a, b)
            self.check_dups(out, node, "one concatenation")
        else:
            self.freeze(
                [s for x in lays for s in x.segs],
                f"{self.describe_op(node)} joins values with different channel layouts along "
                f"dim {dim}",
            )
            out = self.mixed(node, lays)
        return _Layout(out.segs, out.block)

    # ---- result -----------------------------------------------------------------------

    def finish(self) -> CouplingGraph:
        for name, segs in self.consumer_raw.items():
            roots = [self.find(s) for s in segs]
            dups = {r for r in roots if roots.count(r) > 1}
            if dups:
                self.freeze(
                    dups,
                    f"channel tiling: the same group appears more than once in the input of "
                    f"consumer {name!r}",
                )
        for gid in range(len(self.raw)):
            r = self.raw[gid]
            if self.find(gid) == gid and r.pending and not r.frozen:
                for reason in r.pending:
                    self.freeze([gid], reason)
        roots = sorted({self.find(g) for g in range(len(self.raw))})
        # groups nothing produces, normalises or reads (an opaque op's output that only goes
        # to the model output, say) carry no weights: leave them out, except model inputs
        roots = [
            r
            for r in roots
            if self.raw[r].producers
            or self.raw[r].norms
            or self.raw[r].consumers
            or "model input" in self.raw[r].frozen
        ]
        new_id = {r: i for i, r in enumerate(roots)}

        def dedup(items: list[tuple[int, str]]) -> list[str]:
            out: list[str] = []
            for _, name in sorted(items):
                if name not in out:
                    out.append(name)
            return out

        groups = []
        for r in roots:
            raw = self.raw[r]
            producers = dedup(raw.producers)
            norms = dedup(raw.norms)
            groups.append(
                Group(
                    id=new_id[r],
                    name=producers[0] if producers else raw.name,
                    producers=producers,
                    norms=norms,
                    norm_after={n: raw.norm_after.get(n) for n in norms},
                    consumers=dedup(raw.consumers),
                    frozen="; ".join(dict.fromkeys(raw.frozen)) or None,
                    width=raw.width,
                )
            )
        consumers = {
            name: ConsumerLayout(
                module=name,
                segments=[new_id[self.find(s)] for s in segs],
                block=self.consumer_block[name],
            )
            for name, segs in self.consumer_raw.items()
        }
        return CouplingGraph(groups=groups, consumers=consumers, warnings=list(self.messages))


class _FallbackTracer(torch.fx.Tracer):
    """An fx tracer that can keep submodules it fails to trace into as opaque leaves."""

    def __init__(self, strict: bool, leaf_modules: Sequence[type | str] = ()) -> None:
        super().__init__()
        self.strict = strict
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.failed: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.failed or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        qualname = self.path_of_module(m)
        if self.strict or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = next(reversed(self.graph.nodes), None)
        stack_len = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure inside: fall back to a leaf
            while len(self.module_stack) > stack_len:
                self.module_stack.popitem(last=True)
            for node in reversed(list(self.graph.nodes)):
                if node is last:
                    break
                self.graph.erase_node(node)
            self.failed[qualname] = f"{type(e).__name__}: {e}".splitlines()[0]
            return super().call_module(m, forward, args, kwargs)


def _fx_error(model: nn.Module, e: Exception, strict: bool) -> TypeError:
    hint = (
        "Make the untraceable parts leaf modules (trace(..., leaf_modules=[TheirClass]) or "
        "move them into a submodule), wrap untraceable free functions with torch.fx.wrap, "
    )
    hint += (
        "or call trace(..., strict=False), which keeps each submodule that fails to trace "
        "as an opaque leaf (its channels frozen)."
        if strict
        else "or remove data-dependent control flow from the top-level forward."
    )
    return TypeError(
        f"svdgrow.trace: torch.fx could not trace {type(model).__name__} "
        f"({type(e).__name__}: {e}). {hint}"
    )


def trace(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    strict: bool = False,
    leaf_modules: Sequence[type | str] = (),
) -> CouplingGraph:
    """Find the coupling groups of ``model``.

    Args:
        model: the network. It is run once on ``example_input`` (in eval mode, under
            ``torch.no_grad``; each module's training flag is restored afterwards, and
            BatchNorm running statistics are not touched).
        example_input (Tensor[N, C, ...] or a tuple of them): an input batch, on the
            model's device. Use ``N >= 2``.
        strict: raise a ``ValueError`` on anything that would freeze a group (other than
            model input and output) instead of warning; also fail when torch.fx cannot
            trace a submodule instead of keeping it as an opaque leaf.
        leaf_modules: module classes or qualified names that torch.fx must not trace into;
            they are treated as opaque ops (the groups they touch are frozen).

    Returns:
        The coupling graph: groups, consumer layouts and warnings.

    Warns:
        CouplingWarning: once per op that freezes groups which were not frozen yet (the same
            lines are in ``CouplingGraph.warnings``).

    Raises:
        TypeError: torch.fx cannot trace the model (the message says what to do).
        ValueError: ``strict=True`` and an op forces a group to be frozen, or the model
            fails on ``example_input``.
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    tracer = _FallbackTracer(strict, leaf_modules)
    try:
        graph = tracer.trace(model)
        graph.lint()
    except Exception as e:
        raise _fx_error(model, e, strict) from e
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)

    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise ValueError(
            f"svdgrow.trace: running {type(model).__name__} on the example input (shapes "
            f"{shapes}) failed: {type(e).__name__}: {e}. Pass an input batch the model accepts, "
            "on the model's device."
        ) from e
    finally:
        for m, flag in flags.items():
            m.training = flag

    builder = _Builder(gm, strict, tracer.failed)
    for name, err in tracer.failed.items():
        builder.messages.append(
            f"torch.fx could not trace into module {name!r} ({err}); it is kept as an opaque "
            "leaf (pass it in leaf_modules to silence this)"
        )
    result = builder.run()
    for msg in result.warnings:
        warnings.warn(f"svdgrow.trace: {msg}", CouplingWarning, stacklevel=2)
    return result
