"""The walk: each node of the fx graph goes to its rule, looked up in the dispatch tables.

:data:`MODULE_RULES` is searched in order with ``isinstance``; :data:`FUNCTION_RULES` and
:data:`METHOD_RULES` map a call's target to its rule. An op in no table freezes the groups it
touches (``GroupBuilder.opaque``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch.fx
import torch.nn as nn

from . import arith, layers, norms, optable, rules
from .builder import GroupBuilder
from .graph import CouplingGraph
from .groups import Layout, Opaque
from .optable import call_arg, input_arg, qualified_name

__all__ = [
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "OP_RULES",
    "call_module",
    "call_op",
    "walk",
]

ModuleRule = Callable[[GroupBuilder, torch.fx.Node, nn.Module, torch.fx.Node], Any]
OpRule = Callable[[GroupBuilder, torch.fx.Node], Any]

# (module types, rule(builder, node, module, x)): the first row whose types match wins
MODULE_RULES: tuple[tuple[type | tuple[type, ...], ModuleRule], ...] = (
    (optable.CONV_MODULES, layers.conv),
    (nn.Linear, layers.linear),
    (optable.NORM_MODULES, layers.batch_norm),
    (nn.GroupNorm, norms.group_norm),
    (optable.INSTANCE_NORM_MODULES, norms.instance_norm),
    (nn.LayerNorm, norms.layer_norm),
    (tuple(t for t, _ in optable.UNSUPPORTED_LAYERS), layers.unsupported),
    (optable.PASS_MODULES, rules.pass_module),
    (optable.PAD_MODULES, lambda b, node, m, x: rules.pad(b, node, x, len(m.padding))),
    (nn.PReLU, rules.prelu),
    ((nn.Flatten, nn.Unflatten), lambda b, node, m, x: rules.reshape(b, node, x)),
    (optable.SOFTMAX_MODULES, lambda b, node, m, x: rules.softmax(b, node, x, m.dim)),
)


def _on_input(rule: Callable[..., Any]) -> OpRule:
    """``rule(builder, node, x)`` as a table rule, ``x`` being the tensor the op acts on."""
    return lambda b, node: rule(b, node, input_arg(node))


# (functions, Tensor method names, rule(builder, node)) for calls that carry channels
OP_RULES: tuple[tuple[Iterable[Any], Iterable[str], OpRule], ...] = (
    (optable.ADD_FUNCS, optable.ADD_METHODS, partial(arith.binary, kind="add")),
    (optable.MUL_FUNCS, optable.MUL_METHODS, partial(arith.binary, kind="mul")),
    (optable.LAYER_NORM_FUNCS, (), norms.layer_norm_function),
    (optable.CAT_FUNCS, (), rules.cat),
    (optable.PASS_FUNCS, optable.PASS_METHODS, _on_input(rules.passthrough)),
    (optable.RESHAPE_FUNCS, optable.RESHAPE_METHODS, _on_input(rules.reshape)),
    ((), ("type_as",), _on_input(partial(rules.passthrough, check_others=False))),
    ((), optable.EXPAND_METHODS, _on_input(rules.expand)),
    (optable.REDUCE_FUNCS, optable.REDUCE_METHODS, _on_input(rules.reduce)),
    (optable.PERMUTE_FUNCS, optable.PERMUTE_METHODS, _on_input(rules.permute)),
    (optable.REPEAT_FUNCS, optable.REPEAT_METHODS, _on_input(rules.repeat)),
    (
        optable.SOFTMAX_FUNCS,
        optable.SOFTMAX_METHODS,
        lambda b, node: rules.softmax(b, node, input_arg(node), call_arg(node, 1, "dim")),
    ),
    (optable.PAD_FUNCS, (), rules.pad_function),
)


def _index(column: int) -> dict[Any, OpRule]:
    """Target -> rule for one column of :data:`OP_RULES`; a target in two rows keeps the
    first (the sets are disjoint today: tests/test_trace.py checks it)."""
    table: dict[Any, OpRule] = {}
    for row in OP_RULES:
        for target in row[column]:
            table.setdefault(target, row[2])
    return table


FUNCTION_RULES = _index(0)
METHOD_RULES = _index(1)


# what is followed on a channels-last value (channels in the last dim, after a permute)
_CHANNELS_LAST_MODULES = (nn.Linear, nn.LayerNorm, *optable.ELEMENTWISE_MODULES)
_CHANNELS_LAST_FUNCS = (
    optable.ADD_FUNCS
    | optable.MUL_FUNCS
    | optable.PERMUTE_FUNCS
    | optable.ELEMENTWISE_FUNCS
    | optable.LAYER_NORM_FUNCS
)
_CHANNELS_LAST_METHODS = (
    optable.ADD_METHODS
    | optable.MUL_METHODS
    | optable.PERMUTE_METHODS
    | optable.PASS_METHODS
    | {"type_as"}
)


def _channels_last_refused(b: GroupBuilder, node: torch.fx.Node, followed: bool) -> Any:
    """When ``node`` reads a channels-last value and is not ``followed`` there, its opaque
    value (freezing those groups, saying why); else None."""
    dims = {lay.dim for lay in (b.layout(a) for a in b.inputs(node)) if lay is not None}
    if followed or dims <= {1}:
        return None
    return b.opaque(
        node,
        f"{b.describe_op(node)} reads a channels-last value (channels in dim {max(dims)}): only "
        "elementwise ops, Linear, LayerNorm, adds, products and permutes are followed there",
    )


def call_module(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """The value of a submodule call with one tensor argument."""
    m = b.modules[str(node.target)]
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
        return b.opaque(node)
    if b.value_of(x) is None and not isinstance(m, (*optable.CONV_MODULES, nn.Linear)):
        return None  # a module applied to constants: no channels of ours flow in
    if b.shape(x) is None or b.shape(node) is None:
        return b.opaque(node)
    refused = _channels_last_refused(b, node, isinstance(m, _CHANNELS_LAST_MODULES))
    if refused is not None:
        return refused
    for types, rule in MODULE_RULES:
        if isinstance(m, types):
            return rule(b, node, m, x)
    return b.opaque(node)


def call_op(b: GroupBuilder, node: torch.fx.Node) -> Any:
    """The value of a function or Tensor-method call."""
    t = node.target
    is_function = node.op == "call_function"
    if t in (optable.SHAPE_FUNCS if is_function else optable.SHAPE_METHODS):
        return None
    if is_function and t is operator.getitem:
        return rules.getitem(b, node)  # before the guard: only the indexed value matters
    if not any(b.carries_channels(a) for a in b.inputs(node)):
        return None  # constants and shapes only
    by_name = is_function and qualified_name(t) in optable.PASS_BY_NAME
    allowed = _CHANNELS_LAST_FUNCS if is_function else _CHANNELS_LAST_METHODS
    refused = _channels_last_refused(b, node, by_name or t in allowed)
    if refused is not None:
        return refused
    if by_name:
        return rules.passthrough(b, node, input_arg(node), check_others=False)
    rule = (FUNCTION_RULES if is_function else METHOD_RULES).get(t)
    return b.opaque(node) if rule is None else rule(b, node)


def walk(b: GroupBuilder) -> CouplingGraph:
    """Give every node of ``b.gm`` its value, in graph order, then finish the groups."""
    n_inputs = 0
    for i, node in enumerate(b.gm.graph.nodes):
        b.node_index[node] = i
        if node.op == "placeholder":
            value = _input_value(b, node, n_inputs)
            b.values[node] = value
            if isinstance(value, Layout):
                n_inputs += 1
        elif node.op == "get_attr":
            b.values[node] = None
        elif node.op == "output":
            for a in b.inputs(node):
                lay = b.layout(a)
                if lay is not None:
                    b.groups.freeze(lay.segs, "model output", warn=False)
        elif node.op == "call_module":
            b.values[node] = call_module(b, node)
        elif node.op in ("call_function", "call_method"):
            b.values[node] = call_op(b, node)
        else:  # pragma: no cover - fx has no other ops
            b.values[node] = b.opaque(node)
    return b.finish()


def _input_value(b: GroupBuilder, node: torch.fx.Node, n_inputs: int) -> Any:
    """A model input: a frozen group for its channels (dim 1) when it has them."""
    shp = b.shape(node)
    if shp is None:
        return None
    if len(shp) < 2:
        return Opaque(node.name)
    name = "input" if n_inputs == 0 else f"input:{node.name}"
    return Layout((b.groups.new_group(name, shp[1], frozen="model input"),))
