"""Growth past a narrow producer: a residual group fed by a 1x1 projection of a narrow stream
grows past that stream's width (group_cap is the largest producer input dimension), keeps the
output, and every grown row of the group matrix is a new direction."""

import pytest
import torch

from nets import rel_change
from svdgrow import Resizer
from svdgrow.app.models import build_model
from svdgrow.spectrum import group_matrix

SPEC = {
    "arch": "resnet", "in_channels": 1, "num_classes": 10, "input_size": 28, "bn": True,
    "stem": 2,
    "blocks": [{"mid": 4, "out": 3, "stride": 2, "projection": True}],
}  # fmt: skip


def test_residual_group_grows_past_its_projection_input():
    torch.manual_seed(0)
    m = build_model(SPEC).eval()
    x = torch.randn(16, 1, 28, 28)
    rs = Resizer(m, x[:2], optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    spec = {s.name: s for s in rs.analyse()}
    res = next(s for s in spec.values() if s.name == "blocks.0.conv2")
    assert res.cap == 4 * 9 > SPEC["stem"]  # conv2's in*kh*kw, not the shortcut's 2
    y0 = m(x).detach()
    rs.apply({"blocks.0.conv2": 7})  # past the shortcut's input dimension (2)
    assert rel_change(m(x).detach(), y0) < 1e-5
    g = next(g for g in rs.graph.groups if g.name == "blocks.0.conv2")
    G = group_matrix(dict(m.named_modules()), g)[0].double()
    assert G.shape[0] == 7 and int(torch.linalg.matrix_rank(G)) == 7
    with pytest.raises(ValueError, match="past its cap"):
        rs.apply({"blocks.0.conv2": 4 * 9 + 1})


def _stem(width: int = 9):
    """A 1-channel 3x3 stem (weight cap 9), BatchNorm, ReLU, a second conv, a linear head."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                      nn.Conv2d(width, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    return m


def test_feature_spectra_grow_a_stem_past_its_weight_cap_as_new_features():
    """With spectrum='features' a 1-channel 3x3 stem at its weight cap (9) grows to 14: the
    output is unchanged, the optimizer steps, the 5 channels past the cap have rows of the
    same norm as an orthogonal grown row, and after BatchNorm and ReLU every one of the 14
    channels is a direction of its own in feature space. A weight-spectrum resizer refuses."""
    m = _stem()
    x = torch.randn(32, 1, 12, 12)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # momentum state to carry
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), torch.randint(0, 10, (32,))).backward()
        opt.step()
    with pytest.raises(ValueError, match="past its cap 9"):
        Resizer(m, x[:2], mode="data").apply({"0": 14})
    rs = Resizer(m, x[:2], optimizer=opt, mode="data", spectrum="features")
    m.eval()
    y0 = m(x).detach()
    rs.apply({"0": 14})
    assert m[0].weight.shape[0] == 14 and m[1].weight.shape[0] == 14
    assert rel_change(m(x).detach(), y0) < 1e-5
    rows = m[0].weight.detach().reshape(14, 9)
    assert torch.all(rows[9:].norm(dim=1) > 0)
    feats = {}
    h = m[3].register_forward_pre_hook(lambda mod, inp: feats.setdefault("x", inp[0]))
    m.train()
    m(x)
    h.remove()
    f = feats["x"].detach().permute(0, 2, 3, 1).reshape(-1, 14).double()
    assert int(torch.linalg.matrix_rank(torch.cov(f.T), rtol=1e-8)) == 14  # past the 9 of W
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), torch.randint(0, 10, (32,))).backward()
    w0 = m[3].weight.detach().clone()
    opt.step()
    assert m[3].weight[:, 9:].abs().sum() > 0 and not torch.equal(m[3].weight, w0)


def test_hold_grown_keeps_grown_channels_for_that_many_steps():
    """Resizer(hold_grown=2): a group that grew at a step is not pruned below the width it grew
    to at the next two steps, however little its new (zero-read) channels weigh; at the third
    the energy rule prunes it again. Invalid holds are refused in one line."""
    from svdgrow import Policy

    m = _stem(6)
    x = torch.randn(16, 1, 12, 12)
    pol = Policy(energy_eps=1e-9, min_width=1, max_prune_fraction=1.0, grow_fraction=1.0,
                 grow_threshold=2.0, fill_budget=True)  # fmt: skip
    rs = Resizer(m, x[:2], mode="data", spectrum="features", hold_grown=2, policy=pol)
    report = rs.step(data=x, budget=rs.param_count() + 6 * 9 + 6 * 3 + 6 * 8 * 9)
    assert rs.widths()["0"] == 12, report  # the stem filled the budget: 6 -> 12
    assert rs.held == {"0": (12, 2)}
    pol.fill_budget, pol.energy_eps = False, 0.3  # now the new channels look unused
    for left in (1, 0):
        report = rs.step(data=x)
        assert rs.widths()["0"] == 12 and "hold" in str(report), report
        assert rs.held == ({"0": (12, left)} if left else {})
    rs.step(data=x)
    assert rs.widths()["0"] < 12  # the energy rule prunes once the hold is over
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="hold_grown must be an int >= 0"):
            Resizer(m, x[:2], hold_grown=bad)
