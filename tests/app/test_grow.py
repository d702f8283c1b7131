"""Growth inside `svdgrow train`: a run that starts below its budget grows, every grow resize
keeps the batch loss (function-preserving), the log gives each grow its reason, and the grown
directions then train (the optimizer steps them away from their initial zero columns)."""

from __future__ import annotations

import json

import torch

from svdgrow.app.checkpoint import load_model
from svdgrow.app.cli import main
from svdgrow.app.rundir import last_checkpoint, read_log

SMALL = {
    "arch": "resnet", "in_channels": 1, "num_classes": 10, "input_size": 28, "bn": True,
    "stem": 2,
    "blocks": [
        {"mid": 3, "out": 3, "stride": 2, "projection": True},
        {"mid": 2, "out": 3, "stride": 1, "projection": False},
        {"mid": 3, "out": 3, "stride": 2, "projection": True},
    ],
}  # fmt: skip


def test_grow_inside_train_keeps_the_loss_and_trains_the_new_directions(tmp_path, data_dir):
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SMALL))
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--spec", str(spec), "--target-params", "4000",
            "--resize-every", "4", "--resize-until", "0.8", "--energy-eps", "1e-4",
            "--subset", "800", "--test-subset", "200", "--batch-size", "50", "--epochs", "2",
            "--threads", "1", "--seed", "0", "--no-progress", "--checkpoint-minutes", "0",
            "--no-download", "--data-dir", str(data_dir), "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    events = read_log(run)
    resizes = [e for e in events if e["event"] == "resize"]
    grows = [
        e for e in resizes if e["decisions"] and all(d["action"] == "grow" for d in e["decisions"])
    ]
    assert grows, f"no grow-only resize in {len(resizes)} resizes"
    for e in grows:
        before, after = e["batch_loss_before"], e["batch_loss_after"]
        assert abs(after - before) <= 1e-5 * abs(before), (e["step"], before, after)
        assert e["params"] > e["params_before"]
        for d in e["decisions"]:
            assert d["new_width"] > d["old_width"] and "directions needed" in d["reason"]
    start = next(e for e in events if e["event"] == "start")
    end = next(e for e in events if e["event"] == "end")
    assert end["params"] > start["params"]
    # the grown stem channels left their zero outgoing columns: the optimizer stepped them
    model, _ = load_model(last_checkpoint(run))
    grown = [e for e in grows if any(d["group"] == "stem" for d in e["decisions"])]
    if grown:
        w = model.blocks[0].conv1.weight  # reads the stem's channels
        new_cols = w[:, SMALL["stem"] :]
        assert new_cols.numel() and bool(new_cols.abs().sum() > 0)
    assert torch.isfinite(torch.tensor(end["test_acc"]))


def test_a_growing_run_fills_its_budget_as_it_rises(tmp_path, data_dir):
    """Below its budget the run's policy fills it (Policy.fill_budget): the budget rises from
    the start size to --target-params over --shrink-steps, every resize stays within it, and
    the run ends within one grow step of the target instead of stalling where no spectrum
    reaches grow_threshold (set out of reach here)."""
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SMALL))
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--spec", str(spec), "--target-params", "3000",
            "--shrink-steps", "16", "--resize-every", "4", "--resize-until", "0.8",
            "--policy", '{"grow_threshold": 2.0}', "--energy-eps", "1e-4",
            "--subset", "800", "--test-subset", "200", "--batch-size", "50", "--epochs", "2",
            "--threads", "1", "--seed", "0", "--no-progress", "--checkpoint-minutes", "0",
            "--no-download", "--data-dir", str(data_dir), "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    events = read_log(run)
    start = next(e for e in events if e["event"] == "start")
    resizes = [e for e in events if e["event"] == "resize"]
    assert start["params"] < 3000 and resizes
    for e in resizes:
        assert e["params"] <= e["budget"], (e["step"], e["params"], e["budget"])
        for d in e["decisions"]:
            if d["action"] == "grow":
                assert "filling the budget (fill_budget)" in d["reason"]
    budgets = [e["budget"] for e in resizes]
    assert budgets == sorted(budgets) and budgets[0] < 3000 and budgets[-1] == 3000
    end = next(e for e in events if e["event"] == "end")
    assert 0.85 * 3000 <= end["params"] <= 3000, end["params"]


def test_a_start_scale_below_one_grows_the_preset_to_its_budget(tmp_path, data_dir):
    """--start-scale 0.25 narrows the preset to a quarter of --target-params and grows it back:
    the documented way to run a growing search from the command line."""
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--preset", "mnist-2m", "--start-scale", "0.25",
            "--target-params", "6000", "--shrink-steps", "16", "--resize-every", "4",
            "--resize-until", "0.8", "--energy-eps", "1e-4", "--subset", "800",
            "--test-subset", "200", "--batch-size", "50", "--epochs", "2", "--threads", "1",
            "--seed", "0", "--no-progress", "--checkpoint-minutes", "0", "--no-download",
            "--data-dir", str(data_dir), "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    events = read_log(run)
    start = next(e for e in events if e["event"] == "start")
    assert start["params"] <= 0.3 * 6000, start["params"]
    grows = [d for e in events if e["event"] == "resize" for d in e["decisions"]
             if d["action"] == "grow"]  # fmt: skip
    assert grows and all(d["new_width"] > d["old_width"] for d in grows)
    end = next(e for e in events if e["event"] == "end")
    assert 0.85 * 6000 <= end["params"] <= 6000, end["params"]


def test_growth_past_the_weight_cap_inside_train_keeps_the_loss(tmp_path, data_dir):
    """With feature spectra (and a hold on what grew) the 1-channel 3x3 stem grows past its
    weight cap of 9 inside `svdgrow train`; every grow-only resize keeps the batch loss."""
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps({**SMALL, "stem": 8}))
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--spec", str(spec), "--target-params", "6000",
            "--shrink-steps", "8", "--resize-every", "2", "--resize-until", "0.8",
            "--energy-eps", "1e-4", "--spectrum", "features", "--hold-grown", "3",
            "--policy", '{"grow_fraction": 0.5}',
            "--subset", "800", "--test-subset", "200", "--batch-size", "50", "--epochs", "2",
            "--threads", "1", "--seed", "0", "--no-progress", "--checkpoint-minutes", "0",
            "--no-download", "--data-dir", str(data_dir), "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    resizes = [e for e in read_log(run) if e["event"] == "resize"]
    stem = [d["new_width"] for e in resizes for d in e["decisions"] if d["group"] == "stem"]
    assert max(stem) > 9, stem
    grows = [e for e in resizes
             if e["decisions"] and all(d["action"] == "grow" for d in e["decisions"])]  # fmt: skip
    assert any(d["group"] == "stem" and d["new_width"] > 9 for e in grows for d in e["decisions"])
    for e in grows:
        before, after = e["batch_loss_before"], e["batch_loss_after"]
        assert abs(after - before) <= 1e-5 * abs(before), (e["step"], before, after)
