"""End to end: `svdgrow train` on a subset of MNIST with the `quick` preset, in-process.

Needs the datasets in ../shared/data (skipped with the reason when that folder is absent).
Kept small: the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from svdgrow.app.checkpoint import load_checkpoint, load_model
from svdgrow.app.cli import main
from svdgrow.app.data import DeviceDataset, load_dataset
from svdgrow.app.loop import evaluate
from svdgrow.app.rundir import read_log

TEST_SUBSET = 500
ARGS = [
    "train",
    "--dataset",
    "mnist",
    "--preset",
    "quick",
    "--no-download",
    "--subset",
    "1000",
    "--test-subset",
    str(TEST_SUBSET),
    "--batch-size",
    "50",
    "--epochs",
    "3",
    "--resize-every",
    "5",
    "--target-params",
    "8000",
    "--shrink-steps",
    "30",
    "--resize-until",
    "0.7",
    "--threads",
    "1",
    "--lr",
    "0.05",
    "--seed",
    "1",
    "--no-progress",
    "--checkpoint-minutes",
    "0",
]


def _events(run, kind):
    return [e for e in read_log(run) if e["event"] == kind]


@pytest.fixture(scope="module")
def args(data_dir):
    return [*ARGS, "--data-dir", str(data_dir)]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, args):
    run = tmp_path_factory.mktemp("e2e") / "run_a"
    assert main([*args, "--run-dir", str(run)]) == 0
    return run


def test_run_completes_and_shrinks(run_a):
    events = read_log(run_a)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    epochs = _events(run_a, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        for key in (
            "step",
            "params",
            "flops",
            "widths",
            "train_acc",
            "test_acc",
            "test_loss",
            "elapsed",
        ):
            assert key in e, key
        assert 0.0 <= e["test_acc"] <= 1.0
        phases = e["seconds_by_phase"]  # the time split: batches, steps, checks, evaluation
        assert {"data", "train", "eval"} <= set(phases) <= {"data", "train", "resize", "eval"}
        assert min(phases.values()) > 0
        assert sum(phases.values()) <= e["elapsed"]
    assert "resize" in epochs[0]["seconds_by_phase"]  # the shrink's checks ran in epoch 1
    resizes = _events(run_a, "resize")
    assert resizes, "no resize was logged"
    # a resize is logged only when it changed a width: every one carries its decisions, and
    # while the budget falls (step <= --shrink-steps 30) every one shrinks the net to the budget
    assert all(r["decisions"] for r in resizes)
    shrinking = [r for r in resizes if r["step"] <= 30]
    assert shrinking, "no resize during the budget schedule"
    for r in shrinking:
        assert r["params"] < r["params_before"] and r["params"] <= r["budget"], r["step"]
    start = events[0]["params"]
    assert epochs[-1]["params"] < start, "the parameter count did not fall"
    assert epochs[-1]["params"] <= 1.25 * 8000
    assert epochs[-1]["test_acc"] > 0.5  # learnt something on 1000 samples
    assert (run_a / "params_accuracy.png").is_file() and (run_a / "widths.png").is_file()
    assert json.loads((run_a / "final_spec.json").read_text()) == events[-1]["spec"]


def test_checkpoint_reloads_to_logged_accuracy(run_a, data_dir):
    model, ckpt = load_model(run_a / "checkpoints" / "last.pt")
    last = _events(run_a, "epoch")[-1]
    assert ckpt["step"] == last["step"] and ckpt["epoch"] == 3
    assert sum(p.numel() for p in model.parameters()) == last["params"]
    test = load_dataset("mnist", train=False, data_dir=data_dir, download=False, subset=TEST_SUBSET,
                        subset_seed=1)  # fmt: skip
    acc, loss = evaluate(model, test, 1000)
    assert acc == last["test_acc"]
    assert loss == pytest.approx(last["test_loss"], rel=1e-6)


def test_summary_and_plot_commands(run_a, capsys):
    assert main(["summary", str(run_a)]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "parameters" in out
    assert "time split:   batches " in out and ", resize checks " in out
    (run_a / "widths.png").unlink()
    assert main(["plot", str(run_a)]) == 0
    assert (run_a / "widths.png").is_file()


def test_resume_after_interrupt_matches_uninterrupted(run_a, args, tmp_path, monkeypatch):
    run_b = tmp_path / "run_b"
    real_batch = DeviceDataset.batch
    calls = {"n": 0}

    def interrupting_batch(self, index, augment=False, *args, **kwargs):
        if augment:  # training batches only
            calls["n"] += 1
            if calls["n"] == 28:  # mid epoch 2 (20 steps per epoch), after a few resizes
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: step 28 ends, then a checkpoint
        return real_batch(self, index, augment, *args, **kwargs)

    monkeypatch.setattr(DeviceDataset, "batch", interrupting_batch)
    assert main([*args, "--run-dir", str(run_b)]) == 130  # Ctrl-C: checkpoint, then stop
    monkeypatch.setattr(DeviceDataset, "batch", real_batch)
    ck = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert ck["step"] == 28 and ck["epoch"] == 1 and ck["extra"]["batch_in_epoch"] == 8
    assert main(["train", "--resume", str(run_b), "--no-progress"]) == 0
    kinds = [e["event"] for e in read_log(run_b)]
    assert "interrupted" in kinds and "resume" in kinds and kinds[-1] == "end"
    a, b = _events(run_a, "epoch"), _events(run_b, "epoch")
    assert [e["epoch"] for e in b] == [1, 2, 3]
    for ea, eb in zip(a, b, strict=True):
        assert ea["params"] == eb["params"] and ea["widths"] == eb["widths"]
        assert ea["test_acc"] == eb["test_acc"]
        assert ea["train_acc"] == pytest.approx(eb["train_acc"])
    sa = load_checkpoint(run_a / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(run_b / "checkpoints" / "last.pt")["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_baseline_from_run(run_a, tmp_path):
    run_c = tmp_path / "baseline"
    assert (
        main(["train", "--baseline-from", str(run_a), "--run-dir", str(run_c), "--no-progress"])
        == 0
    )
    final = json.loads((run_a / "final_spec.json").read_text())
    assert json.loads((run_c / "config.json").read_text())["start_spec"] == final
    epochs = _events(run_c, "epoch")
    assert len(epochs) == 3 and not _events(run_c, "resize")
    assert {e["params"] for e in epochs} == {_events(run_a, "epoch")[-1]["params"]}


def test_round_to_keeps_every_moved_width_on_a_multiple(args, tmp_path):
    run = tmp_path / "r8"
    assert main([*args, "--round-to", "4", "--run-dir", str(run)]) == 0
    assert '"round_to": 4' in (run / "config.json").read_text()
    start = _events(run, "start")[0]["widths"]["groups"]
    resizes = _events(run, "resize")
    assert resizes and resizes[-1]["params"] <= 8000
    for e in resizes:
        moved = {g: w for g, w in e["widths"]["groups"].items() if w != start[g]}
        assert moved and all(w % 4 == 0 for w in moved.values()), e["widths"]["groups"]


def test_round_after_shrink_aligns_every_width_when_the_schedule_ends(args, tmp_path):
    # free widths while the budget falls (steps 0-30), then one resize moves every group to a
    # multiple of 4 (down or up) within the budget, and the widths stay on multiples after it
    run = tmp_path / "r4end"
    assert main([*args, "--round-to", "4", "--round-after-shrink", "--run-dir", str(run)]) == 0
    assert '"round_after_shrink": true' in (run / "config.json").read_text()
    resizes = _events(run, "resize")
    during = [e["widths"]["groups"] for e in resizes if e["step"] <= 30]
    after = [e for e in resizes if e["step"] > 30]
    assert any(w % 4 for g in during for w in g.values()), during
    assert after, [e["step"] for e in resizes]
    for e in after:
        assert e["params"] <= 8000
        widths = {g: w for g, w in e["widths"]["groups"].items() if g not in ("input", "head")}
        assert all(w % 4 == 0 for w in widths.values()), e  # the fixed ends excepted
    reasons = " ".join(str(e) for e in after)
    assert "aligned to round_to=4" in reasons
