"""Exact resume: a run stopped by SIGTERM, SIGINT or SIGKILL at a (seeded) random point and
resumed ends exactly as the uninterrupted run: same widths, accuracies and final weights.

The interrupted runs are subprocesses whose signal comes from inside a chosen call (a training
batch, the optimizer step, the resizer, the renormalisation, the evaluation, the data loading
of the start, a checkpoint write), so it lands mid-step; the resumes run in-process.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdgrow
from svdgrow.app.checkpoint import load_checkpoint, load_teacher
from svdgrow.app.cli import main
from svdgrow.app.rundir import read_log

# Subprocesses import the svdgrow this test imported (the installed package in CI, the source
# tree with an in-place build in development), never the source folder by accident.
PKG_ROOT = Path(svdgrow.__file__).resolve().parents[1]
# 400 samples / 50 = 8 steps per epoch, 24 in all; resizes at steps 3, 6, 9, 12, 15
ARGS = [
    "train", "--preset", "quick", "--no-download", "--subset", "400", "--test-subset", "100",
    "--batch-size", "50", "--epochs", "3", "--resize-every", "3", "--target-params", "9000",
    "--shrink-steps", "12", "--resize-until", "0.7", "--threads", "1", "--seed", "3",
    "--no-progress", "--checkpoint-minutes", "0",
]  # fmt: skip

# (module, attribute, how many calls of it happen before the last epoch's end)
HOOKS = [
    ("svdgrow.app.data", "DeviceDataset.batch", 26),  # setup example, 24 train, 3 eval batches
    ("torch.optim", "SGD.step", 23),
    ("svdgrow.resizer", "Resizer.step", 5),
    ("svdgrow.app.loop", "renormalize_rows_", 5),
    ("svdgrow.app.loop", "evaluate", 2),
]

DRIVER = """
import importlib, os, sys
from svdgrow.app.cli import main
module, attr, nth, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
setattr(owner, name, hooked)
sys.exit(main(sys.argv[5:]))
"""


def _interrupted(
    run: Path, data_dir: Path, hook: tuple[str, str, int], sig: int, args: list[str] = ARGS
) -> int:
    module, attr, nth = hook
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT), "OMP_NUM_THREADS": "1"}
    argv = [*args, "--data-dir", str(data_dir), "--run-dir", str(run)]
    cmd = [sys.executable, "-c", DRIVER, module, attr, str(nth), str(int(sig)), *argv]
    out = subprocess.run(cmd, cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("resume") / "reference"
    assert main([*ARGS, "--data-dir", str(data_dir), "--run-dir", str(run)]) == 0
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    last = {}  # epoch -> its last event (a SIGKILLed session may have logged an epoch twice)
    for run in (a, b):
        last[run] = {e["epoch"]: e for e in read_log(run) if e["event"] == "epoch"}
    assert sorted(last[a]) == sorted(last[b]) == [1, 2, 3]
    for epoch, ea in last[a].items():
        eb = last[b][epoch]
        for key in ("step", "params", "widths", "test_acc", "test_loss", "train_acc", "train_loss",
                    "resize_checks"):  # fmt: skip
            assert ea[key] == eb[key], (epoch, key)
    ca, cb = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (a, b))
    assert ca["spec"] == cb["spec"] and ca["step"] == cb["step"] == 24
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "sig,seed", [(signal.SIGTERM, 0), (signal.SIGINT, 1)], ids=["SIGTERM", "SIGINT"]
)
def test_stop_signal_at_a_random_point_resumes_exactly(reference, data_dir, tmp_path, sig, seed):
    rng = random.Random(seed)
    module, attr, calls = rng.choice(HOOKS)
    hook = (module, attr, rng.randint(1, calls))
    run = tmp_path / "run"
    assert _interrupted(run, data_dir, hook, sig) == 128 + sig, hook
    events = read_log(run)
    stop = [e for e in events if e["event"] == "interrupted"]
    assert len(stop) == 1 and stop[0]["signal"] == signal.Signals(sig).name
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == stop[0]["step"] and ckpt["epoch"] == stop[0]["epoch"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    kinds = [e["event"] for e in read_log(run)]
    assert kinds.count("resume") == 1 and kinds[-1] == "end"
    _assert_same_run(reference, run)


def test_resumable_from_the_first_moment(reference, data_dir, tmp_path):
    """SIGTERM while the start loads its data: the run writes its step-0 checkpoint and
    config.json, stops, and resumes to the same end."""
    run = tmp_path / "run"
    code = _interrupted(run, data_dir, ("svdgrow.app.state", "load_dataset", 1), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert (run / "config.json").is_file()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 0
    assert [e["event"] for e in read_log(run)] == ["start", "interrupted"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)


def test_sigkill_during_a_checkpoint_write(reference, data_dir, tmp_path):
    """SIGKILL inside the third checkpoint write (epoch 2's end): the temp file it leaves is
    removed on resume, which restarts from epoch 1's checkpoint and ends the same."""
    run = tmp_path / "run"
    code = _interrupted(run, data_dir, ("torch", "save", 3), signal.SIGKILL)
    assert code == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob(".last.pt.*.tmp")], "no temp file was left to clean"
    assert load_checkpoint(ckpts / "last.pt")["epoch"] == 1
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]
    _assert_same_run(reference, run)


def test_distillation_teacher_survives_a_resume(data_dir, tmp_path):
    """--distill: the teacher taken at the first shrinking resize (step 9, after
    --shrink-start 6) is kept in the checkpoint, so a run stopped after it resumes exactly."""
    args = [*ARGS, "--distill", "0.5", "--shrink-start", "6"]
    reference = tmp_path / "reference"
    assert main([*args, "--data-dir", str(data_dir), "--run-dir", str(reference)]) == 0
    ckpt = load_checkpoint(reference / "checkpoints" / "last.pt")
    teacher = load_teacher(ckpt)
    start = next(e for e in read_log(reference) if e["event"] == "start")
    taken = [e for e in read_log(reference) if e["event"] == "teacher"]
    assert [e["step"] for e in taken] == [9] and taken[0]["params"] == start["params"]
    assert teacher is not None and sum(p.numel() for p in teacher.parameters()) == start["params"]
    assert not any(p.requires_grad for p in teacher.parameters())
    run = tmp_path / "run"
    hook = ("torch.optim", "SGD.step", 14)  # inside step 14: after the teacher, before epoch 2 ends
    assert _interrupted(run, data_dir, hook, signal.SIGTERM, args) == 128 + signal.SIGTERM
    assert load_teacher(load_checkpoint(run / "checkpoints" / "last.pt")) is not None
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)


def test_hold_on_grown_channels_survives_a_resume(data_dir, tmp_path):
    """--hold-grown: the holds on groups grown at the resizes before a stop are in the
    checkpoint, so a growing run with feature spectra stopped mid-way resumes exactly."""
    args = [*ARGS, "--start-scale", "0.5", "--spectrum", "features", "--hold-grown", "3"]
    reference = tmp_path / "reference"
    assert main([*args, "--data-dir", str(data_dir), "--run-dir", str(reference)]) == 0
    grows = [e for e in read_log(reference) if e["event"] == "resize" and
             any(d["action"] == "grow" for d in e.get("decisions", []))]  # fmt: skip
    assert grows, "the run never grew: the test would not exercise the hold"
    run = tmp_path / "run"
    hook = ("torch.optim", "SGD.step", 14)  # after the resizes of steps 3-12
    assert _interrupted(run, data_dir, hook, signal.SIGTERM, args) == 128 + signal.SIGTERM
    held = load_checkpoint(run / "checkpoints" / "last.pt")["extra"].get("held")
    assert held, "no hold in the checkpoint"
    assert all(n >= 1 for _, n in held.values())
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)


def test_resize_backoff_survives_a_resume(data_dir, tmp_path):
    """--resize-backoff: the step of the next check is in the checkpoint, so a run stopped
    while its checks are spaced out resumes with the same checks. The run (24 steps, checks
    every 3) is quiet from step 21 at the latest and checks there; how many of the checks before
    it changed something depends on float rounding (7 checks in all on one host, 6 on another),
    but either way the check of step 21 schedules the next one past the end of the run, where a
    resume that lost the schedule would check again at step 24."""
    args = [*ARGS, "--resize-until", "1", "--resize-backoff", "4"]
    reference = tmp_path / "reference"
    assert main([*args, "--data-dir", str(data_dir), "--run-dir", str(reference)]) == 0
    events = read_log(reference)
    assert [e["step"] for e in events if e["event"] == "resize"][-1] < 21
    checks = [e["resize_checks"] for e in events if e["event"] == "epoch"][-1]
    assert checks < 8, "every 3rd step was checked: the run never backed off"
    run = tmp_path / "run"
    hook = ("torch.optim", "SGD.step", 22)  # inside step 22: after the check of step 21
    assert _interrupted(run, data_dir, hook, signal.SIGTERM, args) == 128 + signal.SIGTERM
    assert load_checkpoint(run / "checkpoints" / "last.pt")["extra"]["next_check"] > 24
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)  # the same checks (resize_checks) in every epoch


def test_uniform_allocation_keeps_its_reference_widths_across_a_resume(data_dir, tmp_path):
    """Policy(allocation="uniform") cuts every group to one fraction of the widths the run
    started from: they are in the checkpoint, so a run stopped after two shrinking resizes
    resumes exactly (not against the widths it had when it stopped)."""
    args = [*ARGS, "--policy", '{"allocation": "uniform"}']
    reference = tmp_path / "reference"
    assert main([*args, "--data-dir", str(data_dir), "--run-dir", str(reference)]) == 0
    events = read_log(reference)
    start = next(e for e in events if e["event"] == "start")
    first = start["widths"]["groups"]
    final = [e for e in events if e["event"] == "resize"][-1]["widths"]["groups"]
    cut = {n: final[n] / w for n, w in first.items() if final[n] != w}
    assert len(cut) >= 3, "the uniform cut left most groups alone"
    assert max(cut.values()) - min(cut.values()) <= 1 / min(first[n] for n in cut) + 1e-9
    run = tmp_path / "run"
    hook = ("torch.optim", "SGD.step", 8)  # inside step 8: after the resizes of steps 3 and 6
    assert _interrupted(run, data_dir, hook, signal.SIGTERM, args) == 128 + signal.SIGTERM
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["extra"]["reference_widths"]
    assert saved == first
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)
