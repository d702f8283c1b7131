"""The GPU tools on the CPU (issue 13), so that they work the first time a GPU runs them:
benchmarks/gpu_syncs.py's counting and its attribution of a synchronisation to a stage of
``Resizer.step`` and to an svdgrow line (the sync warning raised by hand where CUDA would raise
it; on a GPU the same script counts the real ones), and benchmarks/gpu_check.sh's own flow
(its steps, deadline and summary) in its CPU dry-run mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

# bench_resize (imported by gpu_syncs) puts the repository root first on sys.path: undone, or
# processes spawned by later tests (tests/test_distributed.py) would import the source svdgrow,
# which has no compiled extension in a clean clone
_path = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    gpu_syncs = pytest.importorskip("gpu_syncs")  # needs torchvision (bench_resize's models)
finally:
    sys.path[:] = _path

from svdgrow import resizer  # noqa: E402

SYNC = "called a synchronizing CUDA operation"


@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the warm-up step's, uncounted
def test_sync_log_attributes_stage_and_line(monkeypatch):
    real = resizer.analyse_groups

    def analyse_groups(*a, **k):  # stands in for a .item() inside the analyse stage
        warnings.warn(SYNC, UserWarning, stacklevel=1)
        return real(*a, **k)

    monkeypatch.setattr(resizer, "analyse_groups", analyse_groups)
    out = gpu_syncs.step_syncs("mlp", torch.device("cpu"), 0.1)
    assert set(out) == set(gpu_syncs.br.MODES)
    weights = out["weights"]
    assert weights["syncs"] == 1 and weights["by_stage"] == {"analyse": 1}
    ((line, count),) = weights["by_line"]
    assert line.startswith("svdgrow/resizer.py:") and line.endswith("(_analyse)") and count == 1
    assert weights["groups_changed"] == 2  # the MLP's two hidden groups, pruned by 10%


def test_sync_log_ignores_other_warnings():
    with gpu_syncs.SyncLog(torch.device("cpu")) as log:
        warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn(SYNC, UserWarning, stacklevel=1)
    assert log.summary()["syncs"] == 1
    assert log.summary()["by_stage"] == {"outside": 1}


def test_main_writes_json_and_table(tmp_path):
    res = gpu_syncs.main(["--device", "cpu", "--models", "mlp", "--out", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s.json").read_text())["steps"]["mlp"]["data"]["syncs"] == 0
    md = (tmp_path / "s.md").read_text()
    assert "| mlp Resizer.step, weights (2 groups resized) | 0 |" in md
    assert set(res["ops"]) == {"batched_svd (full)", "batched_svd (k=8)", "slice_copy"}


def test_main_refuses_unknown_model(capsys):
    with pytest.raises(SystemExit):
        gpu_syncs.main(["--device", "cpu", "--models", "vgg"])
    assert "unknown model(s) vgg" in capsys.readouterr().err


def test_gpu_check_script_runs_its_flow_on_the_cpu(tmp_path):
    """``DEVICE=cpu SKIP_BUILD=1``: no build; ``STEPS`` picks one step, the others are not
    run; a step with under 20 s of the budget left is skipped and says so."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "SKIP_BUILD": "1", "STEPS": "syncs", "BUDGET": "15",
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}  # fmt: skip
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("syncs: skipped (") and lines[-1].startswith("total: ")
    assert len(lines) == 2  # pytest, the benchmarks and the trainings were not asked for
    assert "svdgrow imported from" in (tmp_path / "out" / "env.txt").read_text()
