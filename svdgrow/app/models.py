"""Light residual networks built from a JSON-able architecture spec.

The family follows the prototype (SVD-evolutive-CNN): a 3x3 stem convolution, residual blocks
of two 3x3 convolutions with LeakyReLU, stride-2 blocks with a 1x1 projection shortcut for
downsampling (identity shortcuts elsewhere), optional BatchNorm, and a Flatten + Linear head on
the last feature map (7x7 for a 28x28 input after two stride-2 blocks).

Every width lives in a plain dict (the *spec*), so a model whose widths were changed by the
resizer can be described again with :func:`spec_of`, stored in a checkpoint as JSON, and
rebuilt exactly with :func:`build_model`::

    {
      "arch": "resnet", "in_channels": 1, "num_classes": 10, "input_size": 28, "bn": true,
      "stem": 128,
      "blocks": [
        {"mid": 256, "out": 256, "stride": 2, "projection": true},
        {"mid": 128, "out": 256, "stride": 1, "projection": false}
      ]
    }

A block reads the previous block's output (the stem's for the first one). A block without a
projection shortcut must keep its input width (``out`` equal to the incoming width) and stride 1.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from svdgrow._utils import eval_mode

__all__ = [
    "PRESETS",
    "ResNet",
    "ResBlock",
    "build_model",
    "narrow_spec",
    "scale_spec",
    "spec_of",
    "validate_spec",
    "preset_spec",
    "count_params",
    "count_flops",
    "describe",
    "layer_widths",
]

NEGATIVE_SLOPE = 0.01
"""Slope of every LeakyReLU in the family."""


def _block(mid: int, out: int, stride: int = 1, projection: bool | None = None) -> dict[str, Any]:
    if projection is None:
        projection = stride != 1
    return {"mid": mid, "out": out, "stride": stride, "projection": projection}


PRESETS: dict[str, dict[str, Any]] = {
    # ~2.29M parameters: stem 128, a 128->256 stride-2 block, a 256->128->256 bottleneck-ish
    # identity block, a 256->128->256 stride-2 block, head 256*7*7 -> 10.
    "mnist-2m": {
        "arch": "resnet",
        "in_channels": 1,
        "num_classes": 10,
        "input_size": 28,
        "bn": True,
        "stem": 128,
        "blocks": [_block(256, 256, 2), _block(128, 256, 1), _block(128, 256, 2)],
    },
    # ~0.60M parameters: stem 64, 64->128 stride 2, 128->64->128 identity, 128->64->128 stride 2.
    "fashion-500k": {
        "arch": "resnet",
        "in_channels": 1,
        "num_classes": 10,
        "input_size": 28,
        "bn": True,
        "stem": 64,
        "blocks": [_block(128, 128, 2), _block(64, 128, 1), _block(64, 128, 2)],
    },
    # A few thousand parameters: for tests and smoke runs.
    "quick": {
        "arch": "resnet",
        "in_channels": 1,
        "num_classes": 10,
        "input_size": 28,
        "bn": True,
        "stem": 8,
        "blocks": [_block(16, 16, 2), _block(8, 16, 1), _block(16, 16, 2)],
    },
}
"""Named architecture specs (see :func:`preset_spec`)."""


def preset_spec(name: str) -> dict[str, Any]:
    """Return a deep copy of a named preset spec.

    Args:
        name: one of ``PRESETS`` (``mnist-2m``, ``fashion-500k``, ``quick``).

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1."""
    return (size + 2 - 3) // stride + 1


def validate_spec(spec: dict[str, Any]) -> None:
    """Check that a spec describes a buildable network.

    Raises:
        ValueError: naming the first malformed or inconsistent entry and how to fix it.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"an architecture spec is a JSON object, got a {type(spec).__name__}")
    required = ("in_channels", "num_classes", "input_size", "stem", "blocks")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"architecture spec lacks {missing}; it needs the keys {list(required)}")
    if spec.get("arch", "resnet") != "resnet":
        raise ValueError(f"unknown arch {spec.get('arch')!r}; only 'resnet' is known")
    if not isinstance(spec.get("bn", True), bool):
        raise ValueError(f"spec['bn'] must be true or false, got {spec['bn']!r}")
    for key in ("in_channels", "num_classes", "input_size", "stem"):
        _check_positive(spec[key], f"spec[{key!r}]")
    if not isinstance(spec["blocks"], list):
        kind = type(spec["blocks"]).__name__
        raise ValueError(f"spec['blocks'] must be a list of block objects, got a {kind}")
    width = spec["stem"]
    for i, blk in enumerate(spec["blocks"]):
        where = f"spec['blocks'][{i}]"
        if not isinstance(blk, dict):
            raise ValueError(f"{where} must be an object with mid, out, stride, projection")
        for key in ("mid", "out"):
            _check_positive(blk.get(key), f"{where}[{key!r}]")
        stride = blk.get("stride", 1)
        if stride not in (1, 2) or isinstance(stride, bool):
            raise ValueError(f"{where}['stride'] must be 1 or 2, got {stride!r}")
        projection = blk.get("projection", stride != 1)
        if not isinstance(projection, bool):
            raise ValueError(f"{where}['projection'] must be true or false, got {projection!r}")
        if not projection and (stride != 1 or blk["out"] != width):
            raise ValueError(
                f"{where} has an identity shortcut, so it needs stride 1 and out == its input "
                f"width ({width}); got stride {stride}, out {blk['out']}. Set 'projection': "
                "true or fix the widths."
            )
        width = blk["out"]


def _check_positive(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive int, got {value!r}")


class ResBlock(nn.Module):
    """Two 3x3 convolutions with LeakyReLU and a residual shortcut.

    ``y = act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))`` where the shortcut is the identity
    or a 1x1 convolution (with BatchNorm when ``bn``) carrying the stride.

    Args:
        cin: input channels.
        mid: channels between the two convolutions.
        cout: output channels.
        stride: 1 or 2 (on the first convolution and the projection).
        projection: use a 1x1 projection shortcut (required when stride != 1 or cin != cout).
        bn: add BatchNorm2d after every convolution.
    """

    def __init__(
        self,
        cin: int,
        mid: int,
        cout: int,
        stride: int = 1,
        projection: bool = False,
        bn: bool = True,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(mid) if bn else nn.Identity()
        self.act1 = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.conv2 = nn.Conv2d(mid, cout, 3, stride=1, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        if projection:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=not bn)
            self.shortcut_bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        else:
            self.shortcut = None
            self.shortcut_bn = None
        self.act2 = nn.LeakyReLU(NEGATIVE_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut_bn(self.shortcut(x))
        else:
            out = out + x
        return self.act2(out)


class ResNet(nn.Module):
    """The light ResNet of a spec (build it with :func:`build_model`).

    Input ``x (Tensor[N, in_channels, input_size, input_size])``, output
    ``logits (Tensor[N, num_classes])``.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        validate_spec(spec)
        bn = bool(spec.get("bn", True))
        self.input_size = int(spec["input_size"])
        self.stem = nn.Conv2d(spec["in_channels"], spec["stem"], 3, padding=1, bias=not bn)
        self.stem_bn = nn.BatchNorm2d(spec["stem"]) if bn else nn.Identity()
        self.stem_act = nn.LeakyReLU(NEGATIVE_SLOPE)
        blocks = []
        width, size = spec["stem"], self.input_size
        for blk in spec["blocks"]:
            stride = blk.get("stride", 1)
            projection = blk.get("projection", stride != 1)
            blocks.append(
                ResBlock(width, blk["mid"], blk["out"], stride, projection=projection, bn=bn)
            )
            width, size = blk["out"], _conv_out(size, stride)
        self.blocks = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(width * size * size, spec["num_classes"])
        self.feature_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(self.flatten(x))


def build_model(spec: dict[str, Any]) -> ResNet:
    """Build the network a spec describes (freshly initialised, on the CPU).

    Args:
        spec: an architecture spec (see the module docstring), e.g. ``preset_spec("quick")`` or
            ``spec_of(model)``.

    Returns:
        a :class:`ResNet`.
    """
    return ResNet(copy.deepcopy(spec))


def _has_bn(model: ResNet) -> bool:
    return isinstance(model.stem_bn, nn.BatchNorm2d)


def spec_of(model: ResNet) -> dict[str, Any]:
    """Read a model's current architecture spec back from its modules' weight shapes.

    The widths come from the weight tensors themselves, so a model resized in place (whose
    modules may still carry stale ``out_channels`` attributes) is described as it is now.

    Args:
        model: a :class:`ResNet` (possibly resized).

    Returns:
        a JSON-able spec such that ``build_model(spec)`` has the same parameter shapes.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"spec_of expects an svdgrow.app.models.ResNet, got {type(model).__name__}")
    stem_w = model.stem.weight
    blocks = []
    for blk in model.blocks:
        blocks.append(
            {
                "mid": int(blk.conv1.weight.shape[0]),
                "out": int(blk.conv2.weight.shape[0]),
                "stride": int(blk.conv1.stride[0]),
                "projection": blk.shortcut is not None,
            }
        )
    spec = {
        "arch": "resnet",
        "in_channels": int(stem_w.shape[1]),
        "num_classes": int(model.head.weight.shape[0]),
        "input_size": int(model.input_size),
        "bn": _has_bn(model),
        "stem": int(stem_w.shape[0]),
        "blocks": blocks,
    }
    return spec


def layer_widths(spec: dict[str, Any]) -> dict[str, int]:
    """Output width of every convolution/linear layer of a spec, keyed by module name."""
    widths = {"stem": spec["stem"]}
    for i, blk in enumerate(spec["blocks"]):
        widths[f"blocks.{i}.conv1"] = blk["mid"]
        widths[f"blocks.{i}.conv2"] = blk["out"]
        if blk.get("projection", blk.get("stride", 1) != 1):
            widths[f"blocks.{i}.shortcut"] = blk["out"]
    widths["head"] = spec["num_classes"]
    return widths


def count_params(model_or_spec: nn.Module | dict[str, Any]) -> int:
    """Number of parameters of a model, or of the model a spec describes."""
    if isinstance(model_or_spec, dict):
        with torch.device("meta"):
            model_or_spec = build_model(model_or_spec)
    return sum(p.numel() for p in model_or_spec.parameters())


def scale_spec(spec: dict[str, Any], factor: float) -> dict[str, Any]:
    """``spec`` with every width times ``factor`` (rounded, at least 1); a block with an identity
    shortcut keeps its output width equal to its input width."""
    s = copy.deepcopy(spec)
    s["stem"] = max(1, round(spec["stem"] * factor))
    for blk, b0 in zip(s["blocks"], spec["blocks"], strict=True):
        blk["mid"] = max(1, round(b0["mid"] * factor))
        blk["out"] = max(1, round(b0["out"] * factor))
    width = s["stem"]
    for blk in s["blocks"]:
        if not blk.get("projection", blk.get("stride", 1) != 1):
            blk["out"] = width
        width = blk["out"]
    return s


def narrow_spec(spec: dict[str, Any], target_params: int) -> tuple[dict[str, Any], float]:
    """Uniform narrowing: ``spec`` with every width scaled by one factor (at most 1), the
    parameter count nearest ``target_params``; returns ``(spec, factor)``."""
    if count_params(spec) <= target_params:
        return copy.deepcopy(spec), 1.0
    lo, hi = 1e-3, 1.0
    for _ in range(40):  # the count grows monotonically with the factor: bisect
        mid = math.sqrt(lo * hi)
        if count_params(scale_spec(spec, mid)) < target_params:
            lo = mid
        else:
            hi = mid
    cands = [(scale_spec(spec, lo), lo), (scale_spec(spec, hi), hi)]
    return min(cands, key=lambda c: abs(count_params(c[0]) - target_params))


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> int:
    """Forward FLOPs for ONE sample, counted by ``torch.utils.flop_counter``.

    Args:
        model: the network (its device is used for the probe input).
        input_shape: ``(C, H, W)`` of one sample; defaults to the model's own.
    """
    if input_shape is None:
        input_shape = (model.stem.weight.shape[1], model.input_size, model.input_size)
    param = next(model.parameters())
    x = torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def describe(model_or_spec: nn.Module | dict[str, Any]) -> str:
    """A readable table of every layer's shape and parameter count, with the total."""
    model = build_model(model_or_spec) if isinstance(model_or_spec, dict) else model_or_spec
    lines = [f"{'layer':<24} {'shape':<22} {'params':>10}"]
    total = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        n = sum(p.numel() for p in own)
        total += n
        shape = "x".join(str(s) for s in own[0].shape)
        lines.append(f"{name:<24} {shape:<22} {n:>10,}")
    lines.append(f"{'total':<24} {'':<22} {total:>10,}")
    return "\n".join(lines)


def _main() -> None:  # pragma: no cover - a helper to print preset sizes
    for name in PRESETS:
        spec = preset_spec(name)
        print(f"== {name}: {count_params(spec):,} parameters")
        print(describe(spec))
        print(json.dumps(spec))


if __name__ == "__main__":  # pragma: no cover
    _main()
