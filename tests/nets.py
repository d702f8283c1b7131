"""The small models the library tests share, with hand-built coupling graphs where a test wants
to fix the graph, and helpers that shape their weights and statistics."""

import copy

import torch
from torch import nn

from svdgrow.app import models
from svdgrow.trace import ConsumerLayout, CouplingGraph, Group


class ConvNet(nn.Module):
    """conv1 -> bn1 -> act -> conv2 -> act -> flatten -> fc."""

    def __init__(
        self, c1=8, c2=12, act=None, bn=True, k=3, pad=1, side=4, cin=3, classes=5, bias2=True
    ):
        super().__init__()
        act = act if act is not None else nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(cin, c1, k, padding=pad)
        self.bn1 = nn.BatchNorm2d(c1) if bn else nn.Identity()
        self.a1 = copy.deepcopy(act)
        self.conv2 = nn.Conv2d(c1, c2, k, padding=pad, bias=bias2)
        self.a2 = copy.deepcopy(act)
        self.flat = nn.Flatten()
        out = side - 2 * (k - 1 - 2 * pad)
        self.fc = nn.Linear(c2 * out * out, classes)
        self.hw = out * out

    def forward(self, x):
        return self.fc(self.flat(self.a2(self.conv2(self.a1(self.bn1(self.conv1(x)))))))


def convnet_graph(m: ConvNet, bn=True) -> CouplingGraph:
    """The coupling graph :func:`svdgrow.trace.trace` finds for a :class:`ConvNet`."""
    cin = m.conv1.in_channels
    return CouplingGraph(
        groups=[
            Group(0, "input", [], [], {}, ["conv1"], frozen="model input", width=cin),
            Group(
                1,
                "conv1",
                ["conv1"],
                ["bn1"] if bn else [],
                {"bn1": "conv1"} if bn else {},
                ["conv2"],
            ),
            Group(2, "conv2", ["conv2"], [], {}, ["fc"]),
            Group(3, "fc", ["fc"], [], {}, [], frozen="model output"),
        ],
        consumers={
            "conv1": ConsumerLayout("conv1", [0], 1),
            "conv2": ConsumerLayout("conv2", [1], 1),
            "fc": ConsumerLayout("fc", [2], m.hw),
        },
    )


class ResLinear(nn.Module):
    """h = s(x) [+bn] ; h = h + b(act(a(h))) ; out = o(act(h)): a residual group {s, b}."""

    def __init__(self, d=10, w=8, mid=6, act=None, bn=False):
        super().__init__()
        act = act if act is not None else nn.Identity()
        self.s = nn.Linear(d, w)
        self.bs = nn.BatchNorm1d(w) if bn else nn.Identity()
        self.a = nn.Linear(w, mid)
        self.act = copy.deepcopy(act)
        self.b = nn.Linear(mid, w)
        self.bb = nn.BatchNorm1d(w) if bn else nn.Identity()
        self.act2 = copy.deepcopy(act)
        self.o = nn.Linear(w, 4)

    def forward(self, x):
        h = self.bs(self.s(x))
        h = h + self.bb(self.b(self.act(self.a(h))))
        return self.o(self.act2(h))


def reslinear_graph(m: ResLinear, bn=False) -> CouplingGraph:
    """The coupling graph :func:`svdgrow.trace.trace` finds for a :class:`ResLinear`."""
    norms = ["bs", "bb"] if bn else []
    return CouplingGraph(
        groups=[
            Group(0, "input", [], [], {}, ["s"], frozen="model input", width=m.s.in_features),
            Group(1, "s", ["s", "b"], norms, {"bs": "s", "bb": "b"} if bn else {}, ["a", "o"]),
            Group(2, "a", ["a"], [], {}, ["b"]),
            Group(3, "o", ["o"], [], {}, [], frozen="model output"),
        ],
        consumers={
            "s": ConsumerLayout("s", [0], 1),
            "a": ConsumerLayout("a", [1], 1),
            "b": ConsumerLayout("b", [2], 1),
            "o": ConsumerLayout("o", [1], 1),
        },
    )


class CatNet(nn.Module):
    """Two convolutions concatenated along channels, read by a third: ``c`` has two segments."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.c = nn.Conv2d(11, 7, 3, padding=1)
        self.fc = nn.Linear(7 * 16, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.bn(self.b(x)))], 1)
        return self.fc(torch.relu(self.c(h)).flatten(1))


def quick(seed=0, bn=True) -> nn.Module:
    """The ``quick`` preset ResNet of the application (28x28 input, 10 classes)."""
    torch.manual_seed(seed)
    spec = models.preset_spec("quick")
    spec["bn"] = bn
    return models.build_model(spec)


def randomise_bn(model: nn.Module, gen, bias_std=0.3, mean_std=0.5) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Args:
        model: the network.
        gen: a ``torch.Generator``, or an int seed for a new one.
        bias_std: standard deviation of the biases.
        mean_std: standard deviation of the running means.
    """
    if isinstance(gen, int):
        gen = torch.Generator().manual_seed(gen)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, bias_std, generator=gen)
                m.running_mean.normal_(0, mean_std, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


def low_rank_(weight2d: torch.Tensor, r: int, gen, noise=0.0) -> None:
    """Make the rows of a producer matrix (a view) span only ``r`` directions (+ noise)."""
    n, D = weight2d.shape
    with torch.no_grad():
        new = torch.randn(n, r, generator=gen) @ torch.randn(r, D, generator=gen) / D**0.5
        new += noise * torch.randn(n, D, generator=gen) / D**0.5
        weight2d.copy_(new)


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute change relative to the largest entry of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


class TinyDense(nn.Module):
    """A DenseNet in miniature: two bottleneck layers whose outputs are concatenated and read
    by BatchNorms (``l2_norm1`` reads [x0, n1], ``norm5`` reads [x0, n1, n2]). Between each
    bottleneck's norm and its second conv there is no activation, so its fold can be exact."""

    def __init__(self, k2=1, pad2=0):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.l1_norm1 = nn.BatchNorm2d(8)
        self.l1_conv1 = nn.Conv2d(8, 12, 1, bias=False)
        self.l1_norm2 = nn.BatchNorm2d(12)
        self.l1_conv2 = nn.Conv2d(12, 4, k2, padding=pad2, bias=False)
        self.l2_norm1 = nn.BatchNorm2d(12)
        self.l2_conv1 = nn.Conv2d(12, 12, 1, bias=False)
        self.l2_norm2 = nn.BatchNorm2d(12)
        self.l2_conv2 = nn.Conv2d(12, 4, k2, padding=pad2, bias=False)
        self.norm5 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x0 = torch.relu(self.norm0(self.conv0(x)))
        n1 = self.l1_conv2(self.l1_norm2(self.l1_conv1(torch.relu(self.l1_norm1(x0)))))
        h = torch.relu(self.l2_norm1(torch.cat([x0, n1], 1)))
        n2 = self.l2_conv2(self.l2_norm2(self.l2_conv1(h)))
        out = torch.relu(self.norm5(torch.cat([x0, n1, n2], 1)))
        return self.fc(out.mean((2, 3)))
