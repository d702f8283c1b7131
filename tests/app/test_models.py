"""Architecture specs, presets and the light ResNet family."""

import json

import pytest
import torch

from svdgrow.app.models import (
    PRESETS,
    build_model,
    count_flops,
    count_params,
    describe,
    layer_widths,
    preset_spec,
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
