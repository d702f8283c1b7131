"""benchmarks/versus_shapes.py: the default recipe's cells against uniform narrowing read from
other frontier folders (other large networks), computed as frontier.py computes its own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

vs = load_benchmark("versus_shapes")
frontier = vs.frontier
RECIPE = frontier.RECIPE_METHOD["mnist"][0]


def _cell(root: Path, name: str, params: int, acc: float) -> None:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"params": params, "test_acc": acc, "elapsed": 1.0}))


def _folders(tmp_path):
    own, other_a, other_b = tmp_path / "own", tmp_path / "a", tmp_path / "b"
    for s, acc in enumerate((0.9940, 0.9944, 0.9942)):
        _cell(own, f"mnist-6000-{RECIPE}-s{s}", 5800 + 10 * s, acc)
    for s, (a, b) in enumerate(((0.9925, 0.9935), (0.9929, 0.9937))):
        _cell(own, f"mnist-6000-uniform-s{s}", 5400, a)
        _cell(own, f"mnist-6000-uniform2-s{s}", 6200, b)
    for s, acc in enumerate((0.9936, 0.9941)):  # another network's uniform sizes, two folders
        _cell(other_a, f"mnist-6000-uniform-s{s}", 5500, acc)
    for s, acc in enumerate((0.9939, 0.9945)):
        _cell(other_b, f"mnist-6000-uniform2-s{s}", 6300, acc)
    return own, other_a, other_b


def test_same_folder_reproduces_the_frontier_comparison(tmp_path):
    own, *_ = _folders(tmp_path)
    groups = vs.pooled_groups([own])
    [row] = vs.compare({"own": groups}, {"own": groups})
    params, _, diff, se, z, _ = frontier.versus_uniform(groups, "mnist", 6000, RECIPE)
    assert (row["params"], row["diff"], row["se"], row["z"]) == pytest.approx((params, diff, se, z))
    assert row["seeds"] == 3 and row["uniform_at"].endswith("(interpolated)")


def test_uniform_from_other_folders_is_pooled_and_interpolated(tmp_path):
    own, a, b = _folders(tmp_path)
    out = tmp_path / "vs"
    assert vs.main(["--searched", f"m={own}", "--uniform", f"m={own}", "--uniform", f"d={a}",
                    "--uniform", f"d={b}", "--out", str(out)]) == 0  # fmt: skip
    rows = {r["uniform"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    d = rows["d"]
    assert [s["params"] for s in d["uniform_sizes"]] == [5500, 6300]
    # log-linear between 5,500 (99.385) and 6,300 (99.42) at the recipe's mean 5,810
    w = math.log(5810 / 5500) / math.log(6300 / 5500)
    assert d["uniform_acc"] == pytest.approx((1 - w) * 99.385 + w * 99.42)
    assert d["diff"] == pytest.approx(99.42 - d["uniform_acc"])
    assert rows["m"]["diff"] > d["diff"]  # the other network's uniform narrowing is stronger here
    md = out.with_suffix(".md").read_text()
    assert md.startswith(f"Command: `python benchmarks/versus_shapes.py --searched m={own} ")
    assert (
        "| mnist | 6,000 | m | m1k | 3 | 5,810 | 99.42 ± 0.02 | d | 5,500: 99.38 (2); 6,300: 99.42 (2) | 99.40 | "
        in md
    )


def test_bad_arguments_say_what_to_do(tmp_path, capsys):
    own, a, _ = _folders(tmp_path)
    with pytest.raises(SystemExit, match="--uniform takes LABEL=DIR"):
        vs.main(["--searched", f"m={own}", "--uniform", str(a), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no runs/ folder"):
        vs.main(["--searched", f"m={tmp_path}", "--uniform", f"m={a}", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="in two folders of one label"):
        vs.pooled_groups([own, own])


def test_method_reads_a_variant_instead_of_the_recipe(tmp_path, capsys):
    own, a, _ = _folders(tmp_path)
    for s, acc in enumerate((0.9950, 0.9952)):  # a variant beside the recipe, in its own folder
        _cell(tmp_path / "v", f"mnist-6000-m1k8-s{s}", 5700, acc)
    groups = {"own": vs.pooled_groups([own]), "v": vs.pooled_groups([tmp_path / "v"])}
    rows = vs.compare(groups, {"d": vs.pooled_groups([a])}, {"v": "m1k8"})
    assert [(r["searched"], r["method"], r["seeds"]) for r in rows] == [
        ("own", RECIPE, 3), ("v", "m1k8", 2)]  # fmt: skip
    assert rows[1]["acc"] == pytest.approx(99.51)
    # a label without the method's cells gives no row (nor does v without its --method)
    assert vs.compare(groups, {"d": vs.pooled_groups([a])}, {"own": "m1k8"}) == []
    with pytest.raises(SystemExit):
        vs.main(["--searched", f"m={own}", "--uniform", f"d={a}", "--method", "x=m1k8",
                 "--out", str(tmp_path / "x")])  # fmt: skip
    assert "--method takes LABEL=METHOD with a LABEL given to --searched" in capsys.readouterr().err
