"""The budget schedule inside `svdgrow train`: --start-scale narrows the start, --shrink-start
holds the budget at the starting size until its step, then it falls to --target-params; the
--distill loss."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from svdgrow.app.checkpoint import load_checkpoint
from svdgrow.app.cli import main
from svdgrow.app.loop import _distilled, _schedule_next_check
from svdgrow.app.models import count_params, narrow_spec, preset_spec
from svdgrow.app.rundir import last_checkpoint, read_json, read_log


def _small_run(data_dir, run, *flags: str) -> list[str]:
    """``svdgrow train`` of mnist-2m to a 3,000-parameter budget on 400 images, plus ``flags``."""
    return ["train", "--dataset", "mnist", "--preset", "mnist-2m", "--target-params", "3000",
            *flags, "--resize-until", "1", "--subset", "400", "--test-subset", "100",
            "--batch-size", "50", "--threads", "1", "--seed", "0", "--no-progress",
            "--checkpoint-minutes", "0", "--no-download", "--data-dir", str(data_dir),
            "--run-dir", str(run)]  # fmt: skip


def test_start_scale_and_shrink_start(tmp_path, data_dir):
    run = tmp_path / "run"
    argv = _small_run(data_dir, run, "--start-scale", "3", "--shrink-start", "16",
                      "--shrink-steps", "8", "--resize-every", "4", "--epochs", "4")  # fmt: skip
    assert main(argv) == 0
    events = read_log(run)
    start = next(e for e in events if e["event"] == "start")
    assert start["params"] == count_params(narrow_spec(preset_spec("mnist-2m"), 9000)[0])
    resizes = [e for e in events if e["event"] == "resize"]
    assert resizes and all(e["step"] > 16 for e in resizes if e["params"] < e["params_before"])
    assert all(e["budget"] == start["params"] for e in resizes if e["step"] <= 16)
    end = next(e for e in events if e["event"] == "end")
    assert end["params"] <= 3000


def test_target_mflops_caps_flops_beside_params(tmp_path, data_dir):
    """--target-mflops: a FLOPs budget on the same schedule; the end fits both budgets, and
    the resize events log it. A --baseline-from run of it (and of --distill) trains the final
    widths without either."""
    run = tmp_path / "run"
    argv = _small_run(data_dir, run, "--target-mflops", "0.2", "--distill", "0.3",
                      "--start-scale", "3", "--shrink-steps", "12", "--resize-every", "3",
                      "--epochs", "3")  # fmt: skip
    assert main(argv) == 0
    events = read_log(run)
    resizes = [e for e in events if e["event"] == "resize"]
    assert resizes and all("flops_budget" in e for e in resizes)
    assert resizes[-1]["flops_budget"] == 200_000
    last = [e for e in events if e["event"] == "epoch"][-1]
    assert last["params"] <= 3000 and last["flops"] <= 200_000  # uniform at 3k: 251k FLOPs
    base = tmp_path / "baseline"
    assert (
        main(["train", "--baseline-from", str(run), "--run-dir", str(base), "--no-progress"]) == 0
    )
    config = read_json(base / "config.json")["config"]
    assert config["target_mflops"] is None and config["distill"] == 0.0
    assert [e["params"] for e in read_log(base) if e["event"] == "epoch"][-1] == last["params"]


def test_distilled_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    logits = net(x)
    ce = F.cross_entropy(logits, y)
    cfg = SimpleNamespace(distill=0.0, distill_temperature=4.0)
    assert torch.equal(_distilled(ce, logits, net, x, cfg), ce)
    cfg.distill = 0.5  # the student is its own teacher: KL = 0, the CE is halved
    torch.testing.assert_close(_distilled(ce, logits, net, x, cfg), 0.5 * ce)
    other = torch.nn.Linear(5, 3)
    kd = _distilled(ce, logits, other, x, cfg) - 0.5 * ce
    assert kd > 0  # a different teacher: a positive KL term
    kd.backward()
    assert net.weight.grad is not None and other.weight.grad is None  # the teacher is not trained


def test_unreachable_budget_is_announced(tmp_path, data_dir, caplog):
    argv = ["train", "--dataset", "mnist", "--subset", "400", "--test-subset", "100",
            "--batch-size", "50", "--epochs", "1", "--threads", "1", "--no-progress",
            "--checkpoint-minutes", "0", "--no-download", "--data-dir", str(data_dir),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    with caplog.at_level("WARNING", logger="svdgrow"):
        assert main(argv) == 0  # the recipe: 1,000 shrink steps, 8 steps in all
    assert any("will not reach the target" in r.message for r in caplog.records)


def test_feature_spectrum_run_reaches_the_budget(tmp_path, data_dir):
    """--spectrum features: the run shrinks to the budget on the policy's feature spectra, and
    ends at other widths than the same run on weight spectra (the flag reaches the Resizer)."""
    ends = {}
    for spectrum in ("weights", "features"):
        run = tmp_path / spectrum
        argv = _small_run(data_dir, run, "--spectrum", spectrum, "--start-scale", "3",
                          "--shrink-steps", "12", "--resize-every", "3", "--epochs", "2")  # fmt: skip
        assert main(argv) == 0
        assert read_json(run / "config.json")["config"]["spectrum"] == spectrum
        last = [e for e in read_log(run) if e["event"] == "epoch"][-1]
        assert last["params"] <= 3000
        ends[spectrum] = read_json(run / "final_spec.json")
    assert ends["weights"] != ends["features"]


def test_checks_back_off_after_the_schedule_and_return_on_a_change():
    """Outside the budget schedule each check that changes nothing doubles the gap to the
    next, after ``hold_grown`` of them at the normal pace, up to ``resize_backoff`` times
    ``resize_every``; a change, or the schedule still running, returns to ``resize_every``."""
    cfg = SimpleNamespace(resize_every=10, resize_backoff=8, hold_grown=2)
    r = SimpleNamespace(cfg=cfg, step=0, quiet_checks=0, next_check=0)
    gaps = []
    for changed, shrinking in [(True, True), (False, True), (False, False), (False, False),
                               (False, False), (False, False), (False, False), (False, False),
                               (False, False), (True, False), (False, False)]:  # fmt: skip
        _schedule_next_check(r, changed, shrinking)
        gaps.append(r.next_check - r.step)
        r.step = r.next_check
    assert gaps == [10, 10, 10, 10, 20, 40, 80, 80, 80, 10, 10]
    cfg.resize_backoff = 1  # never back off
    _schedule_next_check(r, False, False)
    assert r.next_check - r.step == 10


def test_backoff_only_skips_checks_that_change_nothing(tmp_path, data_dir):
    """Checks spaced out after the shrink leave the run as it was: the same widths and final
    weights as checking every --resize-every steps, in fewer checks (the late checks of this
    run change nothing, which the test asserts first)."""
    ends = {}
    for backoff in ("1", "4"):
        run = tmp_path / f"b{backoff}"
        argv = _small_run(data_dir, run, "--start-scale", "3", "--shrink-steps", "8",
                          "--resize-every", "2", "--epochs", "4", "--energy-eps", "0",
                          "--resize-backoff", backoff)  # fmt: skip
        assert main(argv) == 0
        events = read_log(run)
        assert all(e["step"] <= 8 for e in events if e["event"] == "resize")
        last = [e for e in events if e["event"] == "epoch"][-1]
        ckpt = load_checkpoint(last_checkpoint(run))
        ends[backoff] = (last["resize_checks"], last["params"], ckpt["model"])
    # every 2 steps to step 32: 16 checks; backing off: 2..8 (the schedule), 10, 14, 22, 30
    assert (ends["1"][0], ends["4"][0]) == (16, 8)
    assert ends["1"][1] == ends["4"][1] <= 3000
    for k, v in ends["1"][2].items():
        torch.testing.assert_close(ends["4"][2][k], v, rtol=0, atol=0, msg=k)
