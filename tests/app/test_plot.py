"""Plots and summaries of a run folder, from a hand-written log and from committed old runs."""

import json
import shutil
from pathlib import Path

import pytest

from svdgrow.app.plot import format_summary, plot_run, summarize_run
from svdgrow.app.rundir import RunDirError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _write_run(run: Path) -> None:
    widths = {"layers": {"stem": 8, "head": 10}, "groups": {"stem": 8, "blocks.0.conv1": 16}}
    small = {"layers": {"stem": 6, "head": 10}, "groups": {"stem": 6, "blocks.0.conv1": 9}}
    events = [
        {"event": "start", "step": 0, "epoch": 0, "params": 1000, "elapsed": 0.0, "widths": widths},
        {"event": "resize", "step": 5, "params_before": 1000, "params": 700, "elapsed": 1.0,
         "widths": small},
        {"event": "epoch", "step": 10, "epoch": 1, "params": 700, "flops": 5000, "test_acc": 0.5,
         "train_acc": 0.4, "elapsed": 2.0, "widths": small,
         "seconds_by_phase": {"data": 0.25, "train": 1.0, "resize": 0.5, "eval": 0.125}},
        {"event": "epoch", "step": 20, "epoch": 2, "params": 700, "flops": 5000, "test_acc": 0.75,
         "train_acc": 0.7, "elapsed": 4.0, "widths": small,
         "seconds_by_phase": {"data": 0.25, "train": 1.0, "eval": 0.125}},
        {"event": "end", "step": 20, "epoch": 2, "params": 700, "elapsed": 4.5},
    ]  # fmt: skip
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    config = {"config": {"dataset": "mnist"}, "start_params": 1000}
    (run / "config.json").write_text(json.dumps(config))


def test_summary_of_a_run(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    s = summarize_run(run)
    assert s["dataset"] == "mnist" and s["finished"] and s["resizes"] == 1
    assert (s["start_params"], s["params"], s["epochs"], s["steps"]) == (1000, 700, 2, 20)
    assert (s["test_acc"], s["best_test_acc"], s["best_epoch"]) == (0.75, 0.75, 2)
    assert s["elapsed"] == 4.5
    text = format_summary(s)
    assert "1,000 -> 700" in text and "75.00%" in text and "finished" in text
    assert s["seconds_by_phase"] == {"data": 0.5, "train": 2.0, "resize": 0.5, "eval": 0.25}
    assert ("time split:   batches 0.5 s, steps 2.0 s, resize checks 0.5 s, evaluation 0.2 s, "
            "other 1.2 s") in text  # fmt: skip


def test_plot_writes_both_figures(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    written = plot_run(run)
    assert [p.name for p in written] == ["params_accuracy.png", "widths.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torn_last_line_is_skipped_but_a_corrupt_middle_line_names_file_and_line(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + '{"event": "epo')  # a crash mid-write
    assert summarize_run(run)["epochs"] == 2
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:-5]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match=r"log\.jsonl line 3 is not valid JSON"):
        summarize_run(run)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is this a run folder"):
        summarize_run(tmp_path)


@pytest.mark.parametrize("name", ["train_mnist_cpu/shrink", "train_fashion_cpu/scratch"])
def test_committed_old_runs_still_summarise_and_plot(tmp_path, name):
    run = tmp_path / "old"
    shutil.copytree(RESULTS / name, run)
    s = summarize_run(run)
    assert s["finished"] and s["epochs"] > 0 and s["params"] > 0 and 0 < s["test_acc"] <= 1
    assert len(plot_run(run)) == 2
