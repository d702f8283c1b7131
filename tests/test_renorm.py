"""Row renormalisation after a resize (svdgrow.surgery.renorm): a pure grow leaves every row and
the training-mode function alone; a prune rescales the folded layers."""

import torch

from nets import quick, randomise_bn, rel_change
from svdgrow import Resizer
from svdgrow.surgery import renormalize_rows_, row_norm_snapshot


def _setup(seed=0):
    torch.manual_seed(seed)
    m = quick(seed)
    randomise_bn(m, torch.Generator().manual_seed(seed))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    rs = Resizer(m, x[:2], optimizer=opt, ridge=1e-8)
    return m, x, opt, rs


def test_pure_grow_is_left_alone_and_keeps_the_training_mode_loss():
    m, x, opt, rs = _setup()
    m.train()
    y0 = m(x).detach()
    before = row_norm_snapshot(m, rs.graph)
    grow = {s.name: min(s.width + 3, s.cap) for s in rs.analyse() if s.cap > s.width}
    assert grow, "the test model needs a group below its cap"
    rs.apply(grow)
    applied = renormalize_rows_(m, rs.graph, opt, before)
    assert applied == {}
    assert rel_change(m(x).detach(), y0) < 1e-5


def test_prune_rescales_the_layers_it_folded_into():
    m, x, opt, rs = _setup(1)
    before = row_norm_snapshot(m, rs.graph)
    cut = {g.name: max(1, rs.widths()[g.name] // 2) for g in rs.resizable()}
    rs.apply(cut, data=x)
    applied = renormalize_rows_(m, rs.graph, opt, before)
    assert applied, "a prune that changed shapes must rescale some BatchNorm-followed layer"
    for name, (_, target) in before.items():
        if name in applied:
            w = dict(m.named_modules())[name].weight
            rows = w.reshape(w.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(rows, torch.full_like(rows, target), rtol=1e-4, atol=1e-6)
