"""The ``svdgrow`` command line: help generated from TrainConfig, and user errors that end in
one line on stderr with exit status 2."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from svdgrow.app.cli import _count, build_parser, main
from svdgrow.app.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


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
    assert checked == 16
    lr = next(a for a in _train_parser()._actions if a.dest == "lr")
    assert lr.help.endswith("(default 0.05 sgd, 0.002 adam, 0.002 adamw)")


def test_train_config_fields_without_a_flag():
    dests = {a.dest for a in _train_parser()._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # set by --baseline-from RUN, or only from Python (TrainConfig(momentum=...))
    assert fields - dests == {"baseline_of", "momentum", "eval_batch_size"}


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
    out = subprocess.run([sys.executable, "-m", "svdgrow", "train", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--target-params" in out.stdout
