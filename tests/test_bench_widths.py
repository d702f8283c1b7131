"""benchmarks/bench_widths.py: rounding a spec's widths, and the table it writes."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark

bw = load_benchmark("bench_widths")

SPEC = {"arch": "resnet", "in_channels": 1, "num_classes": 10, "input_size": 28, "bn": True,
        "stem": 5, "blocks": [{"mid": 13, "out": 11, "stride": 2, "projection": True}]}  # fmt: skip


def test_rounded_goes_to_the_nearest_multiple_never_below_it():
    r = bw.rounded(SPEC, 8)
    assert (r["stem"], r["blocks"][0]["mid"], r["blocks"][0]["out"]) == (8, 16, 8)
    assert SPEC["stem"] == 5  # the original is left alone
    assert bw.rounded(SPEC, 1) == SPEC


def test_main_times_each_network_as_found_and_rounded(tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps(SPEC))
    res = bw.main(["--spec", str(path), "--round-to", "4", "8", "--steps", "1", "--repeats", "1",
                   "--batch", "4", "--out", str(tmp_path / "out")])  # fmt: skip
    rows = res["rows"]
    assert [r["round_to"] for r in rows] == [None, 4, 8]
    assert rows[0]["vs_as_found"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert rows[2]["widths"] == "8 | 16/8" and rows[0]["params"] != rows[2]["params"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["rows"] == rows and saved["device"]
    assert "| net | 8 | 16/8 | 8 |" in (tmp_path / "out.md").read_text()


def test_a_missing_run_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bw.main(["--runs", str(tmp_path / "nowhere")])
    assert "no such spec file" in capsys.readouterr().err
