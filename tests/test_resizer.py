"""Resizer end to end on the traced model family: same model, same optimizer, function kept."""

import copy
import json

import pytest
import torch
from torch import nn

from nets import CatNet, ConvNet, convnet_graph, quick, randomise_bn, rel_change
from svdgrow.app import models
from svdgrow.cost import CostModel
from svdgrow.optim_state import check_state_shapes
from svdgrow.policy import Policy
from svdgrow.resizer import Resizer


def test_analyse_reports_spectra_per_group():
    m = quick()
    rs = Resizer(m, torch.zeros(1, 1, 28, 28))
    spectra = rs.analyse()
    names = {s.name for s in spectra}
    assert names == {g.name for g in rs.resizable()} and "head" not in names
    for s in spectra:
        assert s.width == rs.widths()[s.name]
        assert torch.all(s.singular_values[:-1] >= s.singular_values[1:])
        assert torch.all(s.energy_kept[1:] >= s.energy_kept[:-1] - 1e-12)
        assert float(s.energy.sum()) == pytest.approx(s.total_energy, rel=1e-9)
        assert float(s.energy_kept[-1]) == pytest.approx(1.0, abs=1e-9)
    stem = next(s for s in spectra if s.name == "stem")
    assert stem.cap == 9 and stem.singular_values.numel() == min(stem.width, 9)
    json.dumps([s.summary() for s in spectra])


@pytest.mark.parametrize("train_mode", [False, True])
def test_grow_every_group_keeps_the_network_function(train_mode):
    m = quick(1)
    randomise_bn(m, 1, bias_std=0.2, mean_std=0.2)
    m.train(train_mode)
    x = torch.randn(6, 1, 28, 28)
    ref = copy.deepcopy(m)
    y0 = ref(x).detach()
    rs = Resizer(m, x[:1])
    caps = {s.name: s.cap for s in rs.analyse()}
    new = {n: min(w + 3, caps[n]) for n, w in rs.widths().items() if n in caps and w < caps[n]}
    assert len(new) >= 4
    rep = rs.apply(new)
    assert all(d.action == "grow" for d in rep.decisions)
    y1 = m(x).detach()
    assert float((y1 - y0).abs().max()) <= 1e-5 * float(y0.abs().max())
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert float((m(x) - ref(x)).abs().max()) <= 1e-5 * float(ref(x).abs().max())


def test_step_keeps_model_and_optimizer_objects_and_training_goes_on():
    m = quick(2)
    x = torch.randn(4, 1, 28, 28)
    t = torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(m(x), t).backward()
        opt.step()
    ids = {n: id(mod) for n, mod in m.named_modules()}
    pids = [id(p) for p in m.parameters()]
    rs = Resizer(
        m,
        x[:1],
        optimizer=opt,
        policy=Policy(energy_eps=0.05, max_prune_fraction=0.5, grow_threshold=10),
    )
    rep = rs.step()
    assert rep.changed and rep.params_after < rep.params_before
    assert any(d.action == "prune" for d in rep.decisions)
    for d in rep.decisions:
        assert d.reason and d.new_width >= 1
        assert rs.widths()[d.group] == d.new_width
    assert {n: id(mod) for n, mod in m.named_modules()} == ids
    assert [id(p) for p in m.parameters()] == pids
    assert [id(p) for g in opt.param_groups for p in g["params"]] == pids
    assert check_state_shapes(opt) == []
    # modules' attributes follow the weights
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.weight.shape[:2] == (mod.out_channels, mod.in_channels)
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.running_mean.shape == (mod.num_features,) == mod.weight.shape
        if isinstance(mod, nn.Linear):
            assert mod.weight.shape == (mod.out_features, mod.in_features)
    # the architecture spec of the resized model rebuilds it (checkpoints)
    twin = models.build_model(models.spec_of(m))
    twin.load_state_dict(m.state_dict())
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(m(x), t)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    json.dumps(rep.as_dict())
    assert "params" in str(rep)


def test_before_change_sees_the_network_as_it_was_and_only_when_it_changes():
    """``step(before_change=...)``: called once, with the decisions, before any weight
    changes, by a step that will resize; not by one that keeps every width; what it raises
    ends the step with the network untouched."""
    torch.manual_seed(0)
    m = quick(2)
    x = torch.randn(4, 1, 28, 28)
    ref = m(x).detach()
    seen = []

    def hook(decisions):
        seen.append(([d.action for d in decisions], rel_change(ref, m(x).detach())))

    keep = Resizer(m, x[:1], policy=Policy(energy_eps=0.0, grow_threshold=10))
    assert not keep.step(before_change=hook).changed and seen == []
    cut = Resizer(m, x[:1], policy=Policy(energy_eps=0.05, max_prune_fraction=0.5,
                                          grow_threshold=10))  # fmt: skip
    state = copy.deepcopy(m.state_dict())

    def refuse(decisions):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        cut.step(before_change=refuse)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    rep = cut.step(before_change=hook)
    assert rep.changed and len(seen) == 1
    actions, change = seen[0]
    assert "prune" in actions and change == 0.0  # the network before the resize


@pytest.mark.parametrize("mode", ["weights", "data"])
def test_prune_every_group_by_a_tenth(mode):
    m = quick(3)
    randomise_bn(m, 3, bias_std=0.2, mean_std=0.2)
    m.eval()
    x = torch.randn(8, 1, 28, 28)
    opt = torch.optim.Adam(m.parameters())
    rs = Resizer(m, x[:1], optimizer=opt, mode=mode)
    new = {
        n: max(1, w - max(1, w // 10))
        for n, w in rs.widths().items()
        if n in {g.name for g in rs.resizable()}
    }
    rep = rs.apply(new, data=x if mode == "data" else None)
    assert rs.widths() == {**rs.widths(), **new}
    y1 = m(x).detach()
    assert torch.isfinite(y1).all()
    assert rep.index and all(len(v) == new[k] for k, v in rep.index.items())


def test_frozen_output_group_and_budget_in_flops():
    m = quick(4)
    x = torch.zeros(1, 1, 28, 28)
    rs = Resizer(m, x, policy=Policy(budget_kind="flops", energy_eps=1e-9, max_prune_fraction=0.5))
    with pytest.raises(ValueError, match="'head' is frozen"):
        rs.apply({"head": 5})
    f0 = rs.cost("flops")(None)
    rep = rs.step(budget=0.7 * f0)
    assert rep.cost_kind == "flops" and rep.cost_after <= 0.7 * f0
    assert rs.cost("flops")(None) == pytest.approx(rep.cost_after)


def test_data_mode_beats_magnitude_pruning_on_held_data_and_auto_picks_it():
    m = quick(0)
    randomise_bn(m, 0, bias_std=0.2, mean_std=0.2)
    m.eval()
    g = torch.Generator().manual_seed(0)
    x_fit, x_held = torch.randn(64, 1, 28, 28, generator=g), torch.randn(64, 1, 28, 28, generator=g)
    with torch.no_grad():
        y0 = m(x_held)
    err = {}
    for mode in ("auto", "magnitude"):
        mm = copy.deepcopy(m)
        rs = Resizer(mm, x_fit[:1], mode=mode)
        names = {gr.name for gr in rs.resizable()}
        rep = rs.apply({n: w - w // 4 for n, w in rs.widths().items() if n in names}, data=x_fit)
        assert rep.mode == ("data" if mode == "auto" else "magnitude")
        with torch.no_grad():
            err[mode] = float((mm(x_held) - y0).norm() / y0.norm())
    assert err["auto"] < 0.5 * err["magnitude"], err
    # without a batch, auto falls back to the data-free weights fold
    rs = Resizer(copy.deepcopy(m), x_fit[:1])
    assert rs.apply({"blocks.0.conv1": 12}).mode == "weights"


def test_concatenated_groups_resize_at_their_offsets():
    torch.manual_seed(0)
    m = CatNet().eval()
    x = torch.randn(16, 2, 4, 4)
    rs = Resizer(m, x[:1])
    assert len(rs.graph.consumers["c"].segments) == 2
    with torch.no_grad():
        y0 = m(x)
    rs.apply({"a": 9, "b": 8, "c": 9})  # both segments of c grow, and c itself
    assert m.c.weight.shape == (9, 17, 3, 3) and m.fc.in_features == 9 * 16
    with torch.no_grad():
        assert float((m(x) - y0).abs().max()) <= 1e-5 * float(y0.abs().max())
        # the old columns of c moved to their new offsets: a's 6 first, b's 5 after a's 9
        y0 = m(x)
    rep = rs.apply({"a": 4, "b": 3}, data=x)
    assert m.c.in_channels == 7 and rep.mode == "data"
    with torch.no_grad():
        assert float((m(x) - y0).norm() / y0.norm()) < 0.5


def test_widths_of_a_hand_built_graph_without_traced_widths():
    """One width reader for the Resizer and the graph (CouplingGraph.widths): a group with no
    producer, no norm and no traced width takes the input width of a consumer reading it."""
    m = ConvNet(cin=3)
    graph = convnet_graph(m)
    graph.groups[0].width = None
    rs = Resizer(m, torch.zeros(1, 3, 4, 4), graph=graph)
    assert rs.widths() == {"input": 3, "conv1": 8, "conv2": 12, "fc": 5}
    assert rs.context().widths == {0: 3, 1: 8, 2: 12, 3: 5}
    rs.apply({"conv1": 6})
    assert graph.widths(m) == [3, 6, 12, 5]
    graph.consumers["conv1"].segments = [0, 0]  # no consumer reads the input alone
    with pytest.raises(ValueError, match="no known width"):
        rs.widths()


def _cut_quarter(rs):
    names = {g.name for g in rs.resizable()}
    return {n: w - w // 4 for n, w in rs.widths().items() if n in names}


def test_auto_without_data_keeps_the_weights_fold_where_it_is_better():
    m = quick(0)
    randomise_bn(m, 0, bias_std=0.2, mean_std=0.2)
    m.eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    auto, weights = copy.deepcopy(m), copy.deepcopy(m)
    rep = Resizer(auto, x).apply(_cut_quarter(Resizer(m, x)))
    Resizer(weights, x, mode="weights").apply(_cut_quarter(Resizer(m, x)))
    assert rep.mode == "weights" and not rep.fallbacks
    for a, b in zip(auto.parameters(), weights.parameters(), strict=True):
        assert torch.equal(a, b)


def test_auto_without_data_falls_back_to_magnitude_where_measured_better(caplog):
    """A weights fold told that every feature is the constant 50 folds a large wrong constant
    into every consumer: magnitude pruning is better there, auto measures it on the example
    input, uses it, and says why (in the report and the log)."""
    m = quick(0)
    randomise_bn(m, 0, bias_std=0.2, mean_std=0.2)
    m.eval()
    g = torch.Generator().manual_seed(1)
    x, held = torch.randn(8, 1, 28, 28, generator=g), torch.randn(32, 1, 28, 28, generator=g)
    with torch.no_grad():
        y0 = m(held)
    err = {}
    for mode in ("auto", "weights", "magnitude"):
        mm = copy.deepcopy(m)
        rs = Resizer(mm, x, mode=mode, activation=lambda z: torch.full_like(z, 50.0))
        with caplog.at_level("INFO", logger="svdgrow.resizer"):
            rep = rs.apply(_cut_quarter(rs))
        with torch.no_grad():
            err[mode] = float((mm(held) - y0).norm() / y0.norm())
        if mode == "auto":
            assert rep.fallbacks and set(rep.fallbacks) <= set(_cut_quarter(rs))
            why = next(iter(rep.fallbacks.values()))
            assert "magnitude pruning used" in why and "example input" in why
            assert any("magnitude pruning used" in r.getMessage() for r in caplog.records)
            assert "magnitude pruning used" in str(rep)
    assert err["weights"] > 2 * err["magnitude"], err
    assert err["auto"] <= err["magnitude"] + 1e-6, err


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_cost_model_built_once_stays_exact_after_resizes(kind):
    """Resizer.cost builds the cost model once per kind (FLOPs: one counted forward pass) and
    evaluates it at the current widths: the same numbers as a model built afresh."""
    m = quick(4)
    x = torch.zeros(1, 1, 28, 28)
    rs = Resizer(m, x, policy=Policy(budget_kind=kind, energy_eps=1e-9, max_prune_fraction=0.3))
    first = rs.cost()
    for budget in (0.8, 0.6):
        rs.step(budget=budget * first(None))
        fresh = CostModel(m, rs.graph, rs.widths(), kind, x)
        assert rs.cost()(None) == pytest.approx(fresh(None), rel=1e-9)
        assert kind != "params" or rs.cost()(None) == sum(p.numel() for p in m.parameters())
    assert len(rs._costs) == 1 and first(None) > rs.cost()(None)


# --- spectrum="features" ----------------------------------------------------------------------
def _stem_net(width: int = 16, seed: int = 0) -> nn.Sequential:
    """A 1-channel 3x3 stem wider than its input dimension (9), a second conv, a linear head."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                      nn.Conv2d(width, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))  # fmt: skip
    randomise_bn(m, 1)
    return m.eval()


def test_feature_spectrum_is_not_capped_by_the_input_dimension():
    """The stem's weight spectrum has 9 directions at width 16; after BatchNorm and ReLU its
    features have 16, and the ones past 9 carry energy the weight spectrum calls absent. Its
    cap for growth is then the feature samples (16 x 12 x 12 positions), not 9."""
    m, x = _stem_net(), torch.randn(16, 1, 12, 12)
    w = {s.name: s for s in Resizer(m, x, mode="data").analyse()}
    f = {s.name: s for s in Resizer(m, x, mode="data", spectrum="features").analyse(data=x)}
    assert w.keys() == f.keys()
    stem_w, stem_f = w["0"], f["0"]
    assert stem_w.cap == 9 and stem_f.cap == 16 * 12 * 12 and stem_w.energy.numel() == 9
    assert stem_w.rank_for(1e-9) <= 9
    assert stem_f.energy.numel() == 16 and stem_f.rank_for(1e-6) > 9
    for s in f.values():
        assert torch.all(s.energy[:-1] >= s.energy[1:]) and float(s.energy[-1]) >= 0
        assert float(s.energy_kept[-1]) == pytest.approx(1.0, abs=1e-9)


def test_feature_spectrum_prunes_a_duplicated_channel_exactly():
    """A stem channel copied onto another is one feature direction: the feature spectrum has a
    zero energy, the policy prunes one channel, and the fold keeps the output."""
    m, x = _stem_net(), torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        for t in (m[0].weight, m[0].bias, m[1].weight, m[1].bias, m[1].running_mean,
                  m[1].running_var):  # fmt: skip
            t[5] = t[2]
        before = m(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    rs = Resizer(m, x, policy=Policy(energy_eps=1e-10, min_width=1), optimizer=opt, mode="data",
                 spectrum="features")  # fmt: skip
    stem = next(s for s in rs.analyse(data=x) if s.name == "0")
    assert stem.rank_for(1e-10) == 15
    report = rs.step(data=x)
    d = next(d for d in report.decisions if d.group == "0")
    assert (d.action, d.old_width, d.new_width) == ("prune", 16, 15)
    assert not {2, 5} <= set(report.index["0"])  # one of the twins went
    with torch.no_grad():
        assert rel_change(m(x), before) < 1e-5
    check_state_shapes(opt)
    m(x).sum().backward()
    opt.step()  # the optimizer steps the resized model


def test_feature_spectrum_measures_the_batch_once_per_step(monkeypatch):
    """The features the spectrum is read from are the ones the same step's fold uses."""
    import svdgrow.resizer as resizer_mod
    import svdgrow.surgery.prune as prune_mod

    calls = []
    real = resizer_mod.capture_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(resizer_mod, "capture_features", counting)
    monkeypatch.setattr(prune_mod, "capture_features", counting)
    m, x = _stem_net(), torch.randn(16, 1, 12, 12)
    rs = Resizer(m, x, policy=Policy(budget=1200), mode="data", spectrum="features")
    report = rs.step(data=x)
    assert report.params_after <= 1200 < report.params_before
    assert len(calls) == 1


def test_feature_spectrum_refuses_what_it_cannot_measure():
    m, x = _stem_net(), torch.randn(4, 1, 12, 12)
    with pytest.raises(ValueError, match="spectrum must be 'weights' or 'features', got 'x'"):
        Resizer(m, x, spectrum="x")
    for mode in ("weights", "magnitude"):
        with pytest.raises(ValueError, match=f"mode={mode!r} never takes"):
            Resizer(m, x, mode=mode, spectrum="features")
    rs = Resizer(m, x, spectrum="features")
    with pytest.raises(ValueError, match="pass data=... to step"):
        rs.step()
    with torch.no_grad():
        x_bad = x.clone()
        x_bad[0, 0, 0, 0] = float("nan")
    widths = rs.widths()
    with pytest.raises(FloatingPointError, match="features on this batch hold NaN"):
        rs.step(data=x_bad)
    assert rs.widths() == widths
