"""Coverage (issue 11): the layer kinds and torchvision models svdgrow follows, and what it does
with them. Per model: the groups found resizable, growth that keeps the output (1e-5),
the optimizer stepping after each resize, and all-or-nothing when the commit fails midway. The
torchvision models are width-reduced so the whole file runs in about a minute on a loaded
2-core CPU; benchmarks/coverage.py counts the full-size ones."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from svdgrow import Resizer, resizer, surgery
from svdgrow.spectrum import input_dim
from svdgrow.trace import CouplingWarning, trace

tvm = pytest.importorskip("torchvision.models")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.efficientnet import EfficientNet, MBConvConfig  # noqa: E402
from torchvision.models.regnet import BlockParams, RegNet  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet, conv1x1  # noqa: E402
from torchvision.ops import SqueezeExcitation  # noqa: E402


def _efficientnet_b0(width_mult: float, depth_mult: float) -> nn.Module:
    """torchvision's efficientnet_b0 at a width and depth multiplier."""
    table = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2)]
    table += [(6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4)]
    table += [(6, 3, 1, 192, 320, 1)]
    setting = [MBConvConfig(*row, width_mult, depth_mult) for row in table]
    return EfficientNet(setting, dropout=0.2, num_classes=10)


def _resnext() -> nn.Module:
    """resnext50's grouped bottleneck blocks (torchvision's Bottleneck, groups=4), two per
    stage, on narrow stages (torchvision's ResNet fixes its stage widths at 256 to 2048)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)]
    layers.append(nn.ReLU())
    inplanes = 16
    for planes, stride in ((8, 1), (16, 2), (32, 2)):
        down = nn.Sequential(conv1x1(inplanes, planes * 4, stride), nn.BatchNorm2d(planes * 4))
        layers.append(Bottleneck(inplanes, planes, stride, down, groups=4, base_width=16))
        inplanes = planes * 4
        layers.append(Bottleneck(inplanes, planes, groups=4, base_width=16))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 10)]
    return nn.Sequential(*layers)


# name -> (builder, (resizable groups, groups), what may freeze a group besides the model's
# input and output). Width-reduced (and depth-reduced where the CPU needs it) torchvision
# architectures; inputs are 16x16 (32x32 for DenseNet, whose last transition pools 2x2).
MODELS = {
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(width_mult=0.25, num_classes=10), (24, 26), ()),
    "mobilenet_v3_small": (
        lambda: tvm.mobilenet_v3_small(width_mult=0.25, num_classes=10),
        (26, 28),
        (),
    ),
    "efficientnet_b0": (lambda: _efficientnet_b0(0.25, 0.5), (27, 29), ()),
    "densenet121": (  # densenet121's four dense blocks and transitions, shallower and narrow
        lambda: tvm.DenseNet(4, (2, 3, 4, 3), num_init_features=8, bn_size=2, num_classes=10),
        (28, 30),
        (),
    ),
    "resnext50": (_resnext, (4, 18), ("grouped convolution",)),
    "resnet_grouped": (  # torchvision's ResNet class itself (trace only: its stages are wide)
        lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10),
        (5, 15),
        ("grouped convolution",),
    ),
    "convnext_tiny": (  # convnext_tiny's stages, narrow and shallow
        lambda: ConvNeXt(
            [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 2)],
            num_classes=10,
        ),
        (4, 9),
        ("layer norm over the channel dim",),
    ),
    "regnet_y": (  # a RegNetY: grouped convolutions and squeeze-and-excitation
        lambda: RegNet(
            BlockParams.from_init_params(
                depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25
            ),
            num_classes=10,
        ),
        (7, 17),
        ("grouped convolution",),
    ),
}


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model with randomised BatchNorm statistics, and a batch of 8."""
    make, _, _ = MODELS[name]
    torch.manual_seed(seed)
    m = make()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
    side = 32 if name.startswith("densenet") else 16
    return m.eval(), torch.randn(8, 3, side, side, generator=g)


def _train_step(m: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """One optimizer step on a cross-entropy loss, on 4 samples of ``x`` (the graph is freed
    on return: a graph from before a resize must not be alive at the next backward)."""
    m.train()
    opt.zero_grad()
    y = m(x[:4])
    labels = torch.arange(len(y)) % y.shape[1]
    nn.functional.cross_entropy(y.reshape(len(y), -1), labels).backward()
    opt.step()
    m.eval()


def _caps(rs: Resizer) -> dict[str, int]:
    """Each resizable group's cap (the most channels it may grow to), without an SVD."""
    mods = dict(rs.model.named_modules())
    return {g.name: min(input_dim(mods[p]) for p in g.producers) for g in rs.resizable()}


def _change(y1: torch.Tensor, y0: torch.Tensor) -> float:
    return float((y1 - y0).norm() / y0.norm())


def _quiet_resizer(m, x, opt=None, **kw) -> Resizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CouplingWarning)
        return Resizer(m, x[:2], optimizer=opt, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_groups_found_resizable(name):
    m, x = _build(name)
    g = _quiet_resizer(m, x).graph
    _, (resizable, total), may_freeze = MODELS[name]
    assert (len(g.resizable()), len(g.groups)) == (resizable, total)
    for grp in g.groups:  # nothing else freezes a group than these, the input and the output
        ok = ("model input", "model output", *may_freeze)
        assert grp.frozen is None or any(k in grp.frozen for k in ok), grp.frozen
    assert len(_quiet_resizer(m, x, graph=g).resizable()) == resizable  # surgery accepts them


RESIZED = [name for name in MODELS if name != "resnet_grouped"]


@pytest.mark.parametrize("name", RESIZED)
def test_grow_is_exact_prune_folds_and_the_optimizer_steps(name):
    m, x = _build(name)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    _train_step(m, x, opt)
    rs = _quiet_resizer(m, x, opt)
    w, caps = rs.widths(), _caps(rs)
    grow = {g.name: min(w[g.name] + 2, caps[g.name]) for g in rs.resizable()}
    grow = {k: v for k, v in grow.items() if v > w[k]}  # a group at its cap cannot grow
    assert grow or name == "convnext_tiny"  # its hidden widths are 4x their Linear's inputs
    with torch.no_grad():
        y0 = m(x)
    rs.apply(grow)
    with torch.no_grad():
        y1 = m(x)
    assert _change(y1, y0) < 1e-5
    assert rs.widths() == {**w, **grow}
    _train_step(m, x, opt)
    w = rs.widths()
    cut = {g.name: max(1, w[g.name] * 3 // 4) for g in rs.resizable()}
    held = torch.randn_like(x)
    with torch.no_grad():
        y0 = m(held)
    rep = rs.apply(cut, data=x)
    with torch.no_grad():
        y1 = m(held)
    assert rs.widths() == {**w, **cut} and rep.params_after < rep.params_before
    assert torch.isfinite(y1).all() and _change(y1, y0) < 1.0
    _train_step(m, x, opt)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert rs.cost("params")(None) == sum(p.numel() for p in m.parameters())


def _snapshot(model, opt):
    attrs = ("in_channels", "out_channels", "groups", "in_features", "out_features")
    attrs += ("num_features", "num_channels", "num_groups")
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy({id(p): s for p, s in opt.state.items()}),
        [
            (n, a, getattr(mod, a))
            for n, mod in model.named_modules()
            for a in attrs
            if hasattr(mod, a)
        ],
    )


def _assert_same(a, b) -> None:
    sd_a, st_a, attrs_a = a
    sd_b, st_b, attrs_b = b
    assert attrs_a == attrs_b and sd_a.keys() == sd_b.keys() and st_a.keys() == st_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for p in st_a:
        for k, v in st_a[p].items():
            assert torch.equal(v, st_b[p][k]) if torch.is_tensor(v) else v == st_b[p][k]


@pytest.mark.parametrize("name", RESIZED)
def test_a_failure_midway_changes_nothing(name, monkeypatch):
    """The commit fails halfway through its parameter assignments: model and optimizer state
    are bit-identical to before, and the same resize goes through afterwards."""
    m, x = _build(name)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    _train_step(m, x, opt)
    rs = _quiet_resizer(m, x, opt, mode="magnitude")
    w, caps = rs.widths(), _caps(rs)
    change = {  # every other group grows by one where it can, the rest lose one
        g.name: w[g.name] + 1 if i % 2 and w[g.name] < caps[g.name] else w[g.name] - 1
        for i, g in enumerate(rs.resizable())
    }
    change = {k: v for k, v in change.items() if v >= 1}
    before = _snapshot(m, opt)
    calls = {"n": 0, "fail_at": 0}
    real_commit, real_data = resizer.commit_plan, surgery.Journal.param_data

    def commit_plan(plan):
        calls["fail_at"] = sum(mv.kind == "param" for mv in plan.moves) // 2
        real_commit(plan)

    def param_data(self, p, v):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("injected failure")
        real_data(self, p, v)

    monkeypatch.setattr(resizer, "commit_plan", commit_plan)
    monkeypatch.setattr(surgery.Journal, "param_data", param_data)
    with pytest.raises(RuntimeError, match="injected"):
        rs.apply(change)
    assert calls["fail_at"] > 2
    _assert_same(before, _snapshot(m, opt))
    monkeypatch.undo()
    rs.apply(change)
    _train_step(m, x, opt)
    assert rs.widths() == {**w, **change}


# ---- the layer kinds, one small model each ---------------------------------------------------


class LayerScale(nn.Module):
    """conv -> BN -> ReLU -> x * gamma + beta (per-channel parameters) -> conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 4, 1),
        )
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))) * self.gamma + self.beta)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = (
            nn.Conv1d(4, 8, 3, padding=1),
            nn.BatchNorm1d(8),
            nn.Conv1d(8, 6, 3),
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.bn(self.c1(x)))).mean(2))


class PerChannelNorms(nn.Module):
    """GroupNorm with one channel per group, and an InstanceNorm with parameters."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(8, 8)
        self.c2, self.inorm = nn.Conv2d(8, 6, 1), nn.InstanceNorm2d(6, affine=True)
        self.c3 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.inorm(self.c2(torch.relu(self.gn(self.c1(x)))))))


def _grow_then_prune(m, x, gname, grow, cut, opt_cls=torch.optim.Adam):
    """Grow group ``gname`` (output kept to 1e-5; not when ``grow`` is None), step, prune it
    (data mode), step."""
    m = m.eval()
    opt = opt_cls(m.parameters(), lr=1e-3)
    _train_step(m, x, opt)
    rs = Resizer(m, x[:2], optimizer=opt)
    assert gname in [g.name for g in rs.resizable()]
    if grow is not None:
        with torch.no_grad():
            y0 = m(x)
        rs.apply({gname: grow})
        with torch.no_grad():
            assert _change(m(x), y0) < 1e-5
        _train_step(m, x, opt)
    rs.apply({gname: cut}, data=x)
    _train_step(m, x, opt)
    assert rs.widths()[gname] == cut
    return rs


def test_per_channel_parameters_follow_their_group():
    torch.manual_seed(0)
    m = LayerScale()
    rs = _grow_then_prune(m, torch.randn(8, 3, 6, 6), "c1", 11, 5)
    assert rs.graph.channelwise["gamma"].dim == 0 and rs.graph.channelwise["beta"].dim == 1
    assert m.gamma.shape == (5, 1, 1) and m.beta.shape == (1, 5, 1, 1)
    assert rs.cost("params")(None) == sum(p.numel() for p in m.parameters())


def test_conv1d_is_a_producer_and_consumer():
    torch.manual_seed(0)
    m = Conv1dNet()
    _grow_then_prune(m, torch.randn(8, 4, 10), "c1", 10, 5)
    assert m.c1.out_channels == m.bn.num_features == m.c2.in_channels == 5


def test_per_channel_groupnorm_and_instancenorm_follow():
    torch.manual_seed(0)
    m = PerChannelNorms()
    _grow_then_prune(m, torch.randn(8, 3, 6, 6), "c2", 8, 3)
    assert m.inorm.num_features == 3 and m.inorm.weight.shape == (3,)
    _grow_then_prune(m, torch.randn(8, 3, 6, 6), "c1", 10, 4)
    assert m.gn.num_groups == m.gn.num_channels == 4 and m.gn.weight.shape == (4,)


def test_a_squeeze_excitation_gate_on_a_one_by_one_map():
    """At a 1x1 map the gate has the value's shape; it is told apart by being computed from
    the value."""
    se = SqueezeExcitation(8, 4)
    m = nn.Sequential(nn.Conv2d(12, 8, 1), nn.ReLU(), se, nn.Conv2d(8, 2, 1))
    g = trace(m, torch.randn(2, 12, 1, 1), strict=True)
    grp = g.group_of("0")
    assert grp.producers == ["0"] and grp.channelwise == ["2.fc2"] and grp.frozen is None
    _grow_then_prune(m, torch.randn(8, 12, 1, 1), "0", 10, 5)


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.GroupNorm(2, 8), r"GroupNorm '1' \(2 groups of 4 channels\).*GroupNorm\(num_groups="),
        (nn.LayerNorm([8, 6, 6]), "layer norm over the channel dim.*Use BatchNorm"),
        (nn.ConvTranspose2d(8, 8, 1), "ConvTranspose2d '1'.*nn.Upsample followed by a Conv2d"),
    ],
)
def test_what_is_frozen_says_what_to_do(layer, match):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer, nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.warns(CouplingWarning, match=match):
        g = trace(m, torch.randn(2, 3, 6, 6))
    assert g.group_of("0").frozen is not None
    with pytest.raises(ValueError, match=match):
        trace(m, torch.randn(2, 3, 6, 6), strict=True)


def test_layer_norm_over_another_dim_passes_through():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(6), nn.Conv2d(8, 2, 1))
    g = trace(m, torch.randn(2, 3, 6, 6), strict=True)
    assert g.group_of("0").frozen is None


def test_channels_last_inverted_bottleneck():
    """ConvNeXt's block: depthwise conv, permute, LayerNorm, Linear, GELU, Linear, permute,
    layer scale. The hidden width between the Linears is resizable; the LayerNorm freezes the
    residual width, saying so."""
    m = ConvNeXt([CNBlockConfig(8, None, 2)], num_classes=3)
    with pytest.warns(CouplingWarning, match="layer norm over the channel dim"):
        g = trace(m, torch.randn(2, 3, 16, 16))
    hidden = g.group_of("features.1.0.block.3")
    assert hidden.frozen is None and hidden.consumers == ["features.1.0.block.5"]
    assert g.channelwise["features.1.0.layer_scale"].segments == [
        g.group_of("features.1.0.block.5").id
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CouplingWarning)
        # past its cap (the 8 inputs of its Linear) it cannot grow: prune only
        _grow_then_prune(m, torch.randn(8, 3, 16, 16), "features.1.0.block.3", None, 12)
