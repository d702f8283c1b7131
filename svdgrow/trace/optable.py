"""The ops the tracer knows, and what it does with each (``docs/design.md``, "Stage 1: trace").

Followed without freezing (the sets below; :mod:`svdgrow.trace.dispatch` maps each to its
rule in :mod:`svdgrow.trace.layers`, :mod:`~svdgrow.trace.norms`, :mod:`~svdgrow.trace.arith`
or :mod:`svdgrow.trace.rules`):

* Conv1d/Conv2d (groups=1) and Linear on a 2-D input or on a channels-last value, as producers
  and consumers;
* depthwise Conv1d/Conv2d with multiplier 1 (groups == in == out channels): its rows follow
  its input's groups, like a per-channel op;
* BatchNorm1d/2d on one group (``Group.norm_after`` names the producer it reads directly,
  through Identity/contiguous/clone/dtype casts); per-channel norms over several segments or
  other than BatchNorm (a BatchNorm after ``torch.cat``, GroupNorm with one channel per group,
  InstanceNorm), segment by segment;
* activations, dropout, max/avg/adaptive pooling, interpolation, spatial padding and slicing,
  spatial permutes, reductions over spatial dims (``x.mean((2, 3))``), torchvision's
  stochastic depth;
* permutes to channels-last and back (channels in the last dim: elementwise ops, Linear,
  adds, products and LayerNorm are followed there);
* reshapes that keep dim 0 and keep channels channel-major (``nn.Flatten``, ``torch.flatten``,
  ``x.view(x.size(0), -1)``, ``nn.Unflatten`` back to channels, squeezes);
* adds/subtracts (groups unioned), products with scalars or with tensors broadcast over
  channels; products with a gate of the same channels broadcast over every other dim
  (squeeze-and-excitation: the spaces are unioned, the gate's producers follow as per-channel
  layers); parameters or buffers with one entry per channel as scales or shifts
  (``x * self.gamma``);
* ``torch.cat`` along channels (segments) or along another dim (groups unioned);
* a module called several times (its inputs, outputs or norms unioned).

Frozen (``Group.frozen`` says why, naming the op and what would be resizable):

* the model input and every group that reaches the model output;
* grouped convolutions (1 < groups < in_channels) and depthwise ones with a channel multiplier
  above 1 (input and output groups); ConvTranspose and Conv3d layers;
* norms whose statistics pool channels: GroupNorm with several channels per group, LayerNorm
  over the channel dim (ConvNeXt's; the layers between such norms stay resizable);
* Linear applied to a tensor that is still more than 2-D (it acts on the last dim);
* BatchNorm on a flattened value;
* channel tiling (``x.repeat(1, t, 1, 1)``, ``torch.cat([x, x], 1)``...): any group that
  appears twice in one layout;
* residual adds whose operands have different segment structures, operands broadcast across
  channels, per-channel constants that are not a parameter or buffer used only that way;
* channel-wise products of two full-size activations (gating other than a broadcast gate);
* softmax over the channel dim (only matters if the group is not at the output anyway);
* every unknown module, function or method that receives a channel-carrying tensor
  (``x.mean(1)``, ``x[:, :3]``, channel-mixing reshapes or permutes, custom ops, and any op
  but the few above on a channels-last value). Its output gets a fresh frozen group.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ADD_FUNCS",
    "ADD_METHODS",
    "CAT_FUNCS",
    "CONV_MODULES",
    "ELEMENTWISE_FUNCS",
    "ELEMENTWISE_MODULES",
    "EXPAND_METHODS",
    "IDENTITY_FUNCS",
    "IDENTITY_METHODS",
    "INSTANCE_NORM_MODULES",
    "LAYER_NORM_FUNCS",
    "MUL_FUNCS",
    "MUL_METHODS",
    "NORM_MODULES",
    "PAD_FUNCS",
    "PAD_MODULES",
    "PASS_BY_NAME",
    "PASS_FUNCS",
    "PASS_METHODS",
    "PASS_MODULES",
    "PERMUTE_FUNCS",
    "PERMUTE_METHODS",
    "REDUCE_FUNCS",
    "REDUCE_METHODS",
    "REPEAT_FUNCS",
    "REPEAT_METHODS",
    "RESHAPE_FUNCS",
    "RESHAPE_METHODS",
    "SHAPE_FUNCS",
    "SHIFT_FUNCS",
    "SHIFT_MODULES",
    "SHAPE_METHODS",
    "SOFTMAX_FUNCS",
    "SOFTMAX_METHODS",
    "SOFTMAX_MODULES",
    "UNSUPPORTED_LAYERS",
    "call_arg",
    "format_target",
    "qualified_name",
    "input_arg",
]


def _existing_attrs(owner: Any, names: str) -> list[Any]:
    """The attributes of ``owner`` named in the space-separated ``names`` that this torch has."""
    return [getattr(owner, n) for n in names.split() if hasattr(owner, n)]


# modules: matched with isinstance
ELEMENTWISE_MODULES: tuple[type, ...] = tuple(
    _existing_attrs(
        nn,
        "ReLU ReLU6 LeakyReLU RReLU GELU SiLU ELU SELU CELU Tanh Sigmoid Hardswish Hardsigmoid "
        "Hardtanh Mish Softplus Softsign Tanhshrink Hardshrink Softshrink LogSigmoid Threshold "
        "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Identity",
    )
)
PASS_MODULES: tuple[type, ...] = ELEMENTWISE_MODULES + tuple(
    _existing_attrs(
        nn,
        "MaxPool1d MaxPool2d AvgPool1d AvgPool2d AdaptiveAvgPool1d AdaptiveAvgPool2d "
        "AdaptiveMaxPool1d AdaptiveMaxPool2d LPPool1d LPPool2d Upsample "
        "UpsamplingNearest2d UpsamplingBilinear2d",
    )
)
PAD_MODULES: tuple[type, ...] = tuple(
    _existing_attrs(
        nn,
        "ZeroPad1d ZeroPad2d ConstantPad1d ConstantPad2d ReflectionPad1d ReflectionPad2d "
        "ReplicationPad1d ReplicationPad2d CircularPad1d CircularPad2d",
    )
)
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
INSTANCE_NORM_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d)
CONV_MODULES = (nn.Conv1d, nn.Conv2d)
# layers that are not followed, each with what to do instead (the message names the module)
UNSUPPORTED_LAYERS: tuple[tuple[type, str], ...] = (
    (
        nn.modules.conv._ConvTransposeNd,
        "its weight is [in, out/groups, ...] (input channels first), which surgery does not "
        "resize; its input and output groups are frozen. nn.Upsample followed by a Conv2d is "
        "resizable",
    ),
    (
        nn.Conv3d,
        "surgery resizes Conv1d, Conv2d and Linear layers only; its input and output groups "
        "are frozen",
    ),
)

# functions (call_function targets) and Tensor methods (call_method targets, by name)
ELEMENTWISE_FUNCS = {
    *_existing_attrs(
        F,
        "relu relu_ relu6 leaky_relu leaky_relu_ rrelu gelu silu elu elu_ selu celu hardswish "
        "hardsigmoid hardtanh hardtanh_ mish softplus softsign tanhshrink hardshrink softshrink "
        "logsigmoid sigmoid tanh threshold dropout dropout1d dropout2d dropout3d alpha_dropout "
        "feature_alpha_dropout",
    ),
    *_existing_attrs(
        torch,
        "relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ clip abs neg negative exp square "
        "clone detach",
    ),
    operator.neg,
    operator.pos,
}
PASS_FUNCS = ELEMENTWISE_FUNCS | {
    *_existing_attrs(
        F,
        "max_pool1d max_pool2d avg_pool1d avg_pool2d adaptive_avg_pool1d "
        "adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d lp_pool1d lp_pool2d "
        "interpolate upsample upsample_nearest upsample_bilinear",
    ),
    *_existing_attrs(torch, "max_pool2d avg_pool1d"),
}
# pooling and dropout commute with adding a per-channel constant (avg pooling only without
# zero padding counted in the mean): a constant folded into the producer before them may go
# into a BatchNorm after them (``Layout.sources``)
SHIFT_MODULES: tuple[type, ...] = tuple(
    _existing_attrs(
        nn,
        "MaxPool1d MaxPool2d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveMaxPool1d "
        "AdaptiveMaxPool2d Dropout Dropout1d Dropout2d AvgPool1d AvgPool2d",
    )
)
SHIFT_FUNCS = set(
    _existing_attrs(
        F,
        "max_pool1d max_pool2d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d "
        "adaptive_max_pool2d dropout",
    )
)
# functions of optional libraries, known by qualified name (not imported): they pass channels
# through unchanged (torchvision's stochastic depth scales whole samples or rows)
PASS_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth"}
LAYER_NORM_FUNCS = {F.layer_norm}
PASS_METHODS = set(
    "relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ clip clip_ abs abs_ neg neg_ "
    "exp exp_ square contiguous clone detach detach_ float double half bfloat16 to type "
    "cpu cuda requires_grad_".split()
)
# pass-through ops after which a BatchNorm still reads its producer directly
IDENTITY_METHODS = set(
    "contiguous clone detach float double half bfloat16 to type type_as cpu cuda requires_grad_".split()
)
IDENTITY_FUNCS = set(_existing_attrs(torch, "clone detach"))
ADD_FUNCS = {
    operator.add,
    operator.sub,
    operator.iadd,
    operator.isub,
    *_existing_attrs(torch, "add sub subtract"),
}
ADD_METHODS = {"add", "add_", "sub", "sub_", "subtract", "subtract_"}
MUL_FUNCS = {
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    *_existing_attrs(torch, "mul multiply div divide true_divide"),
}
MUL_METHODS = set("mul mul_ multiply div div_ divide true_divide".split())
CAT_FUNCS = set(_existing_attrs(torch, "cat concat concatenate"))
RESHAPE_FUNCS = set(_existing_attrs(torch, "flatten reshape squeeze unsqueeze unflatten"))
RESHAPE_METHODS = set("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split())
EXPAND_METHODS = {"expand", "expand_as"}
REDUCE_FUNCS = set(_existing_attrs(torch, "mean sum amax amin std var logsumexp"))
REDUCE_METHODS = set("mean sum amax amin std var logsumexp".split())
PERMUTE_FUNCS = set(_existing_attrs(torch, "permute transpose swapaxes swapdims"))
PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
REPEAT_FUNCS = set(_existing_attrs(torch, "tile"))
REPEAT_METHODS = {"repeat", "tile"}
SOFTMAX_FUNCS = set(_existing_attrs(F, "softmax log_softmax softmin")) | set(
    _existing_attrs(torch, "softmax log_softmax")
)
SOFTMAX_METHODS = {"softmax", "log_softmax"}
PAD_FUNCS = {F.pad}
# shape queries: their results carry no channels
SHAPE_METHODS = set(
    "size dim ndimension numel nelement get_device is_contiguous element_size stride".split()
)
SHAPE_FUNCS = {getattr, len, torch.numel}


def format_target(node: torch.fx.Node) -> str:
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


def qualified_name(target: Any) -> str:
    """``module.qualname`` of a function target (for :data:`PASS_BY_NAME`)."""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def call_arg(node: torch.fx.Node, i: int, *names: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, given by position or by one of its keyword ``names``."""
    if len(node.args) > i:
        return node.args[i]
    for n in names:
        if n in node.kwargs:
            return node.kwargs[n]
    return default


def input_arg(node: torch.fx.Node) -> Any:
    """The tensor an op acts on: ``self`` of a method, ``input`` (or ``x``) of a function."""
    return call_arg(node, 0, "input", "self", "x")
