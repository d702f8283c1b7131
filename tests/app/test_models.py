"""Architecture specs, presets and the light ResNet family."""

import json

import pytest
import torch

from svdgrow.app.config import TrainConfig
from svdgrow.app.models import (
    PRESETS,
    build_model,
    count_flops,
    count_params,
    describe,
    layer_widths,
    narrow_spec,
    preset_spec,
    scale_spec,
    spec_of,
    validate_spec,
)


@pytest.mark.parametrize(
    "name,low,high",
    [
        ("mnist-2m", 2_000_000, 3_000_000),
        ("fashion-500k", 500_000, 800_000),
        ("quick", 1_000, 40_000),
    ],
)
def test_preset_param_counts(name, low, high):
    n = count_params(preset_spec(name))
    assert low <= n <= high, f"{name}: {n:,} parameters"
    assert count_params(build_model(preset_spec(name))) == n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_round_trip(name):
    spec = preset_spec(name)
    assert spec_of(build_model(spec)) == spec
    assert json.loads(json.dumps(spec)) == spec  # JSON-able


@pytest.mark.parametrize("bn", [True, False])
def test_spec_round_trip_odd_widths(bn):
    spec = {
        "arch": "resnet",
        "in_channels": 3,
        "num_classes": 7,
        "input_size": 20,
        "bn": bn,
        "stem": 5,
        "blocks": [
            {"mid": 3, "out": 9, "stride": 2, "projection": True},
            {"mid": 1, "out": 9, "stride": 1, "projection": False},
            {"mid": 4, "out": 2, "stride": 1, "projection": True},  # stride-1 projection
            {"mid": 6, "out": 11, "stride": 2, "projection": True},
        ],
    }
    model = build_model(spec)
    assert spec_of(model) == spec
    out = model(torch.randn(2, 3, 20, 20))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_shapes(name):
    model = build_model(preset_spec(name)).eval()
    assert model.feature_size == 7
    assert model.head.in_features == preset_spec(name)["blocks"][-1]["out"] * 49
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_spec_of_reads_resized_weights():
    """A width changed in place (weights only) is read back from the tensors."""
    spec = preset_spec("quick")
    model = build_model(spec)
    conv1 = model.blocks[0].conv1
    conv1.weight = torch.nn.Parameter(conv1.weight[:5].clone())  # out_channels attr is stale
    assert spec_of(model)["blocks"][0]["mid"] == 5


def test_invalid_spec_messages():
    spec = preset_spec("quick")
    spec["blocks"][1]["out"] = 3  # identity shortcut with a width change
    with pytest.raises(ValueError, match="identity shortcut"):
        validate_spec(spec)
    with pytest.raises(ValueError, match="lacks"):
        validate_spec({"stem": 3})
    with pytest.raises(KeyError, match="known presets"):
        preset_spec("nope")


def test_helpers():
    spec = preset_spec("quick")
    assert "total" in describe(spec)
    widths = layer_widths(spec)
    assert widths["stem"] == spec["stem"] and widths["head"] == 10
    assert count_flops(build_model(spec)) > 0


@pytest.mark.parametrize("preset", ["mnist-2m", "fashion-500k"])
@pytest.mark.parametrize("target", [1_500, 6_000, 60_000])
def test_narrow_spec_nearest_uniform_width(preset, target):
    base = preset_spec(preset)
    spec, factor = narrow_spec(base, target)
    n = count_params(spec)
    # one factor for every width: each layer is round(factor * preset width) (identity blocks
    # keep their input's width), and no neighbouring factor lands nearer the target
    assert spec["stem"] == max(1, round(base["stem"] * factor))
    assert [b["mid"] for b in spec["blocks"]] == [max(1, round(b["mid"] * factor))
                                                  for b in base["blocks"]]  # fmt: skip
    for f in (factor * 0.9, factor * 0.97, factor * 1.03, min(1.0, factor * 1.1)):
        assert abs(count_params(scale_spec(base, f)) - target) >= abs(n - target)
    assert abs(n - target) / target < 0.25
    validate_spec(spec)
    assert narrow_spec(base, 10 * count_params(base))[0] == base  # never widened


def test_start_scale_narrows_the_starting_spec():
    cfg = TrainConfig(preset="mnist-2m", target_params=6000, start_scale=4.0)
    start = cfg.starting_spec()
    assert start == narrow_spec(preset_spec("mnist-2m"), 24_000)[0]
    assert count_params(start) < 30_000
    cfg.start_scale = None
    assert cfg.starting_spec() == preset_spec("mnist-2m")


def test_a_start_the_architecture_cannot_reach_is_announced(tmp_path, caplog):
    from svdgrow.app.parallel import Launch
    from svdgrow.app.start import prepare

    full = count_params(preset_spec("fashion-500k"))
    cfg = TrainConfig(dataset="fashion-mnist", preset="fashion-500k", target_params=120_000,
                      start_scale=8.0, run_dir=str(tmp_path / "run"))  # fmt: skip
    note = cfg.start_shortfall(cfg.starting_spec())
    assert note is not None and f"{full:,}" in note and "960,000" in note
    assert "--preset mnist-2m" in note  # the same architecture, twice as wide
    with caplog.at_level("WARNING", logger="svdgrow"):
        _, spec, _ = prepare(cfg, None, None, Launch())
    assert count_params(spec) == full  # never widened
    assert any(r.message == note for r in caplog.records)
    # a start the architecture can reach, a growing start, and no start scale say nothing
    for scale in (4.0, 0.25, None):
        cfg.start_scale = scale
        assert cfg.start_shortfall(cfg.starting_spec()) is None
    cfg.preset, cfg.start_scale = "mnist-2m", 8.0
    assert cfg.start_shortfall(cfg.starting_spec()) is None
