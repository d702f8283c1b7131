"""benchmarks/frontier.py's bookkeeping: the uniform sizes that bracket a target, the
interpolated comparison, results read back from run folders, cells claimed by lock files."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark

from svdgrow.app.config import RECIPES, TrainConfig
from svdgrow.app.models import count_params, narrow_spec, preset_spec

frontier = load_benchmark("frontier")
_PATH = BENCHMARKS / "frontier.py"


@pytest.mark.parametrize("target", [3000, 5815, 12000])
def test_other_side_brackets_the_target(target):
    base = preset_spec("mnist-2m")
    near = count_params(narrow_spec(base, target)[0])
    other = count_params(frontier.other_side(base, target))
    assert min(near, other) <= target <= max(near, other)
    assert near != other


def test_uniform_at_interpolates_in_log_params():
    a, b = (1000.0, 99.0, 0.01, 3), (2000.0, 99.4, 0.04, 3)
    acc, var, label = frontier.uniform_at([b, a], math.sqrt(1000 * 2000))  # halfway in log
    assert acc == pytest.approx(99.2) and var == pytest.approx(0.25 * 0.01 + 0.25 * 0.04)
    assert "interpolated" in label
    acc, var, _ = frontier.uniform_at([a, b], 5000.0)  # outside: the nearest size
    assert (acc, var) == (99.4, 0.04)


def _cell(root: Path, name: str, params: int, acc: float) -> None:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"params": params, "test_acc": acc, "elapsed": 10.0,
                                             "start_params": params, "flops": 1}))  # fmt: skip


def test_results_tables_and_comparison(tmp_path):
    _cell(tmp_path, "fashion-mnist-60000-midlong-s0", 59000, 0.931)
    _cell(tmp_path, "fashion-mnist-60000-midlong-s1", 58000, 0.933)
    _cell(tmp_path, "fashion-mnist-60000-uniform-s0", 57000, 0.925)
    _cell(tmp_path, "fashion-mnist-60000-uniform-s1", 57000, 0.927)
    d = tmp_path / "runs" / "fashion-mnist-60000-uniform-s1"
    (d / "cell.json").write_text(json.dumps({**json.loads((d / "cell.json").read_text()),
                                             "commit": "abc1234"}))  # fmt: skip
    (tmp_path / "runs" / "mnist-3000-mid-s0").mkdir()  # unfinished: no cell.json
    results = frontier.load_results(tmp_path)
    assert sorted(results) == [("fashion-mnist", 60000, "midlong", 0),
                               ("fashion-mnist", 60000, "midlong", 1),
                               ("fashion-mnist", 60000, "uniform", 0),
                               ("fashion-mnist", 60000, "uniform", 1)]  # fmt: skip
    meta = {"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "epochs": 1, "threads": 1}
    frontier.write_tables(tmp_path, results, meta)
    table = (tmp_path / "frontier.md").read_text()
    row = next(line for line in table.splitlines() if "| midlong | 58,500 |" in line)
    assert "+0.600" in row  # 93.2 - 92.6 (uniform's only size: the nearest)
    assert "commits the cells ran: abc1234 (3 older cells did not record theirs)" in table
    assert json.loads((tmp_path / "frontier.json").read_text())["cells"][0]["params"] == 59000


def test_uniform_cells_keep_the_network_of_their_first_seeds(tmp_path):
    """Once a budget's uniform spec is written, later seeds train that network, whatever the
    --match runs of this invocation ended at (a new seed alone would re-match to its size)."""
    args = SimpleNamespace(out=str(tmp_path), match="midlong", shrink_flags="", variant={},
                           methods=["midlong", "uniform", "uniform2"], seeds=[5])  # fmt: skip
    key = ("mnist", 6000)
    results = {(*key, "midlong", 5): {"params": 6150}}
    first = frontier.cell_extra(args, "uniform", *key, results=results)
    assert first[0] == "--spec" and count_params(json.loads(Path(first[1]).read_text())) == 6198
    written = Path(first[1])
    written.write_text(json.dumps(narrow_spec(preset_spec("mnist-2m"), 5300)[0]))  # seeds 0-2's
    again = frontier.cell_extra(args, "uniform", *key, results=results)
    assert again == ["--spec", str(written)]
    assert count_params(json.loads(written.read_text())) == 5362


def test_preset_spec_replaces_the_large_network_of_every_method(tmp_path):
    """``--preset-spec``: the variants start from that spec and uniform narrowing narrows it
    (not the dataset's preset); without it the preset is used as before."""
    deeper = preset_spec("mnist-2m")
    deeper["blocks"].append({"mid": 128, "out": 256, "stride": 2, "projection": True})
    path = tmp_path / "d4.json"
    path.write_text(json.dumps(deeper))
    key = ("mnist", 6000)
    results = {(*key, "m1k", 0): {"params": 5500}}

    def args(preset_spec_file):
        return SimpleNamespace(out=str(tmp_path / "out"), match="m1k", shrink_flags="",
                               variant={"m1k": "--start-scale 4"}, methods=["m1k", "uniform"],
                               seeds=[0], preset_spec=preset_spec_file)  # fmt: skip

    run = frontier.cell_extra(args(str(path)), "m1k", *key, results=results)
    assert run[:2] == ["--spec", str(path)] and run[-2:] == ["--start-scale", "4"]
    uni = frontier.cell_extra(args(str(path)), "uniform", *key, results=results)
    narrowed = json.loads(Path(uni[1]).read_text())
    assert len(narrowed["blocks"]) == 4 and narrowed == narrow_spec(deeper, 5500)[0]
    assert frontier.cell_extra(args(None), "m1k", *key, results=results)[:2] == [
        "--preset", "mnist-2m"]  # fmt: skip


def test_a_copy_without_the_match_method_matches_its_finished_runs(tmp_path):
    """A copy started with ``--methods uniform2`` alone (the match runs finished by another
    copy) brackets the same target as the copy that ran them; it used to match the budget and
    wrote the uniform network again as uniform2 (session 14)."""
    key = ("mnist", 6000)
    results = {(*key, "m1k", s): {"params": p} for s, p in enumerate([5907, 5444, 5536])}

    def copy(methods):
        return SimpleNamespace(out=str(tmp_path), match="m1k", shrink_flags="", variant={},
                               methods=methods, seeds=[0, 1, 2])  # fmt: skip

    assert frontier.match_target(copy(["m1k", "uniform"]), *key, results) == 5629
    assert frontier.match_target(copy(["uniform2"]), *key, results) == 5629
    assert frontier.match_target(copy(["uniform2"]), *key, {}) == 6000
    assert frontier.match_target(copy(["m1k", "uniform"]), *key, {}) is None
    first = frontier.cell_extra(copy(["m1k", "uniform"]), "uniform", *key, results=results)
    second = frontier.cell_extra(copy(["uniform2"]), "uniform2", *key, results=results)
    sizes = [count_params(json.loads(Path(a[1]).read_text())) for a in (first, second)]
    assert sizes == [5362, 6198]


def test_uniform2_sits_beside_the_kept_uniform_network(tmp_path):
    """Matched to a target on the other side of the kept uniform network (another copy's
    seeds), uniform2 is still that network's neighbour on the target's side, never the network
    itself (the plain bracket of 6,000 is 6,198 and 5,362, i.e. the uniform network again)."""
    key = ("mnist", 6000)
    args = SimpleNamespace(out=str(tmp_path), match="m1k", shrink_flags="", variant={},
                           methods=["uniform", "uniform2"], seeds=[0])  # fmt: skip
    first = frontier.cell_extra(args, "uniform", *key, results={(*key, "m1k", 0): {"params": 5629}})
    assert count_params(json.loads(Path(first[1]).read_text())) == 5362
    second = frontier.cell_extra(
        args, "uniform2", *key, results={(*key, "m1k", 0): {"params": 6000}}
    )
    assert count_params(json.loads(Path(second[1]).read_text())) == 6198
    assert count_params(frontier.other_side(preset_spec("mnist-2m"), 6000)) == 5362
    low = frontier.other_side(preset_spec("mnist-2m"), 5000, json.loads(Path(first[1]).read_text()))
    assert count_params(low) < 5362


def test_a_claimed_cell_is_busy(tmp_path):
    run = tmp_path / "runs" / "mnist-3000-mid-s0"
    run.parent.mkdir(parents=True)
    assert not frontier._claimed(run)
    with open(run.parent / f".{run.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert frontier._claimed(run)
        assert frontier.run_cell(["false"], run, tmp_path / "log") == "busy"
    assert not frontier._claimed(run)


def test_queue_file_stages(tmp_path):
    """benchmarks/frontier_queue.py: one stage per line, comments and blank lines skipped,
    quoted --variant flags kept whole; and the committed queue parses into frontier's CLI."""
    queue = load_benchmark("frontier_queue")
    f = tmp_path / "q.txt"
    f.write_text(
        '# a comment\n\n--budgets 3000 --variant "a=--x 1 --y 2" --seeds 0\n  # indented\n'
    )
    assert queue.read_queue(f) == [
        ["--budgets", "3000", "--variant", "a=--x 1 --y 2", "--seeds", "0"]
    ]
    stages = queue.read_queue(_PATH.parent / "frontier_queue.txt")
    assert stages and all("--dataset" in s and "--methods" in s for s in stages)
    assert all(
        v.count("=") >= 1 for s in stages for i, v in enumerate(s) if s[i - 1] == "--variant"
    )


def test_queue_stops_when_a_stage_fails_at_once(tmp_path, monkeypatch, capsys):
    """A stage whose copy dies at once (here: an unknown flag) stops the queue with the log
    named, rather than the next stage starting beside the other copy."""
    queue = load_benchmark("frontier_queue")
    monkeypatch.setattr(queue, "running_copies", lambda: 0)
    f = tmp_path / "q.txt"
    f.write_text("--no-such-flag 1\n--dataset mnist --budgets 3000 --methods uniform\n")
    log = tmp_path / "runs.log"
    assert queue.main([str(f), "--log", str(log), "--poll", "60"]) == 1
    printed = capsys.readouterr()
    assert "stage 0 copy 1 failed at once (exit status 2)" in printed.err
    assert str(log) in printed.err
    assert "unrecognized arguments: --no-such-flag" in log.read_text()
    assert "stage 0 copy 1" in printed.out and "stage 0 copy 2" not in printed.out
    assert "stage 1" not in printed.out


def test_found_cells_name_their_source(tmp_path):
    """``found`` retrains the --match method's seed-0 widths; ``found-NAME`` those of NAME, and
    neither can run before its source has finished."""
    args = SimpleNamespace(out=str(tmp_path), match="midlong", shrink_flags="", variant={},
                           methods=["found", "found-feat"])  # fmt: skip
    key = ("fashion-mnist", 60000)
    assert frontier.cell_extra(args, "found-feat", *key, results={}) is None
    results = {(*key, "feat", 0): {}, (*key, "midlong", 0): {}}
    feat = frontier.cell_extra(args, "found-feat", *key, results=results)
    assert feat == ["--baseline-from", str(tmp_path / "runs" / "fashion-mnist-60000-feat-s0")]
    match = frontier.cell_extra(args, "found", *key, results=results)
    assert match == ["--baseline-from", str(tmp_path / "runs" / "fashion-mnist-60000-midlong-s0")]


def test_cells_import_the_svdgrow_of_the_benchmark_not_of_the_working_directory(tmp_path):
    # a frozen checkout on PYTHONPATH must be what the cells run, even when they are started
    # from a repository root whose svdgrow/ is being edited
    decoy = tmp_path / "svdgrow"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the working-directory svdgrow')\n")
    (decoy / "__main__.py").write_text("")
    out = subprocess.run([*frontier.SVDGROW, "train", "--help"], cwd=tmp_path, env=os.environ,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--target-params" in out.stdout


def test_tables_are_written_before_any_cell_has_finished(tmp_path):
    # a second copy on a fresh --out finds the only cell claimed and writes the tables of
    # nothing: the tables say so, and no plot is drawn (it used to raise in matplotlib)
    frontier.write_tables(tmp_path, {}, {"machine": {"cpu": "x", "cores": 2, "torch": "t"},
                                         "epochs": 1, "threads": 1})  # fmt: skip
    assert "none: no cell ran a dataset's default recipe" in (tmp_path / "frontier.md").read_text()
    assert not (tmp_path / "frontier.png").exists()


def test_recipe_table_leads_with_the_default_recipe(tmp_path):
    recipe = frontier.RECIPE_METHOD["mnist"][0]
    _cell(tmp_path, f"mnist-6000-{recipe}-s0", 5800, 0.995)
    _cell(tmp_path, f"mnist-6000-{recipe}-s1", 5800, 0.993)
    _cell(tmp_path, "mnist-6000-late-s0", 5800, 0.990)  # not the recipe: not in the headline
    _cell(tmp_path, "mnist-6000-uniform-s0", 5800, 0.990)
    _cell(tmp_path, "mnist-6000-uniform-s1", 5800, 0.992)
    _cell(tmp_path, "mnist-6000-tp-s0", 5900, 0.985)
    frontier.write_tables(tmp_path, frontier.load_results(tmp_path),
                          {"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "epochs": 1,
                           "threads": 1})  # fmt: skip
    table = (tmp_path / "frontier.md").read_text()
    head = table[table.index("default recipe") : table.index("Against uniform")]
    rows = [line for line in head.splitlines() if line.startswith("| mnist")]
    assert len(rows) == 1 and f"| {recipe} | 2 | 5,800 | 99.40 ± 0.14 |" in rows[0]
    assert "+0.30 (+2.1 SE)" in rows[0]  # 99.4 - 99.1, SE sqrt(0.02 / 2 + 0.02 / 2)
    assert "98.50 (1 seed)" in rows[0]


def test_time_ratio_uses_the_recorded_machine_speed():
    fast = {"elapsed": 100.0, "ref_s": 1.0}  # a run on a host twice as fast ...
    slow = {"elapsed": 200.0, "ref_s": 2.0}  # ... as this one: the same work
    assert frontier.time_ratio([fast], [[slow]]) == "1.00†"
    assert frontier.time_ratio([{"elapsed": 100.0}], [[slow]]) == "0.50*"  # raw, marked
    assert frontier.time_ratio([{**fast, "elapsed": 130.0}], [[slow], [slow]]) == "1.30†"
    # cells without a recorded speed are left out where both sides have timed ones
    assert frontier.time_ratio([fast, {"elapsed": 999.0}], [[slow]]) == "1.00†"


def test_time_ratio_prefers_wall_times_within_sittings():
    a = [{"elapsed": 120.0, "ref_s": 3.0, "commit": "c1"}, {"elapsed": 150.0, "commit": "c2"},
         {"elapsed": 170.0, "commit": "c2"}, {"elapsed": 999.0, "commit": "c3"}]  # fmt: skip
    u = [[{"elapsed": 100.0, "ref_s": 1.0, "commit": "c1"}, {"elapsed": 200.0, "commit": "c2"}],
         [{"elapsed": 50.0, "commit": "c4"}]]  # fmt: skip
    # c1: 1.2 (1 cell), c2: 160 / 200 = 0.8 (2 cells); c3 and c4 have one side only
    assert frontier.sitting_ratio(a, u) == (pytest.approx((1.2 + 2 * 0.8) / 3), 2)
    assert frontier.time_ratio(a, u) == "0.93"
    assert frontier.sitting_ratio(a[3:], u) is None
    # a cell marked timing_excluded (its cores were shared) takes no part: c2 is then 150 / 200
    a[2]["timing_excluded"] = "a benchmark ran beside it"
    assert frontier.sitting_ratio(a, u) == (pytest.approx((1.2 + 0.75) / 2), 2)
    u[0][1]["timing_excluded"] = "a benchmark ran beside it"
    assert frontier.sitting_ratio(a, u) == (pytest.approx(1.2), 1)
    # across sittings too: c3's cell against c4's, then nothing left to time
    assert frontier.time_ratio(a[3:], [u[1]]) == "19.98*"
    a[3]["timing_excluded"] = "a benchmark ran beside it"
    assert frontier.time_ratio(a[3:], [u[1]]) == "n/a"


def test_sitting_table_compares_cells_of_one_commit_only():
    recipe = frontier.RECIPE_METHOD["mnist"][0]
    cells = {
        (recipe, 0): {"elapsed": 300.0, "commit": "aaa"},
        (recipe, 1): {"elapsed": 500.0, "commit": "aaa"},
        (recipe, 2): {"elapsed": 900.0, "commit": "bbb"},  # no uniform cell of bbb
        ("uniform", 0): {"elapsed": 250.0, "commit": "aaa"},
        ("uniform2", 0): {"elapsed": 150.0, "commit": "aaa"},
        ("uniform", 1): {"elapsed": 100.0},  # no commit recorded
    }
    groups: dict = {}
    for (method, _), cell in cells.items():
        groups.setdefault(("mnist", 6000, method), []).append(cell)
    rows = frontier.sitting_rows(groups)[2:]
    assert rows == ["| mnist | 6,000 | aaa | 2 | 400 | 2 | 200 | 2.00 |"]


def test_speed_reference_times_a_fixed_workload():
    short, longer = frontier.speed_reference(steps=2), frontier.speed_reference(steps=8)
    assert 0 < short < longer


@pytest.mark.parametrize("dataset", sorted(frontier.RECIPE_METHOD))
def test_the_headline_methods_ran_the_recipe(dataset):
    # RECIPE_METHOD names the frontier cells the README's headline reports as the default
    # recipe: each one's recorded config must run what `svdgrow train --dataset D
    # --target-params B` runs today: the same settings and the same starting network (a
    # method that ran it from another preset stands for the recipe only where that preset
    # starts from the same network)
    runs = _PATH.parent / "results" / "frontier_cpu" / "runs"
    recipe = RECIPES[dataset]
    checked = 0
    for run in sorted(runs.glob(f"{dataset}-*-s0")):
        key = frontier._cell_key(run.name)
        if key is None or key[0] != dataset or key[2] not in frontier.RECIPE_METHOD[dataset]:
            continue
        ran = json.loads((run / "config.json").read_text())["config"]
        same = {k: ran[k] for k in recipe if k not in ("preset", "target_params")}
        assert same == {k: v for k, v in recipe.items() if k in same}, run
        today = TrainConfig.from_json({**ran, **recipe, "target_params": ran["target_params"]})
        assert TrainConfig.from_json(ran).starting_spec() == today.starting_spec(), run
        checked += 1
    if not checked:
        pytest.skip(f"no {dataset} recipe cells in this checkout")


def test_the_recipe_line_takes_the_first_method_that_ran_at_each_budget():
    groups = {("fashion-mnist", 60000, "f8s"): [{}], ("fashion-mnist", 120000, "f8s"): [{}],
              ("fashion-mnist", 120000, "f8sw"): [{}], ("mnist", 6000, "f4s"): [{}]}  # fmt: skip
    assert frontier.recipe_method(groups, "fashion-mnist", 60000) == "f8s"
    assert frontier.recipe_method(groups, "fashion-mnist", 120000) == "f8sw"
    assert frontier.recipe_method(groups, "fashion-mnist", 30000) is None
    assert frontier.recipe_method(groups, "mnist", 6000) is None  # f4s is not MNIST's recipe


def test_the_table_names_the_hosts_the_cells_ran_on():
    rows = [{"cpu": "Intel(R) Xeon(R) Processor"}, {"cpu": "Intel(R) Xeon(R) Processor"}, {}]
    assert frontier.cells_hosts(rows) == "Intel(R) Xeon(R) Processor (2), not recorded (1)"
    assert frontier.cpu_model()


def test_run_folders_with_hyphens_in_dataset_and_method_are_read(tmp_path):
    # "fashion-mnist-120000-found-f4s-s0" split from the right gave budget "found": every
    # frontier.py start crashed once such a cell had finished
    for name in ("fashion-mnist-120000-found-f4s-s0", "mnist-3000-midlong-s2", "notacell-s1"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "cell.json").write_text(json.dumps({"params": 1}))
    assert sorted(frontier.load_results(tmp_path)) == [
        ("fashion-mnist", 120000, "found-f4s", 0),
        ("mnist", 3000, "midlong", 2),
    ]


def _table_rows(lines: list[str], after: str | None) -> list[str]:
    """Every table row of ``lines``, or only those of the table after the line starting with
    ``after``."""
    if after is None:
        return [line for line in lines if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    rows = []
    for line in lines[start + 2 :]:  # past the blank line
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


@pytest.mark.parametrize(
    ("table", "after"),
    [
        ("frontier_cpu/frontier.md", None),
        ("frontier_cpu_30ep/frontier.md", "The default recipe"),
        ("explore_depth6k_cpu/versus_shapes.md", None),
        ("explore_depth6k_cpu/versus_shapes_r8.md", None),
    ],
    ids=["every-table", "30-epoch-recipe-table", "versus-shapes", "versus-shapes-round-to"],
)
def test_the_readme_shows_the_committed_frontier_tables(table, after):
    # README.md copies frontier_cpu/frontier.md's tables, the 30-epoch frontier's recipe table
    # and versus_shapes.py's table by hand; a row that changed in one and not the other is a
    # figure without its command
    root = _PATH.parents[1]
    table = root / "benchmarks" / "results" / table
    readme = root / "README.md"
    if not (table.is_file() and readme.is_file()):
        pytest.skip(f"no committed {table} or README beside the tests")
    rows = _table_rows(table.read_text().splitlines(), after)
    assert len(rows) > 2, f"{table} has no table rows"
    text = readme.read_text()
    missing = [row for row in rows if row not in text]
    assert not missing, f"README.md lacks {len(missing)} rows of {table}, first: {missing[0]}"


def test_a_table_without_rows_says_so(tmp_path):
    _cell(tmp_path, "mnist-6000-lr10-s0", 5800, 0.994)  # a variant alone: nothing to compare
    frontier.write_tables(tmp_path, frontier.load_results(tmp_path),
                          {"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "epochs": 1,
                           "threads": 1})  # fmt: skip
    table = (tmp_path / "frontier.md").read_text()
    assert "| mnist | 6,000 | lr10 | 1 | 5,800 |" in table
    assert "none: no cell ran a dataset's default recipe" in table
    assert "none: no budget has both a method's cells and uniform narrowing's" in table
    assert "none: no sitting ran both the recipe and uniform narrowing" in table
    assert "| dataset | budget | recipe |" not in table  # no header without rows
