"""The MNIST main job on 1 process against 2 processes (torchrun, gloo), on this machine.

Runs the README's shrinking command for ``--epochs`` epochs three times, one run after the
other: as one process (batch 128) with one thread and with two, and as ``torchrun
--nproc_per_node 2`` with ``--batch-size 64`` and one thread per process, so that every run
sees the same global batch of 128 and the same schedule (steps, budget, resize points). Then
reads the run folders and writes, under ``--out``:

- ``results.json``: the machine, the commands, and per run the final parameters, test accuracy,
  wall time (the run's own clock, and the command's including process start-up), the time by
  phase (train steps, resizes, evaluation), and for the 2-process run what a resize adds under
  DDP: the sync (broadcast of the decision and of every tensor, the structural resize on rank 1,
  the layout check, the DDP rewrap) and the checksum check, each as a ratio of one training
  step of that moment (the mean step since the previous resize);
- ``results.md``: the same as tables.

    python benchmarks/bench_ddp.py --epochs 2 --data-dir ../shared/data \\
        --out benchmarks/results/ddp_cpu
    python benchmarks/bench_ddp.py --runs --out benchmarks/results/ddp_cpu   # summarise only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: run as a script)
from svdgrow.app.rundir import read_log  # noqa: E402

JOB = ["--dataset", "mnist", "--preset", "mnist-2m", "--target-params", "12000",
       "--shrink-steps", "300", "--resize-every", "10", "--energy-eps", "1e-4",
       "--no-progress", "--no-download"]  # fmt: skip
RUNS = {"one": "1 process, batch 128, 1 thread", "one_t2": "1 process, batch 128, 2 threads",
        "two": "2 processes x batch 64, 1 thread each"}  # fmt: skip


def _commands(args) -> dict[str, list[str]]:
    common = [*JOB, "--epochs", str(args.epochs), "--data-dir", args.data_dir]
    one = [sys.executable, "-m", "svdgrow", "train", *common]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "svdgrow", "train", *common, "--batch-size", "64"]  # fmt: skip
    return {
        "one": [*one, "--threads", "1", "--run-dir", str(args.out / "one")],
        "one_t2": [*one, "--threads", "2", "--run-dir", str(args.out / "one_t2")],
        "two": [*two, "--threads", "1", "--run-dir", str(args.out / "two")],
    }


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t0


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _summary(run: Path) -> dict:
    events = read_log(run)
    epochs = [e for e in events if e["event"] == "epoch"]
    resizes = [e for e in events if e["event"] == "resize"]
    last = epochs[-1]
    phases: dict[str, float] = {}
    for e in epochs:
        for k, v in e.get("seconds_by_phase", {}).items():
            phases[k] = phases.get(k, 0.0) + v
    out = {"params": last["params"], "test_acc": last["test_acc"], "elapsed_s": last["elapsed"],
           "steps": last["step"], "resizes_logged": len(resizes), "seconds_by_phase": phases,
           "mean_step_s": phases.get("train", 0.0) / max(1, last["step"]),
           "rank0_resize_s": sum(e["seconds"] for e in resizes)}  # fmt: skip
    ddp = [e for e in resizes if "sync_seconds" in e]
    if ddp:
        sync = [e["sync_seconds"] / e["step_seconds"] for e in ddp]
        check = [e["check_seconds"] / e["step_seconds"] for e in ddp]
        out["ddp"] = {
            "sync_s_total": sum(e["sync_seconds"] for e in ddp),
            "check_s_total": sum(e["check_seconds"] for e in ddp),
            "sync_per_step_median": statistics.median(sync),
            "sync_per_step_max": max(sync),
            "check_per_step_median": statistics.median(check),
            "checksums_equal": all(len(set(e["checksums"])) == 1 for e in ddp),
            "per_resize": [
                {
                    "step": e["step"],
                    "params": e["params"],
                    "step_s": e["step_seconds"],
                    "sync_s": e["sync_seconds"],
                    "check_s": e["check_seconds"],
                }
                for e in ddp
            ],  # fmt: skip
        }
    return out


def _markdown(res: dict) -> str:
    runs = res["runs"]
    lines = [
        f"# MNIST main job, 1 process vs 2 processes (torchrun, gloo), {res['epochs']} epochs",
        "",
        f"Machine: {res['machine']}. Code: {res.get('code', 'this checkout')}. "
        "The 2 cores are shared with other engineers' work (load "
        "average before and after each run below): times are upper bounds and vary with that "
        "load. `--threads 1` leaves one core idle in a one-process run, which two one-thread "
        "processes use; against a two-thread process, 2 processes on 2 cores are not expected to "
        "be faster.",
        "",
        "| run | final params | test acc | run time (s) | command wall (s) | load avg before / "
        "after | steps | mean step (s) | resizes (s) | eval (s) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, label in RUNS.items():
        if name not in runs:
            continue
        r, ph, load = runs[name], runs[name]["seconds_by_phase"], res["load"].get(name, ["?", "?"])
        lines.append(
            f"| {label} | {r['params']:,} | {100 * r['test_acc']:.2f}% | {r['elapsed_s']:.0f} | "
            f"{res['wall_s'].get(name, float('nan')):.0f} | {load[0]} / {load[1]} | {r['steps']} "
            f"| {r['mean_step_s']:.3f} | {ph.get('resize', 0):.0f} | {ph.get('eval', 0):.0f} |"
        )
    two, d = runs["two"], runs["two"]["ddp"]
    lines += [
        "",
        f"What a resize adds under DDP ({len(d['per_resize'])} resizes that changed a width): "
        "the sync (decision broadcast, structural resize on rank 1, layout check, broadcast of "
        "every parameter, buffer and optimizer-state tensor, DDP rewrap) took "
        f"{d['sync_s_total']:.2f} s in all, a median of {d['sync_per_step_median']:.2f} training "
        f"steps of that moment (max {d['sync_per_step_max']:.2f}); the checksum check "
        f"{d['check_s_total']:.2f} s, a median of {d['check_per_step_median']:.2f} steps. "
        f"Checksums equal on both ranks after every resize: {d['checksums_equal']}. Rank 0's "
        f"resize itself (spectra, policy, fold on its 64-sample share of the batch): "
        f"{two['rank0_resize_s']:.0f} s in all, against {runs['one']['rank0_resize_s']:.0f} s "
        "on the whole 128-sample batch in the one-process run.",
        "",
        "Commands (`python benchmarks/bench_ddp.py` runs them one after the other):",
        "",
    ]
    lines += [f"    {res['commands'][name]}" for name in RUNS if name in res["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp_cpu")
    p.add_argument("--code", default="", help="what code ran (e.g. 'a clean checkout of X')")
    p.add_argument(
        "--runs",
        nargs="*",
        default=list(RUNS),
        choices=list(RUNS),
        help="the runs to do (the others are only summarised, when their folder exists)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    commands = _commands(args)
    res_path = args.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.setdefault("wall_s", {})
    res.setdefault("load", {})
    res.update(epochs=args.epochs, commands={k: " ".join(v) for k, v in commands.items()})
    if args.code:
        res["code"] = args.code
    res["machine"] = (f"{cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, "
                      f"Python {platform.python_version()}")  # fmt: skip
    for name in args.runs:  # one after the other: never two runs at once
        before = _load()
        res["wall_s"][name] = _run(commands[name])
        res["load"][name] = [before, _load()]
    res["runs"] = {
        n: _summary(args.out / n) for n in commands if (args.out / n / "log.jsonl").is_file()
    }
    res_path.write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results.md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
