"""A Resizer given a ``torch.compile``'d model: after every resize the compiled model computes
what the resized eager model computes (to 1e-5), and training through it goes on.

Compiling is slow on the CPU, so the model is tiny; ``aot_eager`` (dynamo + AOTAutograd, the
parts that cache graphs and guard them, without code generation) runs the training case and
inductor, the default backend, the eval-mode forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svdgrow import Policy, Resizer
from svdgrow.compiled import is_compiled, unwrap_compiled


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.LeakyReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model, opt, x, y, steps: int) -> float:
    loss = None
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()  # the graph goes with `loss` when this returns


def _assert_same_as_eager(compiled, x) -> None:
    eager = unwrap_compiled(compiled)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    compiled.train()


def test_unwrap():
    net = _net()
    compiled = torch.compile(net, backend="eager")
    assert is_compiled(compiled) and not is_compiled(net)
    assert unwrap_compiled(compiled) is net and unwrap_compiled(net) is net
    rs = Resizer(compiled, _data(2)[0])
    assert rs.model is net and "0" in {m for m, _ in net.named_modules()}


# two graphs per shape (train and eval mode): without the reset after every resize the fourth
# shape would hit this limit, and torch would run the model eagerly (here: raise)
@torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)
def test_training_through_a_compiled_model_across_resizes():
    torch._dynamo.reset()
    net = _net()
    model = torch.compile(net, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()
    rs = Resizer(model, x[:2], policy=Policy(energy_eps=0.2), optimizer=opt, mode="data")
    first = _train(model, opt, x, y, 3)
    g0, g1 = (g.name for g in rs.resizable()[:2])
    for widths in ({g0: 5}, {g0: 7, g1: 6}):  # a prune, then a grow with a prune
        rs.apply(widths, data=x)
        assert rs.widths()[g0] == widths[g0]
        _assert_same_as_eager(model, x)
        _train(model, opt, x, y, 2)
        _assert_same_as_eager(model, x)
    report = rs.step(data=x)  # a policy step on the compiled model
    _assert_same_as_eager(model, x)
    last = _train(model, opt, x, y, 3)
    assert last < first, (first, last, str(report))
    assert opt.param_groups[0]["params"][0] is net[0].weight  # the same optimizer works on


@pytest.mark.parametrize("backend", ["inductor"])
def test_inductor_forward_after_resizes(backend):
    torch._dynamo.reset()
    net = _net().eval()
    model = torch.compile(net, backend=backend)
    x, _ = _data(4)
    rs = Resizer(model, x[:2])
    g0 = rs.resizable()[0].name
    with torch.no_grad():
        model(x)  # compiled for width 8
    for width in (5, 9):
        rs.apply({g0: width})
        _assert_same_as_eager(model, x)
        model.eval()
