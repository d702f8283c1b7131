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
