"""Optimizer state follows a resize: same optimizer object, exact remap, no stale tensors."""

import copy
import warnings

import pytest
import torch
from torch import nn

from nets import ConvNet, convnet_graph
from svdgrow.optim_state import check_state_shapes
from svdgrow.resizer import Resizer


def Net():
    return ConvNet(c1=8, c2=6, act=nn.LeakyReLU(0.1))


def graph():
    return convnet_graph(Net())


OPTS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


def train(m, opt, x, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()


def expected_slice(old: torch.Tensor, name: str, idx: dict[str, list[int]]) -> torch.Tensor:
    """Slice an old state tensor the way the param ``name`` must be sliced (reference)."""
    rows = {"conv1": "conv1", "bn1": "conv1", "conv2": "conv2"}.get(name.split(".")[0])
    cols = {"conv2": "conv1", "fc": "conv2"}.get(name.split(".")[0])
    t = old
    if rows in idx:
        r = torch.tensor(idx[rows])
        t = torch.where((r >= 0).view(-1, *[1] * (t.dim() - 1)), t[r.clamp(min=0)], torch.zeros(()))
    if cols in idx and name.endswith("weight") and t.dim() > 1:
        c = torch.tensor(idx[cols])
        B = 16 if name.startswith("fc") else 9
        v = t.reshape(t.shape[0], -1, B)
        v = torch.where((c >= 0).view(1, -1, 1), v[:, c.clamp(min=0)], torch.zeros(()))
        t = v.reshape(t.shape[0], -1, *t.shape[2:]) if t.dim() == 4 else v.reshape(t.shape[0], -1)
    return t


@pytest.mark.parametrize("kind", sorted(OPTS))
@pytest.mark.parametrize("widths", [{"conv1": 5, "conv2": 9}, {"conv1": 11, "conv2": 4}])
def test_state_is_remapped_and_matches_a_fresh_optimizer(kind, widths):
    torch.manual_seed(0)
    m = Net()
    opt = OPTS[kind](m.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 3, 4, 4)
    train(m, opt, x)
    params_before = [id(p) for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in m.named_parameters()}
    old_state = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    mods_before = {n: id(mod) for n, mod in m.named_modules()}
    rep = Resizer(m, x[:1], optimizer=opt, graph=graph()).apply(widths)

    # same objects everywhere, no stale tensors, all params still in their groups
    assert [id(p) for g in opt.param_groups for p in g["params"]] == params_before
    assert {n: id(mod) for n, mod in m.named_modules()} == mods_before
    assert check_state_shapes(opt) == []
    for p in m.parameters():
        assert p.grad is None or p.grad.shape == p.shape  # resized params lose their stale grad
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dim():
                assert v.shape == p.shape, (names[id(p)], k)
    # remapped values: the old state sliced with the same index maps, new slices 0
    for p, s in opt.state.items():
        n = names[id(p)]
        for k, v in s.items():
            if k == "step":
                torch.testing.assert_close(v, old_state[n][k], rtol=0, atol=0)
            elif torch.is_tensor(v):
                torch.testing.assert_close(
                    v, expected_slice(old_state[n][k], n, rep.index), rtol=0, atol=0, msg=f"{n}.{k}"
                )

    # one optimizer step = what a fresh optimizer loaded with the remapped state does
    twin = copy.deepcopy(m)
    fresh = OPTS[kind](twin.parameters())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for mm, oo in ((m, opt), (twin, fresh)):
        oo.zero_grad()
        mm(x).square().mean().backward()
    opt.step()
    fresh.step()
    for (n, a), b in zip(m.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # training and the scheduler go on
    lr = opt.param_groups[0]["lr"]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5)
    train(m, opt, x, 2)
    assert all(torch.isfinite(p).all() for p in m.parameters())


class Custom(torch.optim.Optimizer):
    """An optimizer svdgrow does not know: a param-shaped 'trace' and a counter."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st.setdefault("trace", torch.zeros_like(p)).mul_(0.5).add_(p.grad)
                st["count"] = st.get("count", 0) + 1
                p.add_(st["trace"], alpha=-g["lr"])


def test_unknown_optimizer_is_sliced_with_a_warning():
    torch.manual_seed(1)
    m = Net()
    opt = Custom(m.parameters())
    x = torch.randn(8, 3, 4, 4)
    train(m, opt, x)
    rs = Resizer(m, x[:1], optimizer=opt, graph=graph())
    with pytest.warns(UserWarning, match="Custom.*trace"):
        rs.apply({"conv1": 6})
    assert check_state_shapes(opt) == []
    assert opt.state[m.conv1.weight]["count"] == 3
    train(m, opt, x, 1)


def test_unmappable_state_errors_before_touching_anything():
    torch.manual_seed(2)
    m = Net()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(8, 3, 4, 4)
    train(m, opt, x)
    opt.state[m.conv2.weight]["odd"] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ea = opt.state[m.conv1.weight]["exp_avg"].clone()
    rs = Resizer(m, x[:1], optimizer=opt, graph=graph())
    with pytest.raises(ValueError, match=r"state\['conv2.weight'\]\['odd'\].*Nothing was changed"):
        rs.apply({"conv1": 5})
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(opt.state[m.conv1.weight]["exp_avg"], ea)
    assert m.conv1.out_channels == 8


def test_lbfgs_state_cannot_follow():
    torch.manual_seed(3)
    m = Net()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=2)
    x = torch.randn(8, 3, 4, 4)

    def closure():
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    rs = Resizer(m, x[:1], optimizer=opt, graph=graph())
    with pytest.raises(ValueError, match="LBFGS"):
        rs.apply({"conv1": 5})
    assert m.conv1.weight.shape[0] == 8


def test_no_optimizer_state_yet_is_fine():
    m = Net()
    opt = torch.optim.Adam(m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Resizer(m, torch.zeros(1, 3, 4, 4), optimizer=opt, graph=graph()).apply({"conv1": 10})
    train(m, opt, torch.randn(4, 3, 4, 4), 1)
    assert check_state_shapes(opt) == []
