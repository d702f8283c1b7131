"""`svdgrow train` under torchrun: 2 CPU processes (gloo) on a subset of MNIST, quick preset.

- a run with several resizes: after every resize both ranks' checksums of every parameter,
  buffer and optimizer-state tensor are equal (logged by the run, checked here), the loss falls,
  the global batch is in the config;
- a failure injected on rank 1 inside a resize: both ranks end at once (exit 1, one line naming
  rank 1 and the error), `torchrun --max-restarts 1` restarts them, the restart resumes from the
  last checkpoint and ends bit-identical to the uninterrupted run;
- a resume on another number of processes is refused in one line (exit 2);
- `--compile` (aot_eager: dynamo and AOTAutograd without code generation, quick on the CPU),
  on one process and on two (the compiled DDP wrapper is dropped and compiled again after
  every change).

Each torchrun costs ~10 s of process start-up; the file runs in about 80 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import svdgrow
from svdgrow.app.checkpoint import load_checkpoint
from svdgrow.app.cli import main
from svdgrow.app.rundir import read_json, read_log

# Subprocesses import the svdgrow this test imported (the installed package in CI, the source
# tree with an in-place build in development), never the source folder by accident.
PKG_ROOT = Path(svdgrow.__file__).resolve().parents[1]
TIMEOUT = 120  # --dist-timeout: a rank that hung would keep the others this long
# 1000 samples / (2 x 25) = 20 steps per epoch, 60 in all; resizes at 5, 10, ..., 40
ARGS = [
    "train", "--preset", "quick", "--no-download", "--subset", "1000", "--test-subset", "500",
    "--batch-size", "25", "--epochs", "3", "--resize-every", "5", "--target-params", "8000",
    "--shrink-steps", "30", "--resize-until", "0.7", "--threads", "1", "--seed", "1",
    "--no-progress", "--checkpoint-minutes", "0", "--dist-timeout", str(TIMEOUT),
]  # fmt: skip

# rank 1 fails inside its 5th structural resize (step 25, in epoch 2), on the first attempt only
DRIVER = """
import os, sys
import svdgrow.distributed as d
from svdgrow.app.cli import main
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    real, calls = d._resize_structurally, [0]
    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise ValueError("injected failure")
        return real(*args, **kwargs)
    d._resize_structurally = failing
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(*argv: str, restarts: int = 0) -> subprocess.CompletedProcess:
    # one compile thread per rank: no inductor worker pool in the children (a rank once died
    # with "terminate called without an active exception" under --compile on the loaded CI box)
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--max-restarts", str(restarts), *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_log(run) if e["event"] == kind]


@pytest.fixture(scope="module")
def args(data_dir) -> list[str]:
    return [*ARGS, "--data-dir", str(data_dir)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, args) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    out = _torchrun("-m", "svdgrow", *args, "--run-dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_every_resize_leaves_both_ranks_identical(ddp_run):
    resizes = _events(ddp_run, "resize")
    assert len(resizes) >= 4, "too few resizes to test"
    for e in resizes:
        assert len(e["checksums"]) == 2 and e["checksums"][0] == e["checksums"][1], e["step"]
        assert e["sync_seconds"] >= 0
    assert resizes[-1]["params"] < resizes[0]["params_before"]


def test_the_loss_falls_and_the_global_batch_is_recorded(ddp_run):
    epochs = _events(ddp_run, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["test_acc"] > 0.5
    record = read_json(ddp_run / "config.json")
    assert record["config"]["world_size"] == 2 and record["global_batch_size"] == 50
    start = _events(ddp_run, "start")[0]
    assert start["world_size"] == 2 and start["backend"] == "gloo"
    assert start["steps_per_epoch"] == 20  # 1000 samples / (25 x 2)


def test_a_failed_rank_ends_both_then_the_restart_resumes(ddp_run, args, tmp_path):
    run = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    t0 = time.perf_counter()
    out = _torchrun(str(driver), *args, "--run-dir", str(run), restarts=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.perf_counter() - t0 < TIMEOUT, "a rank waited for the collective timeout"
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("svdgrow: error:")]
    assert len(lines) == 2, out.stderr[-3000:]  # one line from each rank
    for rank, line in enumerate(sorted(lines)):
        assert line.startswith(f"svdgrow: error: rank {rank}: the resize at step 25 failed")
        assert "rank 1: ValueError: injected failure" in line
        assert "keeps its last checkpoint (step 20)" in line
    kinds = [e["event"] for e in read_log(run)]
    assert kinds.count("failed") == 1 and kinds[-1] == "end"
    resume = _events(run, "resume")
    assert len(resume) == 1 and resume[0]["step"] == 20 and resume[0]["restart"] == 1
    # the restarted run ends as the uninterrupted one: same widths, accuracy, weights
    a, b = _events(ddp_run, "epoch")[-1], _events(run, "epoch")[-1]
    for key in ("step", "params", "widths", "test_acc", "test_loss"):
        assert a[key] == b[key], key
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
    ca, cb = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (ddp_run, run))
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=0, atol=0, msg=k)


def test_resume_on_another_number_of_processes_is_refused(ddp_run, capsys):
    assert main(["train", "--resume", str(ddp_run), "--epochs", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "on 1 process(es): it trained on 2 (global batch 50 = 25 x 2)" in err
    assert "torchrun --nproc_per_node 2 -m svdgrow train --resume" in err


#: A rank of a torch.compile'd run under torchrun (gloo, two ranks on this 2-core box) has
#: aborted in 2 of ~10 full-suite runs while compiling, before any resize: std::terminate in a
#: torch thread, not an svdgrow error (no Python traceback; see docs/TEAM_NOTES.md). Only that
#: exact failure is retried, once, in a fresh run folder.
_UPSTREAM_ABORT = "terminate called without an active exception"


def test_compile_under_torchrun(args, tmp_path):
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        argv = [*args, "--compile", "aot_eager", "--run-dir", str(run), "--epochs", "1",
                "--subset", "500", "--resize-every", "3", "--shrink-steps", "6"]  # fmt: skip
        out = _torchrun("-m", "svdgrow", *argv)
        if out.returncode == 0 or _UPSTREAM_ABORT not in out.stderr or attempt == 1:
            break
        warnings.warn(f"a rank aborted ({_UPSTREAM_ABORT}); retrying", stacklevel=1)
    assert out.returncode == 0, out.stderr[-3000:]
    resizes = _events(run, "resize")
    assert len(resizes) >= 2
    assert all(e["checksums"][0] == e["checksums"][1] for e in resizes)


def test_compile(args, tmp_path):
    run = tmp_path / "run"
    argv = [*args, "--compile", "aot_eager", "--run-dir", str(run), "--subset", "400",
            "--epochs", "1", "--batch-size", "50", "--resize-every", "3", "--shrink-steps", "6",
            "--resize-until", "0.8"]  # fmt: skip
    assert main(argv) == 0
    resizes = _events(run, "resize")
    assert len(resizes) >= 2
    epochs = _events(run, "epoch")
    assert epochs[-1]["params"] == resizes[-1]["params"] and epochs[-1]["test_acc"] > 0.2
    assert read_json(run / "config.json")["config"]["compile"] == "aot_eager"
