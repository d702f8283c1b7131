"""End to end: `svdgrow train` on a subset of MNIST with the `quick` preset, in-process.

Needs the datasets in ../shared/data (skipped with the reason when that folder is absent),
except the missing-data test. Kept small: the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdgrow.app.checkpoint import load_checkpoint, load_model
from svdgrow.app.cli import main
from svdgrow.app.data import DeviceDataset, load_dataset
from svdgrow.app.loop import evaluate, read_log

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "MNIST" / "raw").is_dir(),
    reason=f"MNIST not found in {DATA} (the shared dataset folder); these tests train on it",
)

TEST_SUBSET = 500
ARGS = [
    "train", "--dataset", "mnist", "--preset", "quick", "--data-dir", str(DATA), "--no-download",
    "--subset", "1000", "--test-subset", str(TEST_SUBSET), "--batch-size", "50", "--epochs", "3",
    "--resize-every", "5", "--target-params", "8000", "--shrink-steps", "30", "--resize-until", "0.7",
    "--threads", "1",
    "--lr", "0.05", "--seed", "1", "--no-progress", "--checkpoint-minutes", "0",
]


def _events(run, kind):
    return [e for e in read_log(run) if e["event"] == kind]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found in {DATA}")
    run = tmp_path_factory.mktemp("e2e") / "run_a"
    assert main(ARGS + ["--run-dir", str(run)]) == 0
    return run


@needs_data
def test_run_completes_and_shrinks(run_a):
    events = read_log(run_a)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    epochs = _events(run_a, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        for key in ("step", "params", "flops", "widths", "train_acc", "test_acc", "test_loss", "elapsed"):
            assert key in e, key
        assert 0.0 <= e["test_acc"] <= 1.0
    resizes = _events(run_a, "resize")
    assert resizes, "no resize was logged"
    assert all(r["decisions"] and r["params"] != r["params_before"] or r["decisions"] for r in resizes)
    start = events[0]["params"]
    assert epochs[-1]["params"] < start, "the parameter count did not fall"
    assert epochs[-1]["params"] <= 1.25 * 8000
    assert epochs[-1]["test_acc"] > 0.5  # learnt something on 1000 samples
    assert (run_a / "params_accuracy.png").is_file() and (run_a / "widths.png").is_file()
    assert json.loads((run_a / "final_spec.json").read_text()) == events[-1]["spec"]


@needs_data
def test_checkpoint_reloads_to_logged_accuracy(run_a):
    model, ckpt = load_model(run_a / "checkpoints" / "last.pt")
    last = _events(run_a, "epoch")[-1]
    assert ckpt["step"] == last["step"] and ckpt["epoch"] == 3
    assert sum(p.numel() for p in model.parameters()) == last["params"]
    test = load_dataset("mnist", False, "cpu", DATA, download=False, subset=TEST_SUBSET, subset_seed=1)
    acc, loss = evaluate(model, test, 1000)
    assert acc == last["test_acc"]
    assert loss == pytest.approx(last["test_loss"], rel=1e-6)


@needs_data
def test_summary_and_plot_commands(run_a, capsys):
    assert main(["summary", str(run_a)]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "parameters" in out
    (run_a / "widths.png").unlink()
    assert main(["plot", str(run_a)]) == 0
    assert (run_a / "widths.png").is_file()


@needs_data
def test_resume_after_interrupt_matches_uninterrupted(run_a, tmp_path, monkeypatch):
    run_b = tmp_path / "run_b"
    real_batch = DeviceDataset.batch
    calls = {"n": 0}

    def interrupting_batch(self, index, augment=False, *args, **kwargs):
        if augment:  # training batches only
            calls["n"] += 1
            if calls["n"] == 28:  # mid epoch 2 (20 steps per epoch), after a few resizes
                raise KeyboardInterrupt
        return real_batch(self, index, augment, *args, **kwargs)

    monkeypatch.setattr(DeviceDataset, "batch", interrupting_batch)
    assert main(ARGS + ["--run-dir", str(run_b)]) == 130  # Ctrl-C: checkpoint, then stop
    monkeypatch.setattr(DeviceDataset, "batch", real_batch)
    ck = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert ck["step"] == 27 and ck["epoch"] == 1 and ck["extra"]["batch_in_epoch"] == 7
    assert main(["train", "--resume", str(run_b), "--no-progress"]) == 0
    kinds = [e["event"] for e in read_log(run_b)]
    assert "interrupted" in kinds and "resume" in kinds and kinds[-1] == "end"
    a, b = _events(run_a, "epoch"), _events(run_b, "epoch")
    assert [e["epoch"] for e in b] == [1, 2, 3]
    for ea, eb in zip(a, b):
        assert ea["params"] == eb["params"] and ea["widths"] == eb["widths"]
        assert ea["test_acc"] == eb["test_acc"]
        assert ea["train_acc"] == pytest.approx(eb["train_acc"])
    sa = load_checkpoint(run_a / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(run_b / "checkpoints" / "last.pt")["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@needs_data
def test_baseline_from_run(run_a, tmp_path):
    run_c = tmp_path / "baseline"
    assert main(["train", "--baseline-from", str(run_a), "--run-dir", str(run_c), "--no-progress"]) == 0
    final = json.loads((run_a / "final_spec.json").read_text())
    assert json.loads((run_c / "config.json").read_text())["start_spec"] == final
    epochs = _events(run_c, "epoch")
    assert len(epochs) == 3 and not _events(run_c, "resize")
    assert {e["params"] for e in epochs} == {_events(run_a, "epoch")[-1]["params"]}


def test_missing_data_error_names_every_place(tmp_path, capsys):
    empty = tmp_path / "nowhere"
    code = main(["train", "--preset", "quick", "--data-dir", str(empty), "--no-download",
                 "--run-dir", str(tmp_path / "run"), "--no-progress", "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty.resolve() / "MNIST" / "raw") in err
    assert "--data-dir" in err and "SVDGROW_DATA" in err and "--no-download" in err


def test_missing_data_default_search_lists_all_roots(tmp_path, monkeypatch):
    from svdgrow.app import data as data_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SVDGROW_DATA", str(tmp_path / "envdir"))
    monkeypatch.setattr(data_mod, "find_root", lambda *a, **k: None)
    with pytest.raises(data_mod.DataNotFoundError) as info:
        data_mod.load_dataset("fashion-mnist", False, download=False)
    msg = str(info.value)
    assert str(tmp_path / "envdir" / "FashionMNIST" / "raw") in msg
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert "shared" in msg


def test_random_shift_is_a_shift_with_plain_strides():
    from svdgrow.app.data import random_shift

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 255, (64, 1, 12, 12), dtype=torch.uint8)
    out = random_shift(imgs, 2, g)
    # plain NCHW strides (channels-last strides once crashed oneDNN's conv backward)
    assert out.shape == imgs.shape and out.stride() == (144, 144, 12, 1)
    pad = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    for i in range(64):  # each output is some 12x12 window of the zero-padded image
        hits = [
            (dy, dx) for dy in range(5) for dx in range(5)
            if torch.equal(pad[i, :, dy:dy + 12, dx:dx + 12], out[i])
        ]
        assert hits, i
    assert len({tuple(out[i].flatten()[:20].tolist()) for i in range(64)}) > 1


def test_renormalize_bn_convs_keeps_function_and_rescales_rows():
    import copy

    from svdgrow.app.models import build_model, preset_spec
    from svdgrow.app.loop import renormalize_bn_convs_, row_norm_snapshot

    torch.manual_seed(0)
    model = build_model(preset_spec("quick"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 1, 28, 28)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    conv = model.blocks[0].conv2
    with torch.no_grad():  # inflate one layer's rows, as folding does
        conv.weight.mul_(50.0)
        model.blocks[0].bn2.running_var.mul_(2500.0)
        model.blocks[0].bn2.running_mean.mul_(50.0)
    mom = opt.state[conv.weight]["momentum_buffer"].clone()
    snap = row_norm_snapshot(model)
    target = snap["blocks.0.conv2"][1] / 50.0
    snap = {"blocks.0.conv2": ((0,), target)}  # as if its shape had changed
    ref = copy.deepcopy(model)
    applied = renormalize_bn_convs_(model, opt, snap)
    assert set(applied) == {"blocks.0.conv2"}
    rows = conv.weight.reshape(conv.weight.shape[0], -1).norm(dim=1)
    torch.testing.assert_close(rows, torch.full_like(rows, target), rtol=1e-5, atol=0)
    c = rows / ref.blocks[0].conv2.weight.reshape(rows.shape[0], -1).norm(dim=1)
    torch.testing.assert_close(opt.state[conv.weight]["momentum_buffer"], mom / c.view(-1, 1, 1, 1))
    ref.train(), model.train()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)  # BN in train mode: same function
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
