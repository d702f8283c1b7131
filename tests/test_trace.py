"""Tests for svdgrow.trace: coupling groups found by torch.fx on small models (CPU, fast)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from svdgrow.trace import (
    CouplingGraph,
    CouplingWarning,
    Group,
    dispatch,
    layers,
    optable,
    rules,
    trace,
)
from svdgrow.trace.builder import GroupBuilder
from svdgrow.trace.groups import Layout


def _trace_quiet(model: nn.Module, x: torch.Tensor, **kw) -> CouplingGraph:
    """Trace and assert no CouplingWarning was issued."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CouplingWarning)
        g = trace(model, x, **kw)
    assert g.warnings == []
    return g


def _trace_warns(model: nn.Module, x: torch.Tensor, match: str, **kw) -> tuple[CouplingGraph, str]:
    """Trace, assert some CouplingWarning matches ``match``; return the graph and all messages."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        g = trace(model, x, **kw)
    msgs = [str(w.message) for w in rec if issubclass(w.category, CouplingWarning)]
    text = "\n".join(msgs)
    assert re.search(match, text), f"no warning matches {match!r}: {msgs}"
    assert len(msgs) == len(g.warnings) and all(
        m.endswith(w) for m, w in zip(msgs, g.warnings, strict=True)
    )
    return g, text


def _same(g: CouplingGraph, *names: str) -> bool:
    return len({g.group_of(n).id for n in names}) == 1


def _check_invariants(graph: CouplingGraph, model: nn.Module) -> None:
    """Structural invariants every traced graph must satisfy."""
    names = [grp.name for grp in graph.groups]
    assert len(set(names)) == len(names), f"duplicate group names {names}"
    for i, grp in enumerate(graph.groups):
        assert grp.id == i
        assert len(set(grp.producers)) == len(grp.producers)
        assert set(grp.norm_after) == set(grp.norms)
        for c in grp.consumers:
            assert i in graph.consumers[c].segments
    for name, lay in graph.consumers.items():
        assert lay.module == name
        for s in lay.segments:
            assert name in graph.groups[s].consumers
    producers = [p for grp in graph.groups for p in grp.producers]
    assert len(producers) == len(set(producers)), "a module produces into two groups"
    widths = graph.widths(model)  # raises when producers/norms/consumers disagree
    assert len(widths) == len(graph.groups)
    for grp in graph.resizable():
        assert grp.producers, f"resizable group {grp.name} has no producer"
        assert widths[grp.id] == grp.width


# --------------------------------------------------------------------------------------
# models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(torch.relu(self.fc1(x)))))


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.proj is None else self.proj(x)
        out += shortcut
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, project: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = Block(8, 8)
        self.b2 = Block(8, 8)
        self.b3 = Block(8, 16, stride=2) if project else Block(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16 if project else 8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Tiled(nn.Module):
    """The prototype's shortcut: the input channels tiled to the output width."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        if self.how == "repeat":
            short = x.repeat(1, 2, 1, 1)
        else:
            short = torch.cat([x, x], 1)
        return self.head(F.relu(self.conv(x) + short))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 5, padding=2)
        self.c = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear((10 + 5) * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        z = torch.cat((y, self.c(y)), 1)
        z = F.max_pool2d(z, 2)
        return self.fc(z.view(z.size(0), -1))


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        gate = y.mean(1, keepdim=True)  # across channels: not followed
        return self.conv3(gate) + self.conv2(y).sum(dim=(2, 3), keepdim=True)[:, :4]


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.pw(F.relu(self.dw(self.conv1(x))))))


def _resnet18_1ch() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


X28 = torch.randn(2, 1, 28, 28)
X16 = torch.randn(2, 1, 16, 16)
X8 = torch.randn(2, 1, 8, 8)


# --------------------------------------------------------------------------------------
# tests


def test_mlp():
    m = MLP()
    g = _trace_quiet(m, torch.randn(3, 20))
    assert [grp.name for grp in g.groups] == ["input", "fc1", "fc2", "fc3"]
    assert g.groups[0].frozen == "model input" and g.groups[0].producers == []
    assert g.groups[0].consumers == ["fc1"] and g.groups[0].width == 20
    assert "model output" in g.groups[3].frozen
    assert [grp.name for grp in g.resizable()] == ["fc1", "fc2"]
    assert g.consumers["fc2"].segments == [g.group_of("fc1").id]
    assert all(c.block == 1 for c in g.consumers.values())
    assert g.group_of("fc1").consumers == ["fc2"]
    assert g.widths(m) == [20, 32, 16, 5]
    _check_invariants(g, m)


def test_plain_cnn_flatten_block_and_norms():
    m = PlainCNN()
    g = _trace_quiet(m, X28)
    g1, g2 = g.group_of("features.0"), g.group_of("features.4")
    assert g1.norms == ["features.1"] and g1.norm_after == {"features.1": "features.0"}
    assert g2.norms == ["features.5"] and g2.norm_after == {"features.5": "features.4"}
    assert g.group_of("features.5") is g2
    assert g.consumers["features.4"].segments == [g1.id]
    assert g.consumers["fc"].segments == [g2.id]
    assert g.consumers["fc"].block == 7 * 7
    assert g.consumers["features.0"].block == 1
    assert {grp.id for grp in g.resizable()} == {g1.id, g2.id}
    _check_invariants(g, m)
    text = g.describe(m)
    assert "features.0" in text and "49" in text


def test_small_resnet_identity_shortcuts_merge_groups():
    m = SmallResNet()
    g = _trace_quiet(m, X16)
    trunk = g.group_of("stem")
    assert trunk.producers == ["stem", "b1.conv2", "b2.conv2", "b3.conv2"]
    assert trunk.norms == ["bn", "b1.bn2", "b2.bn2", "b3.bn2"]
    assert trunk.norm_after == {
        "bn": "stem",
        "b1.bn2": "b1.conv2",
        "b2.bn2": "b2.conv2",
        "b3.bn2": "b3.conv2",
    }
    assert trunk.consumers == ["b1.conv1", "b2.conv1", "b3.conv1", "fc"]
    assert trunk.frozen is None
    # the inner width of each block is its own group
    for b in ("b1", "b2", "b3"):
        inner = g.group_of(f"{b}.conv1")
        assert inner.producers == [f"{b}.conv1"] and inner.consumers == [f"{b}.conv2"]
        assert inner.id != trunk.id
    assert g.consumers["fc"].block == 1
    assert len(g.groups) == 1 + 1 + 3 + 1
    _check_invariants(g, m)


def test_projection_shortcut_is_a_producer_of_the_merged_group():
    m = SmallResNet(project=True)
    g = _trace_quiet(m, X16)
    out = g.group_of("b3.conv2")
    assert out.producers == ["b3.conv2", "b3.proj.0"]
    assert out.norms == ["b3.bn2", "b3.proj.1"]
    assert out.norm_after == {"b3.bn2": "b3.conv2", "b3.proj.1": "b3.proj.0"}
    assert out.consumers == ["fc"]
    trunk = g.group_of("stem")
    assert trunk.producers == ["stem", "b1.conv2", "b2.conv2"]
    assert "b3.proj.0" in trunk.consumers and "b3.conv1" in trunk.consumers
    assert out.id != trunk.id and out.frozen is None and out.width == 16
    _check_invariants(g, m)


@pytest.mark.parametrize("how", ["repeat", "cat"])
def test_channel_tiled_shortcut_is_frozen(how):
    m = Tiled(how)
    g, text = _trace_warns(m, X8, "tiling")
    assert ("repeat" in text) if how == "repeat" else ("cat" in text)
    stem, conv = g.group_of("stem"), g.group_of("conv")
    assert stem.frozen is not None and "tiling" in stem.frozen
    assert conv.frozen is not None
    assert g.group_of("head").frozen == "model output"
    assert g.resizable() == []
    assert g.warnings and any("tiling" in w for w in g.warnings)
    _check_invariants(g, m)
    with pytest.raises(ValueError, match="tiling"):
        trace(m, X8, strict=True)


def test_concat_segments_in_order():
    m = Concat()
    g = _trace_quiet(m, X8)
    a, b, c = g.group_of("a"), g.group_of("b"), g.group_of("c")
    assert g.consumers["c"].segments == [a.id, b.id]
    assert g.consumers["c"].block == 1
    assert g.consumers["fc"].segments == [a.id, b.id, c.id]
    assert g.consumers["fc"].block == 4 * 4
    assert a.consumers == ["c", "fc"] and c.consumers == ["fc"]
    assert {x.id for x in g.resizable()} == {a.id, b.id, c.id}
    _check_invariants(g, m)
    # consumers_of lists every reader of a group
    assert [x.module for x in g.consumers_of(b.id)] == ["c", "fc"]


def test_unknown_op_is_frozen_with_warning_and_strict_raises():
    m = UnknownOp()
    g, text = _trace_warns(m, X8, r"Tensor\.mean \(node 'mean'\) in the top-level forward")
    assert "operator.getitem" in text  # y[:, :4] selects channels
    c1, c2 = g.group_of("conv1"), g.group_of("conv2")
    assert c1.frozen is not None and "mean" in c1.frozen
    assert c2.frozen is not None and "getitem" in c2.frozen
    # conv3 reads the opaque output of mean: a fresh frozen group, not conv1's
    seg = g.consumers["conv3"].segments
    assert len(seg) == 1 and seg[0] != c1.id
    assert g.groups[seg[0]].name.startswith("opaque:") and g.groups[seg[0]].frozen
    _check_invariants(g, m)
    with pytest.raises(ValueError, match=r"Tensor\.mean.*conv1|mean"):
        trace(m, X8, strict=True)


def test_unknown_module_names_the_module():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LocalResponseNorm(2)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.out(self.norm(self.conv(x)))

    g, _ = _trace_warns(Net(), X8, r"unsupported module: module 'norm' \(LocalResponseNorm\)")
    assert g.group_of("conv").frozen is not None
    with pytest.raises(ValueError, match="LocalResponseNorm"):
        trace(Net(), X8, strict=True)


def test_depthwise_conv_follows_its_input_group():
    """A depthwise convolution (multiplier 1) reads channel i into row i: its rows follow its
    input's group like a per-channel op, and it is neither a producer nor a consumer."""
    m = Depthwise()
    g = _trace_quiet(m, X8, strict=True)
    c1 = g.group_of("conv1")
    assert c1.producers == ["conv1"] and c1.channelwise == ["dw"] and c1.consumers == ["pw"]
    assert g.channelwise["dw"].kind == "layer" and g.channelwise["dw"].segments == [c1.id]
    assert "dw" not in g.consumers and g.consumers["pw"].segments == [c1.id]
    assert [x.name for x in g.resizable()] == ["conv1", "pw"]
    _check_invariants(g, m)


@pytest.mark.parametrize(
    "out, groups, match",
    [(16, 8, "depthwise convolution 'dw' with channel multiplier 2"), (8, 2, "grouped conv")],
)
def test_grouped_and_multiplier_depthwise_convs_are_frozen(out, groups, match):
    m = Depthwise()
    m.dw = nn.Conv2d(8, out, 3, padding=1, groups=groups)
    m.pw = nn.Conv2d(out, 16, 1)
    g, _ = _trace_warns(m, X8, match)
    assert match in g.group_of("conv1").frozen and match in g.group_of("dw").frozen
    assert g.group_of("dw").producers == ["dw"] and "dw" not in g.consumers
    assert [x.name for x in g.resizable()] == ["pw"]
    _check_invariants(g, m)
    with pytest.raises(ValueError, match=match):
        trace(m, X8, strict=True)


def test_resnet18_one_channel():
    m = _resnet18_1ch()
    g = _trace_quiet(m, torch.randn(2, 1, 32, 32))
    # input, stem trunk, then per stage: 2 inner groups (+ a merged trunk for stages 2-4), fc
    assert len(g.groups) == 14
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    producers = [p for grp in g.groups for p in grp.producers]
    assert sorted(producers) == sorted(convs + ["fc"])
    for stage in (2, 3, 4):
        assert _same(
            g, f"layer{stage}.0.conv2", f"layer{stage}.0.downsample.0", f"layer{stage}.1.conv2"
        )
        assert not _same(g, f"layer{stage}.0.conv2", f"layer{stage}.0.conv1")
        bn = f"layer{stage}.0.downsample.1"
        assert g.group_of(bn).norm_after[bn] == f"layer{stage}.0.downsample.0"
    assert _same(g, "conv1", "layer1.0.conv2", "layer1.1.conv2", "bn1")
    assert g.group_of("bn1").norm_after["bn1"] == "conv1"
    assert g.consumers["fc"].block == 1
    assert g.consumers["fc"].segments == [g.group_of("layer4.1.conv2").id]
    assert g.groups[0].frozen == "model input" and g.groups[0].consumers == ["conv1"]
    assert g.group_of("fc").frozen == "model output"
    assert len(g.resizable()) == 12
    _check_invariants(g, m)


def test_widths_detect_inconsistent_surgery():
    m = SmallResNet()
    g = trace(m, X16)
    assert g.widths(m)[g.group_of("stem").id] == 8
    m.b1.conv1 = nn.Conv2d(8, 5, 3, padding=1, bias=False)  # producer resized alone
    with pytest.raises(ValueError, match="b1.conv1"):
        g.widths(m)
    m = SmallResNet()
    m.b2.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)  # one member of a merged group
    with pytest.raises(ValueError, match="inconsistent"):
        g.widths(m)


def test_linear_on_4d_is_frozen_and_bn_after_cat_follows_its_segments():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 3, 3, padding=1)
            self.b = nn.Conv2d(1, 5, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.lin = nn.Linear(8, 8)  # on the last (W) dim
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
            z = self.lin(self.c(x))
            return self.out(z), y

    g, msgs = _trace_warns(Net(), X8, "Linear 'lin'")
    assert "BatchNorm" not in msgs and g.group_of("a").frozen == "model output"
    ga, gb = g.group_of("a").id, g.group_of("b").id
    assert g.channelwise["bn"].kind == "norm" and g.channelwise["bn"].segments == [ga, gb]
    assert g.group_of("a").channelwise == ["bn"] == g.group_of("b").channelwise
    assert "Linear 'lin'" in g.group_of("c").frozen
    assert "lin" not in g.consumers
    _check_invariants(g, Net())


def test_passthrough_ops_keep_groups_resizable():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 3, padding=1)
            self.c2 = nn.Conv2d(6, 7, 3, padding=1)
            self.fc1 = nn.Linear(7, 9)
            self.bn = nn.BatchNorm1d(9)
            self.fc2 = nn.Linear(9, 4)
            self.drop = nn.Dropout2d(0.1)

        def forward(self, x):
            y = F.leaky_relu(self.c1(x), 0.1) * 0.5 + 1.0
            y = F.pad(y, (1, 1, 1, 1))[:, :, 1:-1, ::1]
            y = self.drop(F.avg_pool2d(F.gelu(y), 2)).contiguous()
            y = self.c2(y.permute(0, 1, 3, 2)).sigmoid()
            y = y.mean([2, 3])
            y = self.bn(self.fc1(y))
            return F.log_softmax(self.fc2(F.silu(y)), dim=1)

    m = Net()
    g = _trace_quiet(m, X8)
    assert {x.name for x in g.resizable()} == {"c1", "c2", "fc1"}
    assert g.consumers["fc1"].block == 1
    assert g.group_of("fc1").norm_after == {"bn": "fc1"}
    _check_invariants(g, m)


def test_view_flatten_and_unflatten_blocks():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 64, 12)
            self.unflat = nn.Unflatten(1, (3, 8, 8))
            self.c2 = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            f = self.c(x).reshape(x.shape[0], -1)
            return self.fc(f), self.c2(self.unflat(f))

    m = Net()
    g = _trace_quiet(m, X8)
    c = g.group_of("c")
    assert g.consumers["fc"].segments == [c.id] and g.consumers["fc"].block == 64
    assert g.consumers["c2"].segments == [c.id] and g.consumers["c2"].block == 1
    assert c.frozen is None
    _check_invariants(g, m)


def test_unflatten_that_splits_features_is_frozen():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 12)
            self.c2 = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return self.c2(y.view(-1, 3, 2, 2))

    g, _ = _trace_warns(Net(), X8, "mixes channels")
    assert "mixes channels" in g.group_of("fc").frozen
    assert g.consumers["c2"].segments != [g.group_of("fc").id]


def test_channel_mixing_reshape_is_frozen():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 4, 1)
            self.d = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            n, c, h, w = x.shape
            y = self.c(x)
            y = y.view(n, 2, 2, h, w).transpose(1, 2).reshape(n, 4, h, w)
            return self.d(y)

    g, _ = _trace_warns(Shuffle(), X8, r"Tensor\.view")
    assert g.group_of("c").frozen is not None


def test_softmax_at_output_is_silent_and_inside_is_frozen():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 4, 1)
            self.d = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return F.softmax(self.d(torch.softmax(self.c(x), 1)), dim=1)

    g, text = _trace_warns(Net(), X8, "softmax over channels")
    assert "'softmax_1'" not in text  # the one at the output does not warn
    assert "softmax" in g.group_of("c").frozen
    assert g.group_of("d").frozen == "model output"


def test_shared_module_called_twice():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(1, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 5, 1)
            self.out = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.out(self.shared(self.a(x)) * 2 - self.shared(self.b(x)).relu())

    m = Net()
    g = _trace_quiet(m, X8)
    assert _same(g, "a", "b")  # the shared consumer ties its two inputs
    assert g.group_of("shared").producers == ["shared"]
    _check_invariants(g, m)


def test_gate_is_followed_and_a_sliced_per_channel_parameter_is_frozen():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.se = nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.ones(4, 1, 1))
            self.k = nn.Conv2d(1, 3, 1)
            self.out = nn.Conv2d(4, 2, 1)
            self.out2 = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.c(x)
            s = torch.sigmoid(self.se(y.mean((2, 3)))).view(x.size(0), -1, 1, 1)
            return self.out(y * s), self.out2(self.k(x) * self.gamma[:3])

    g, msgs = _trace_warns(Net(), X8, "per-channel constant")
    assert "product" not in msgs and g.group_of("k").frozen
    c = g.group_of("c")  # the gate's rows follow the group; it is not a producer of it
    assert c.frozen is None and c.producers == ["c"] and c.channelwise == ["se"]
    assert c.consumers == ["se", "out"] and g.channelwise["se"].segments == [c.id]
    _check_invariants(g, Net())


def test_untraceable_model_errors_are_actionable():
    class Branchy(nn.Module):
        def __init__(self, cin: int = 1) -> None:
            super().__init__()
            self.c = nn.Conv2d(cin, 3, 1)
            self.d = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.c(x)
            if y.sum() > 0:  # data-dependent control flow
                y = y * 2
            return self.d(y)

    with pytest.raises(TypeError, match="torch.fx could not trace Branchy.*leaf"):
        trace(Branchy(), X8)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 1)
            self.inner = Branchy(3)
            self.head = nn.Conv2d(3, 2, 1)
            self.stem2 = nn.Conv2d(1, 3, 1)

        def forward(self, x):
            y = self.inner(self.stem2(x))
            return self.head(F.relu(self.stem(x))) + y

    # not strict: the failing submodule becomes an opaque leaf and its groups freeze
    g, _ = _trace_warns(Outer(), X8, "could not trace into module 'inner'")
    assert "inner" in g.group_of("stem2").frozen
    assert g.group_of("stem").frozen is None
    assert "model output" in g.group_of("head").frozen
    assert "inner.c" not in g.consumers
    with pytest.raises(TypeError, match="strict=False"):
        trace(Outer(), X8, strict=True)
    # leaf_modules makes it opaque on purpose
    g, _ = _trace_warns(Outer(), X8, "unsupported module: module 'inner'", leaf_modules=[Branchy])
    assert not any("could not trace" in w for w in g.warnings)


def test_trace_does_not_change_training_state_or_stats():
    m = PlainCNN().train()
    m.features[1].eval()
    before = m.features[1].running_mean.clone()
    trace(m, X28)
    assert m.training and not m.features[1].training and m.features[5].training
    torch.testing.assert_close(m.features[1].running_mean, before)
    assert int(m.features[5].num_batches_tracked) == 0


def test_bad_example_input_is_reported():
    with pytest.raises(ValueError, match=r"example input.*\(2, 3, 8, 8\)"):
        trace(PlainCNN(), torch.randn(2, 3, 8, 8))


def test_group_of_unknown_name():
    g = trace(MLP(), torch.randn(2, 20))
    assert isinstance(g.group_of("fc2"), Group)
    with pytest.raises(KeyError, match="nope"):
        g.group_of("nope")


class ProtoBlock(nn.Module):
    """The prototype's ResBlock: shortcut = tile(x, ceil(out/in))[:, :out] (keyword args)."""

    def __init__(self, dim_in: int, dim_inter: int, dim_out: int) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.repeat = -(-dim_out // dim_in)
        self.layers_dict = nn.ModuleDict(
            {
                "conv2d_0": nn.Conv2d(dim_in, dim_inter, 3, padding=1),
                "activation": nn.LeakyReLU(0.2),
                "conv2d_1": nn.Conv2d(dim_inter, dim_out, 3, padding=1),
            }
        )

    def forward(self, x):
        inp = torch.tile(x=x, dims=(1, self.repeat, 1, 1))
        inp = inp[:, : self.dim_out, :, :]
        for _, layer in self.layers_dict.items():
            x = layer(x)
        return inp + x


class ProtoNet(nn.Module):
    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(
            *[ProtoBlock(a, 5, b) for a, b in zip(widths, widths[1:], strict=False)]
        )
        self.head = nn.Linear(widths[-1] * 8 * 8, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return F.log_softmax(self.head(x.view(x.size(0), -1)), dim=1)


def test_prototype_tiled_block_equal_widths_is_an_identity_shortcut():
    m = ProtoNet((4, 4, 4))
    g = _trace_quiet(m, X8)
    trunk = g.group_of("stem")
    assert trunk.producers == [
        "stem",
        "blocks.0.layers_dict.conv2d_1",
        "blocks.1.layers_dict.conv2d_1",
    ]
    assert trunk.frozen is None and g.consumers["head"].block == 64
    _check_invariants(g, m)


@pytest.mark.parametrize("widths", [(4, 8), (4, 6)])
def test_prototype_tiled_block_growing_width_is_frozen(widths):
    m = ProtoNet(widths)
    g, text = _trace_warns(m, X8, r"torch\.tile|getitem")
    assert g.group_of("stem").frozen is not None
    assert g.group_of("blocks.0.layers_dict.conv2d_1").frozen is not None
    assert g.group_of("blocks.0.layers_dict.conv2d_0").frozen is None  # the inner width is free
    _check_invariants(g, m)
    with pytest.raises(ValueError, match=r"strict=True"):
        trace(m, X8, strict=True)


def test_square_batch_cat_and_type_as_pass_through():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(1, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            y = (y * y).type_as(x)
            z = torch.cat([y, self.b(x)], dim=0)  # along the batch: channels must match
            return self.c(z)

    m = Net()
    g = _trace_quiet(m, X8)
    assert _same(g, "a", "b")
    assert g.group_of("a").frozen is None
    _check_invariants(g, m)


def test_describe_lists_every_group():
    m = SmallResNet(project=True)
    g = trace(m, X16)
    text = g.describe(m)
    for grp in g.groups:
        assert grp.name in text
    assert "b3.proj.0" in text and "model output" in text


def test_norm_after_identity_ops_and_after_activation():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.id = nn.Identity()
            self.bn1 = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
            self.bn3 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn1(self.id(self.c1(x)).contiguous())
            z = self.bn2(F.relu(self.c2(y)))
            return self.bn3(z)

    m = Net()
    g = _trace_quiet(m, X8)
    assert g.group_of("c1").norm_after == {"bn1": "c1"}
    assert g.group_of("c2").norm_after == {"bn2": None, "bn3": None}
    assert g.group_of("c2").frozen == "model output"
    _check_invariants(g, m)


def test_unused_opaque_groups_are_dropped():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.d = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.c(x)
            return self.d(y), torch.roll(y, 1, dims=1)  # roll over channels: unsupported

    g, text = _trace_warns(Net(), X8, r"torch\.roll")
    assert [grp.name for grp in g.groups] == ["input", "c", "d"]
    assert "torch.roll" in g.group_of("c").frozen


def _random_spec(data) -> dict:
    from hypothesis import strategies as st

    width = data.draw(st.integers(1, 6), label="stem")
    spec = {
        "arch": "resnet",
        "in_channels": 1,
        "num_classes": 3,
        "input_size": 8,
        "bn": data.draw(st.booleans(), label="bn"),
        "stem": width,
        "blocks": [],
    }
    for _ in range(data.draw(st.integers(0, 4), label="n_blocks")):
        proj = data.draw(st.booleans())
        stride = data.draw(st.sampled_from([1, 2])) if proj else 1
        out = data.draw(st.integers(1, 6)) if proj else width
        spec["blocks"].append(
            {"mid": data.draw(st.integers(1, 6)), "out": out, "stride": stride, "projection": proj}
        )
        width = out
    return spec


def test_random_resnet_specs_property():
    """Light ResNets of the models module: one trunk group per projection, one inner group per
    block, every conv a producer once, the head reading the last trunk as h*w blocks."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from svdgrow.app.models import build_model

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(st.data())
    def check(data):
        spec = _random_spec(data)
        m = build_model(spec)
        g = _trace_quiet(m, torch.randn(2, 1, 8, 8))
        blocks = spec["blocks"]
        n_proj = sum(b["projection"] for b in blocks)
        assert len(g.groups) == 1 + (1 + n_proj) + len(blocks) + 1
        trunk = "stem"
        for i, b in enumerate(blocks):
            if b["projection"]:
                assert not _same(g, trunk, f"blocks.{i}.conv2")
                trunk = f"blocks.{i}.conv2"
                assert _same(g, trunk, f"blocks.{i}.shortcut")
            else:
                assert _same(g, trunk, f"blocks.{i}.conv2")
            inner = g.group_of(f"blocks.{i}.conv1")
            assert inner.producers == [f"blocks.{i}.conv1"] and inner.consumers == [
                f"blocks.{i}.conv2"
            ]
            assert inner.frozen is None
        assert g.consumers["head"].segments == [g.group_of(trunk).id]
        assert g.consumers["head"].block == m.feature_size**2
        convs = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        assert sorted(p for grp in g.groups for p in grp.producers) == sorted(convs)
        if spec["bn"]:
            trunk_g = g.group_of(trunk)
            assert all(trunk_g.norm_after[n] is not None for n in trunk_g.norms)
        _check_invariants(g, m)

    check()


def test_shared_norm_ties_groups():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.bn(self.a(x)), self.bn(self.b(x))], 1))

    m = Net()
    # after the union the concatenation holds the same group twice: frozen as tiling
    g, _ = _trace_warns(m, X8, "more than once in one concatenation")
    assert _same(g, "a", "b", "bn")
    assert g.group_of("a").norms == ["bn"] and g.group_of("a").norm_after == {"bn": None}
    assert g.consumers["c"].segments == [g.group_of("a").id] * 2
    _check_invariants(g, m)


def test_late_union_makes_a_consumer_read_one_group_twice():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(1, 4, 3, padding=1)
            self.c = nn.Conv2d(8, 2, 1)
            self.d = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            ya, yb = self.a(x), self.b(x)
            return self.c(torch.cat([ya, yb], 1)), self.d(ya + yb)  # the add comes after c

    m = Net()
    g, _ = _trace_warns(m, X8, "more than once in the input of consumer 'c'")
    assert _same(g, "a", "b") and g.group_of("a").frozen is not None
    assert g.consumers["c"].segments == [g.group_of("a").id] * 2
    assert g.consumers["d"].segments == [g.group_of("a").id]
    _check_invariants(g, m)
    with pytest.raises(ValueError, match="consumer 'c'"):
        trace(m, X8, strict=True)


def test_strict_accepts_supported_models():
    for m, x in ((SmallResNet(project=True), X16), (Concat(), X8), (PlainCNN(), X28)):
        g = trace(m, x, strict=True)
        assert g.warnings == [] and g.resizable()


# --------------------------------------------------------------------------------------
# the parts of the tracer


def test_dispatch_tables_send_each_op_to_its_row():
    """Every target of an OP_RULES row reaches that row's rule, so no op is in two rows and
    the tables act like an ordered if-chain; shape queries never reach the tables."""
    for funcs, methods, rule in dispatch.OP_RULES:
        assert all(dispatch.FUNCTION_RULES[f] is rule for f in funcs)
        assert all(dispatch.METHOD_RULES[m] is rule for m in methods)
    assert dispatch.FUNCTION_RULES[torch.cat] is rules.cat
    assert dispatch.METHOD_RULES["view"] is dispatch.METHOD_RULES["flatten"]
    assert not optable.SHAPE_FUNCS & dispatch.FUNCTION_RULES.keys()
    assert not optable.SHAPE_METHODS & dispatch.METHOD_RULES.keys()
    first = {
        t: next(r for types, r in dispatch.MODULE_RULES if issubclass(t, types))
        for t in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU)
    }
    assert first == {
        nn.Conv2d: layers.conv,
        nn.Linear: layers.linear,
        nn.BatchNorm2d: layers.batch_norm,
        nn.ReLU: rules.pass_module,
    }


def test_join_layouts_unions_equal_layouts_and_freezes_the_others():
    """The helper residual adds and cat along a non-channel dim share: layouts of one signature
    are unioned segment by segment; different ones are frozen and their output gets a fresh
    frozen group."""
    gm = torch.fx.symbolic_trace(nn.Identity())
    ShapeProp(gm).propagate(torch.randn(2, 6))
    node = next(iter(gm.graph.nodes))  # the input, [2, 6]
    b = GroupBuilder(gm, strict=False, failed={})
    g = [b.groups.new_group(f"g{i}", w) for i, w in enumerate((4, 2, 4, 2, 6))]

    out = rules.join_layouts(b, node, [Layout((g[0], g[1])), Layout((g[2], g[3]))], "a sum", "no")
    assert out == Layout((g[0], g[1]))
    assert [b.groups.find(i) for i in g] == [g[0], g[1], g[0], g[1], g[4]]
    assert b.groups.messages == []

    out = rules.join_layouts(b, node, [Layout((g[0], g[1])), Layout((g[4],))], "a sum", "mixed")
    assert b.groups.messages == ["mixed; frozen group(s): g0, g1, g4"]
    assert all(b.groups.record(i).frozen == ["mixed"] for i in g)
    assert len(out.segs) == 1 and out.segs[0] not in g
    assert b.groups.record(out.segs[0]).frozen == [f"output of {node.name!r} mixes layouts"]
    assert b.groups.width(out.segs[0]) == 6
