"""The ``svdgrow`` command line: help generated from TrainConfig, and every bad command line
ending in one line on stderr, exit status 2, no traceback and no run folder left behind."""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdgrow
from faults import flip_a_tensor_byte, write_unsafe_checkpoint
from svdgrow.app.checkpoint import load_checkpoint
from svdgrow.app.cli import _count, build_parser, main, new_run_config
from svdgrow.app.config import RECIPES, TrainConfig
from svdgrow.app.models import count_params
from svdgrow.app.rundir import read_log

# Subprocesses import the svdgrow this test imported (the installed package in CI, the source
# tree with an in-place build in development), never the source folder by accident.
PKG_ROOT = Path(svdgrow.__file__).resolve().parents[1]


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_help_defaults_come_from_train_config():
    cfg = TrainConfig()
    checked = 0
    for action in _train_parser()._actions:
        value = getattr(cfg, action.dest, None)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            assert action.help.endswith(f"(default {value})"), action.dest
            checked += 1
    assert checked == 24  # every flag with a str/number default (--round-to is the 24th)
    lr = next(a for a in _train_parser()._actions if a.dest == "lr")
    assert lr.help.endswith("(default 0.05 sgd, 0.002 adam, 0.002 adamw)")


def test_train_config_fields_without_a_flag():
    dests = {a.dest for a in _train_parser()._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # set by --baseline-from RUN, or only from Python (TrainConfig(momentum=...)); world_size
    # comes from the launch (torchrun)
    assert fields - dests == {"baseline_of", "momentum", "eval_batch_size", "world_size"}


@pytest.mark.parametrize(
    "text,count", [("12500", 12500), ("12.5k", 12500), ("2e6", 2_000_000), ("2M", 2_000_000)]
)
def test_count(text, count):
    assert _count(text) == count


def test_count_refuses_text():
    with pytest.raises(argparse.ArgumentTypeError, match="12.5k"):
        _count("lots")


def _user_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_help_texts_policy_example_works_and_a_wrong_one_is_one_line(tmp_path, capsys):
    assert "'{\"min_width\": 4}'" in _train_parser().format_help()
    err = _user_error(
        capsys, ["train", "--policy", '{"floor": 4}', "--run-dir", str(tmp_path / "r")]
    )
    assert "Policy has no setting 'floor'" in err and "min_width" in err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_settings_that_cannot_change(tmp_path, capsys):
    err = _user_error(capsys, ["train", "--resume", str(tmp_path), "--lr", "0.1", "--spec", "x"])
    assert "--lr, --spec" in err


def test_baseline_and_spec_together(tmp_path, capsys):
    err = _user_error(capsys, ["train", "--baseline-from", str(tmp_path), "--spec", "s.json"])
    assert "either --baseline-from or --spec" in err


def test_argparse_errors_are_one_line(capsys):
    err = _user_error(capsys, ["train", "--epochs", "three"])
    assert "--epochs" in err and "three" in err


def test_python_m_svdgrow_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "svdgrow", "train", "--help"], cwd=PKG_ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--target-params" in out.stdout


# ----------------------------------------------------------------------------------------------
# bad command lines, table-driven


class Ctx:
    """Paths a case builds its command line from: a finished tiny run to copy and break, a
    fresh run folder, and scratch files."""

    def __init__(self, tmp: Path, data: Path, finished: Path):
        self.tmp, self.data, self.finished = tmp, data, finished
        self.new = tmp / "new-run"

    def train(self, *extra: str) -> list[str]:
        return ["train", "--data-dir", str(self.data), "--no-download", "--no-progress",
                "--subset", "100", "--test-subset", "50", "--batch-size", "50", "--epochs", "1",
                "--threads", "1", "--run-dir", str(self.new), *extra]  # fmt: skip

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def spec(self, **change: object) -> str:
        spec = {"arch": "resnet", "in_channels": 1, "num_classes": 10, "input_size": 28,
                "bn": True, "stem": 4, "blocks": [{"mid": 4, "out": 4, "stride": 1}]}  # fmt: skip
        return self.file("spec.json", json.dumps({**spec, **change}))

    def run_copy(self, break_it=None) -> str:
        run = self.tmp / "copy"
        shutil.copytree(self.finished, run)
        if break_it is not None:
            break_it(run)
        return str(run)

    def truncated_data(self) -> str:
        raw = self.tmp / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in (self.data / "MNIST" / "raw").iterdir():
            if f.name.startswith("train-images"):
                (raw / f.name).write_bytes(f.open("rb").read(100_000))
            else:
                (raw / f.name).symlink_to(f)
        return str(self.tmp / "data")


def _edit_checkpoint(run: Path, edit) -> None:
    path = run / "checkpoints" / "last.pt"
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)


def _unsafe(run: Path) -> None:
    write_unsafe_checkpoint(run / "checkpoints" / "last.pt")


def _flip(run: Path) -> None:
    flip_a_tensor_byte(run / "checkpoints" / "last.pt")


def _config(run: Path, text: str) -> None:
    (run / "config.json").write_text(text)


def _more_epochs(c: Ctx, break_it) -> list[str]:
    return ["train", "--resume", c.run_copy(break_it), "--epochs", "2", "--no-progress"]


CASES = {
    # devices
    "device foo": (lambda c: c.train("--device", "foo"), "'foo' is not a device"),
    "device meta": (lambda c: c.train("--device", "meta"), "cpu or cuda"),
    "device cuda:99": (lambda c: c.train("--device", "cuda:99"), "cuda:99"),
    "device cuda": (lambda c: c.train("--device", "cuda"), "no CUDA GPU"),
    # numbers out of range
    "threads -1": (lambda c: c.train("--threads", "-1"), "--threads must be an integer >= 1"),
    "threads 0": (lambda c: c.train("--threads", "0"), "--threads must be"),
    "lr nan": (lambda c: c.train("--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "lr inf": (lambda c: c.train("--lr", "inf"), "--lr must be a finite number"),
    "lr -1": (lambda c: c.train("--lr", "-1"), "--lr must be"),
    "subset 0": (lambda c: c.train("--subset", "0"), "--subset must be a sample count >= 1"),
    "subset -5": (lambda c: c.train("--subset", "-5"), "got -5"),
    "test-subset 0": (lambda c: c.train("--test-subset", "0"), "--test-subset must be"),
    "shift -1": (lambda c: c.train("--shift", "-1"), "--shift must be an integer >= 0"),
    "hold-grown -1": (
        lambda c: c.train("--hold-grown", "-1"),
        "--hold-grown must be an integer >= 0 (resizes)",
    ),
    "epochs 0": (lambda c: c.train("--epochs", "0"), "--epochs must be"),
    "batch-size 0": (lambda c: c.train("--batch-size", "0"), "--batch-size must be"),
    "resize-every -1": (lambda c: c.train("--resize-every", "-1"), "--resize-every must be"),
    "resize-until 2": (lambda c: c.train("--resize-until", "2"), "--resize-until must be"),
    "resize-backoff 0": (
        lambda c: c.train("--resize-backoff", "0"),
        "--resize-backoff must be an integer >= 1 (1: never back off), got 0",
    ),
    "target-params 0": (lambda c: c.train("--target-params", "0"), "--target-params must be"),
    "target without resizing": (
        lambda c: c.train("--target-params", "9k", "--resize-every", "0"),
        "--target-params needs resizing",
    ),
    "target-mflops without target": (
        lambda c: c.train("--preset", "quick", "--target-mflops", "0.3"),
        "--target-mflops is a second budget beside the parameter budget: give --target-params",
    ),
    "spectrum features in weights mode": (
        lambda c: c.train("--spectrum", "features", "--mode", "weights"),
        "--spectrum features is measured on the current batch: it needs --mode data",
    ),
    "spectrum unknown": (
        lambda c: c.train("--spectrum", "activations"),
        "argument --spectrum: invalid choice: 'activations'",
    ),
    "target-mflops 0": (
        lambda c: c.train("--target-mflops", "0", "--target-params", "9k"),
        "--target-mflops must be a number of MFLOPs > 0, got 0.0",
    ),
    "start-scale without target": (
        lambda c: c.train("--preset", "quick", "--start-scale", "4"),
        "--start-scale is a multiple of --target-params: give both",
    ),
    "start-scale 0": (
        lambda c: c.train("--start-scale", "0", "--target-params", "9k"),
        "--start-scale must be a number > 0, got 0.0",
    ),
    "label-smoothing 1": (lambda c: c.train("--label-smoothing", "1"), "--label-smoothing"),
    "checkpoint-minutes -1": (lambda c: c.train("--checkpoint-minutes", "-1"), "--checkpoint"),
    "warmup-steps -1": (lambda c: c.train("--warmup-steps", "-1"), "--warmup-steps must be"),
    "energy-eps 1": (lambda c: c.train("--energy-eps", "1"), "energy_eps must be in [0, 1)"),
    # argparse
    "epochs text": (lambda c: c.train("--epochs", "three"), "invalid int value: 'three'"),
    "target-params text": (lambda c: c.train("--target-params", "lots"), "such as 12500"),
    "unknown flag": (lambda c: c.train("--nope"), "unrecognized arguments: --nope"),
    "no command": (lambda c: [], "the following arguments are required: COMMAND"),
    # --policy
    "policy list": (lambda c: c.train("--policy", "[1, 2]"), "must be a JSON object"),
    "policy bad json": (lambda c: c.train("--policy", "{min_width: 4"), "must be a JSON object"),
    "policy unknown": (
        lambda c: c.train("--policy", '{"nonexistent": 1}'),
        "Policy has no setting 'nonexistent'",
    ),
    "policy floor": (lambda c: c.train("--policy", '{"floor": 4}'), "no setting 'floor'"),
    "policy string": (
        lambda c: c.train("--policy", '{"energy_eps": "x"}'),
        "energy_eps must be a number, got 'x'",
    ),
    "policy range": (lambda c: c.train("--policy", '{"min_width": 0}'), "min_width must be"),
    "policy round_to": (lambda c: c.train("--policy", '{"round_to": 0}'), "round_to must be"),
    "round-to 0": (lambda c: c.train("--round-to", "0"), "--round-to must be an integer >= 1"),
    "round-to disagrees": (
        lambda c: c.train("--round-to", "8", "--policy", '{"round_to": 4}'),
        "--round-to 8 and --policy round_to=4 disagree",
    ),
    "round-after-shrink alone": (
        lambda c: c.train("--round-after-shrink", "--target-params", "5000"),
        "--round-after-shrink rounds widths when the budget schedule ends: give --round-to N",
    ),
    # --spec
    "spec blocks not a list": (lambda c: c.train("--spec", c.spec(blocks=3)), "a list of block"),
    "spec block not an object": (lambda c: c.train("--spec", c.spec(blocks=[3])), "must be an"),
    "spec not an object": (lambda c: c.train("--spec", c.file("s.json", "[1]")), "JSON object"),
    "spec in_channels": (lambda c: c.train("--spec", c.spec(in_channels=3)), "in_channels 3"),
    "spec num_classes": (lambda c: c.train("--spec", c.spec(num_classes=5)), "num_classes 5"),
    "spec input_size": (lambda c: c.train("--spec", c.spec(input_size=32)), "input_size 32"),
    "spec width": (lambda c: c.train("--spec", c.spec(stem="8")), "must be a positive int"),
    "spec corrupt": (
        lambda c: c.train("--spec", c.file("bad.json", '{"stem": 4,\n "blocks": }')),
        "bad.json is not valid JSON: Expecting value at line 2 column 12",
    ),
    "spec missing": (lambda c: c.train("--spec", str(c.tmp / "nope.json")), "nope.json"),
    # run folders and data
    "run-dir is a file": (
        lambda c: c.train("--run-dir", c.file("afile", "x")),
        "afile is a file, not a folder",
    ),
    "run-dir holds a run": (lambda c: c.train("--run-dir", c.run_copy()), "already holds a run"),
    "data truncated": (
        lambda c: c.train("--data-dir", c.truncated_data()),
        "train split in",
    ),
    "data missing": (lambda c: c.train("--data-dir", str(c.tmp / "nowhere")), "not found"),
    "lr 1e4 diverges": (
        lambda c: c.train("--lr", "1e4", "--resize-every", "8", "--epochs", "3", "--subset", "200"),
        "training diverged by step",
    ),
    # resume
    "resume nothing": (lambda c: ["train", "--resume", str(c.tmp / "none")], "no config.json"),
    "resume finished": (
        lambda c: ["train", "--resume", c.run_copy(), "--no-progress"],
        "is finished: it trained 1 of 1 epochs",
    ),
    "resume corrupt config": (
        lambda c: _more_epochs(c, lambda r: _config(r, '{"config": {\n  "epochs": 1,,\n')),
        "config.json is not valid JSON: Expecting property name enclosed in double quotes "
        "at line 2 column 15",
    ),
    "resume config not a run's": (
        lambda c: _more_epochs(c, lambda r: _config(r, "[]")),
        "has no 'config' object",
    ),
    "resume bad setting": (
        lambda c: _more_epochs(c, lambda r: _config(r, '{"config": {"shift": "2"}}')),
        "--shift must be an integer >= 0 (pixels), got '2'",
    ),
    "resume no checkpoint": (
        lambda c: _more_epochs(c, lambda r: (r / "checkpoints" / "last.pt").unlink()),
        "it has no checkpoint",
    ),
    "resume checkpoint lacks a key": (
        lambda c: _more_epochs(c, lambda r: _edit_checkpoint(r, lambda ck: ck.pop("rng"))),
        "lacks 'rng'",
    ),
    "resume checkpoint without optimizer": (
        lambda c: _more_epochs(c, lambda r: _edit_checkpoint(r, _drop_optimizer)),
        "cannot resume training",
    ),
    "resume flipped byte": (lambda c: _more_epochs(c, _flip), "is corrupt: its content"),
    "resume unsafe checkpoint": (
        lambda c: _more_epochs(c, _unsafe),
        "refusing to load checkpoint",
    ),
    "resume truncated checkpoint": (
        lambda c: _more_epochs(c, _truncate_checkpoint),
        "corrupt, truncated or not a torch file",
    ),
    "resume with a setting": (
        lambda c: ["train", "--resume", c.run_copy(), "--lr", "0.1"],
        "cannot change: --lr",
    ),
    "baseline from nothing": (
        lambda c: ["train", "--baseline-from", str(c.tmp / "none")],
        "no config.json",
    ),
    # plot and summary
    "summary corrupt log": (
        lambda c: ["summary", c.run_copy(_corrupt_log)],
        "log.jsonl line 1 is not valid JSON",
    ),
    "summary not a run": (lambda c: ["summary", str(c.tmp)], "no log.jsonl"),
    "plot nothing": (lambda c: ["plot", str(c.tmp / "none")], "no log.jsonl"),
}


def _drop_optimizer(ck: dict) -> None:
    ck["optimizer"] = None
    ck.pop("sha256")


def _truncate_checkpoint(run: Path) -> None:
    path = run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:3000])


def _corrupt_log(run: Path) -> None:
    log = run / "log.jsonl"
    log.write_text("{oops\n" + log.read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("cli") / "finished"
    argv = ["train", "--data-dir", str(data_dir), "--no-download", "--no-progress", "--subset",
            "100", "--test-subset", "50", "--batch-size", "50", "--epochs", "1", "--threads", "1",
            "--resize-every", "1", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line(case, finished, data_dir, tmp_path, capsys):
    if case == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    build, expected = CASES[case]
    c = Ctx(tmp_path, data_dir, finished)
    argv = build(c)
    capsys.readouterr()
    err = _user_error(capsys, argv)
    assert expected in err, err
    assert err.startswith("svdgrow") and "\x1b" not in err
    if case == "lr 1e4 diverges":  # the last finite checkpoint stays, and it loads
        ckpt = load_checkpoint(c.new / "checkpoints" / "last.pt")
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
        assert [e["event"] for e in read_log(c.new)][-1] == "diverged"
    else:  # a refused start leaves no run folder
        assert not c.new.exists()


@pytest.mark.parametrize("case", ["policy floor", "resume finished"])
def test_bad_command_line_in_a_fresh_process(case, finished, data_dir, tmp_path):
    build, expected = CASES[case]
    argv = build(Ctx(tmp_path, data_dir, finished))
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "svdgrow", *argv], cwd=PKG_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and expected in out.stderr, out.stderr


def test_resuming_a_finished_run_leaves_its_log_alone(finished, data_dir, tmp_path, capsys):
    run = Ctx(tmp_path, data_dir, finished).run_copy()
    before = (Path(run) / "log.jsonl").read_text()
    assert main(["train", "--resume", run]) == 2
    assert (Path(run) / "log.jsonl").read_text() == before
    assert "nan" not in capsys.readouterr().err


def _config_of(argv: list[str]) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    args = {k: v for k, v in vars(ns).items() if k not in ("command", "verbose")}
    return new_run_config(args)


@pytest.mark.parametrize("dataset", sorted(RECIPES))
def test_dataset_alone_runs_its_recipe(dataset):
    cfg = _config_of(["train", "--dataset", dataset])
    for key, value in RECIPES[dataset].items():
        assert getattr(cfg, key) == value, key
    cfg.validate()
    start = count_params(cfg.starting_spec())
    budget, scale = RECIPES[dataset]["target_params"], RECIPES[dataset]["start_scale"]
    # narrowed from the large preset to about start_scale x the budget, not the whole preset
    assert 0.9 * scale * budget < start < 1.1 * scale * budget
    assert cfg.start_shortfall(cfg.starting_spec()) is None
    # a flag given wins over the recipe; the rest of the recipe stays
    cfg = _config_of(["train", "--dataset", dataset, "--epochs", "3", "--target-params", "9k"])
    assert (cfg.epochs, cfg.target_params, cfg.start_scale) == (3, 9000, scale)


@pytest.mark.parametrize("budget", [30_000, 60_000, 120_000])
def test_the_fashion_recipe_holds_its_start_at_every_frontier_budget(budget):
    """The Fashion recipe starts from mnist-2m so that an 8x start fits up to the frontier's
    120k budget (fashion-500k, half as wide, would cap it at 5.1x there)."""
    cfg = _config_of(["train", "--dataset", "fashion-mnist", "--target-params", str(budget)])
    assert cfg.start_shortfall(cfg.starting_spec()) is None


def test_the_fashion_recipe_starts_where_fashion_500k_would_up_to_its_size():
    """mnist-2m is fashion-500k at twice the width: narrowed to 8x any budget up to ~76k
    (fashion-500k's 0.61M / 8) both give the same network, so the frontier's cells from
    fashion-500k at 30k and 60k are the recipe's runs (RECIPES' docstring, README)."""
    for budget in range(2_000, 76_001, 2_000):
        a, b = (TrainConfig(dataset="fashion-mnist", preset=p, target_params=budget,
                            start_scale=8.0).starting_spec()
                for p in ("mnist-2m", "fashion-500k"))  # fmt: skip
        assert a == b, budget


def test_recipe_follows_a_weights_mode_flag():
    """The Fashion recipe reads feature spectra, which need the batch: --mode weights drops
    that part of the recipe (instead of failing on a combination the user did not ask for)."""
    cfg = _config_of(["train", "--dataset", "fashion-mnist", "--mode", "weights"])
    assert (cfg.mode, cfg.spectrum, cfg.target_params) == ("weights", "weights", 60000)
    cfg.validate()
    cfg = _config_of(["train", "--dataset", "fashion-mnist"])
    assert (cfg.mode, cfg.spectrum) == ("data", "features")


def test_a_growing_recipe_reads_feature_spectra_and_holds_what_it_grew():
    """--start-scale below 1 grows: on either dataset the recipe then reads feature spectra
    (growth past the weight cap) and holds grown groups for 5 resizes; --spectrum and
    --hold-grown override, --mode weights keeps the weight spectrum, a shrinking recipe
    holds nothing."""
    for ds in ("mnist", "fashion-mnist"):
        cfg = _config_of(["train", "--dataset", ds, "--start-scale", "0.25"])
        assert (cfg.spectrum, cfg.hold_grown, cfg.start_scale) == ("features", 5, 0.25)
        cfg.validate()
    cfg = _config_of(["train", "--dataset", "mnist", "--start-scale", "0.25",
                      "--spectrum", "weights", "--hold-grown", "0"])  # fmt: skip
    assert (cfg.spectrum, cfg.hold_grown) == ("weights", 0)
    cfg = _config_of(["train", "--dataset", "fashion-mnist", "--start-scale", "0.25",
                      "--mode", "weights"])  # fmt: skip
    assert (cfg.spectrum, cfg.hold_grown) == ("weights", 0)
    cfg = _config_of(["train", "--dataset", "fashion-mnist"])
    assert (cfg.spectrum, cfg.hold_grown) == ("features", 0)
    assert _config_of(["train", "--dataset", "mnist"]).spectrum == "weights"


def test_recipe_without_resizing_trains_the_preset():
    cfg = _config_of(["train", "--dataset", "mnist", "--resize-every", "0"])
    assert (cfg.preset, cfg.target_params, cfg.start_scale, cfg.epochs) == ("mnist-2m", None,
                                                                            None, 15)  # fmt: skip
    cfg.validate()


def test_explicit_architecture_skips_the_recipe(tmp_path):
    cfg = _config_of(["train", "--dataset", "mnist", "--preset", "quick"])
    assert (cfg.preset, cfg.target_params, cfg.start_scale) == ("quick", None, None)
    assert cfg.epochs == TrainConfig().epochs
