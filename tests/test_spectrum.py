"""Stage 2: group matrices (direct BatchNorms folded in), spectra, energy and ranks."""

import json

import pytest
import torch
from torch import nn

from nets import ConvNet, ResLinear, convnet_graph, randomise_bn, reslinear_graph
from svdgrow.spectrum import (
    GroupSpectrum,
    analyse_groups,
    bn_affine,
    bn_output_stats,
    group_matrix,
    input_dim,
    norm_directly_after,
    producer_matrix,
)


def _spectrum(sv):
    s = torch.as_tensor(sv, dtype=torch.float64)
    e = s * s
    total = float(e.sum())
    kept = torch.cumsum(e, 0) / total if total > 0 else torch.ones_like(e)
    return GroupSpectrum("g", 0, len(sv), 100, s, e, kept, total)


def test_bn_affine_is_the_eval_mode_batchnorm():
    bn = nn.BatchNorm2d(5)
    randomise_bn(bn, 0)
    bn.eval()
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    scale, shift = bn_affine(bn)
    y = scale[None, :, None, None] * x + shift[None, :, None, None]
    torch.testing.assert_close(y, bn.double()(x))


def test_bn_affine_and_output_stats_without_affine_or_running_stats():
    bn = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    scale, shift = bn_affine(bn)
    torch.testing.assert_close(scale, torch.full((3,), (1 + bn.eps) ** -0.5, dtype=torch.float64))
    torch.testing.assert_close(shift, torch.zeros(3, dtype=torch.float64))
    mean, std = bn_output_stats(bn)
    assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(std, torch.ones(3, dtype=torch.float64))


def test_bn_output_stats_match_the_output_on_the_recorded_distribution():
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm1d(4)
    randomise_bn(bn, g)
    bn.eval()
    x = bn.running_mean + bn.running_var.sqrt() * torch.randn(200000, 4, generator=g)
    with torch.no_grad():
        y = bn(x).double()
    mean, std = bn_output_stats(bn)
    torch.testing.assert_close(y.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(y.std(0), std, atol=0.0, rtol=0.02)


def test_group_matrix_folds_direct_batchnorms_and_concatenates_producers():
    torch.manual_seed(2)
    m = ResLinear(d=10, w=8, mid=6, bn=True)
    randomise_bn(m, 2)
    m.double()
    mods = dict(m.named_modules())
    group = reslinear_graph(m, bn=True).groups[1]  # producers s and b, norms bs and bb
    assert norm_directly_after(group) == {"s": "bs", "b": "bb"}
    G, blocks, scales, b_eff = group_matrix(mods, group)
    assert G.dtype == torch.float64 and G.shape == (8, 10 + 6)
    assert blocks == [("s", 0, 10), ("b", 10, 16)]
    s_s, t_s = bn_affine(m.bs)
    s_b, t_b = bn_affine(m.bb)
    torch.testing.assert_close(G[:, :10], s_s[:, None] * m.s.weight.detach())
    torch.testing.assert_close(G[:, 10:], s_b[:, None] * m.b.weight.detach())
    torch.testing.assert_close(scales["s"], s_s)
    want = s_s * m.s.bias.detach() + t_s + s_b * m.b.bias.detach() + t_b
    torch.testing.assert_close(b_eff, want)
    # the pre-activation of the residual stream (eval mode) is G [x; h] + b_eff
    m.eval()
    x = torch.randn(5, 10, dtype=torch.float64)
    with torch.no_grad():
        h = m.act(m.a(m.bs(m.s(x))))  # what b reads
        z = m.bs(m.s(x)) + m.bb(m.b(h))
    torch.testing.assert_close(torch.cat([x, h], 1) @ G.T + b_eff, z)


def test_producer_matrix_and_input_dim():
    conv = nn.Conv2d(3, 7, (3, 2))
    assert producer_matrix(conv).shape == (7, 18) and input_dim(conv) == 18
    assert input_dim(nn.Linear(11, 4)) == 11


def test_analyse_groups_matches_float64_svd():
    torch.manual_seed(3)
    m = ConvNet(c1=10, c2=6, bn=True)
    randomise_bn(m, 3)
    graph = convnet_graph(m)
    mods = dict(m.named_modules())
    widths = {0: 3, 1: 10, 2: 6, 3: 5}
    groups = [graph.groups[1], graph.groups[2]]
    spectra = analyse_groups(mods, groups, widths)
    assert [s.name for s in spectra] == ["conv1", "conv2"]
    for s, group in zip(spectra, groups, strict=True):
        G = group_matrix(mods, group)[0]
        want = torch.linalg.svdvals(G)
        # energies from float32 products of the float32 weights: exact to ~1e-6 of the largest
        torch.testing.assert_close(s.energy, want**2, rtol=1e-5, atol=1e-6 * float(want[0]) ** 2)
        assert s.width == widths[group.id] and s.group_id == group.id
        assert s.cap == input_dim(mods[group.producers[0]])
        assert s.total_energy == pytest.approx(float((G * G).sum()), rel=1e-6)
        torch.testing.assert_close(s.energy, s.singular_values**2)
        torch.testing.assert_close(s.energy_kept, torch.cumsum(s.energy, 0) / s.total_energy)
        assert float(s.energy_kept[-1]) == pytest.approx(1.0, abs=1e-9)
    assert analyse_groups(mods, [], widths) == []
    json.dumps([s.summary() for s in spectra])


def test_analyse_groups_refuses_non_finite_weights():
    m = ConvNet()
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = float("inf")
    graph = convnet_graph(m)
    with pytest.raises(FloatingPointError, match="'conv2'.*NaN/inf"):
        analyse_groups(dict(m.named_modules()), graph.groups[1:3], {0: 3, 1: 8, 2: 12, 3: 5})


def test_rank_for_keeps_the_energy_asked_for():
    s = _spectrum([10, 5, 1, 0.1, 0.01])  # energies 100, 25, 1, 0.01, 1e-4
    assert s.rank_for(0.01) == 2  # 125 / 126.0101 = 0.99198
    assert s.rank_for(1e-3) == 3
    assert s.rank_for(0.0) == 5
    assert s.rank_for(0.5) == 1
    assert _spectrum([0.0, 0.0]).rank_for(0.01) == 1  # no energy: one channel is enough
