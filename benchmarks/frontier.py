"""The accuracy/size frontier: svdgrow against uniform narrowing (and others) at fixed budgets.

One command, resumable: every cell (dataset, budget, method, seed) is one ``svdgrow train`` run
in its own folder under ``--out``/runs; a finished cell is skipped, an interrupted one is
resumed (``--resume``), so the table can be filled over several sittings. After every cell the
results JSON, the markdown table and the plot are rewritten.

Methods (the same recipe and epochs for all; see docs/design.md, "Benchmarks"):
- ``shrink``: svdgrow shrinking the large preset to the budget (over ``--shrink-flags``).
- ``mid``: svdgrow shrinking the preset narrowed to ``--mid-factor`` x the budget, over
  ``--mid-shrink-steps`` steps.
- ``grow``: svdgrow growing the preset narrowed to ``--grow-factor`` x the budget, the budget
  as the cap.
- ``uniform``: the preset with every width scaled by one factor, chosen so the parameter count
  is as close as possible to the mean final size of the ``--match`` method's runs of that cell
  (the command's seeds when it lists that method, else every finished run; the budget when
  there are none), trained from scratch. Run it after them. Its spec is written to
  ``--out``/specs/DATASET-BUDGET-uniform.json and reused by every later seed, so all seeds of
  a budget train one network (delete the file to match again).
- ``uniform2``: the uniform size next to the uniform network on the target's side, so the two
  bracket the target (whole widths leave gaps of up to ~20% between uniform sizes) and the
  comparison interpolates between them.
- ``found``: the widths the ``--match`` method's run of seed 0 found, trained from scratch.
  ``found-NAME`` does the same for method NAME's seed 0 (so two methods' widths can both be
  retrained at one budget: ``found`` cells of earlier sittings keep their name).
- ``--variant NAME=FLAGS``: any other svdgrow setting, run as method NAME.
- ``tp``: Torch-Pruning's global group-magnitude pruning of the large preset to the budget on
  the shrink's schedule (benchmarks/tp_train.py; ``pip install -r requirements-bench.txt``).

The large preset is the dataset's (``mnist-2m`` / ``fashion-500k``); ``--preset-spec FILE``
puts another architecture (a spec JSON, see ``svdgrow.app.models``) in its place for every
method but ``tp`` (which prunes the dataset's preset), so that a different architecture can be
compared the same way: give it its own ``--out``.

Usage::

    python benchmarks/frontier.py --dataset mnist --budgets 3000 6000 12000 --seeds 0 1 2 \\
        --methods shrink uniform found --epochs 15 --threads 2

``--methods mid uniform grow:1`` runs grow for the first seed only.

Several copies of the same command cooperate (each cell is claimed with a lock file, results
are merged under a lock): on 2 cores run two side by side with ``--threads 1``::

    for i in 1 2; do python benchmarks/frontier.py ... --threads 1 & done; wait

Accuracy is unaffected by running side by side; the times are only comparable between runs made
the same way (the table records threads and the machine).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import svdgrow
from svdgrow.app.models import count_params, narrow_spec, preset_spec, scale_spec, validate_spec

PRESET = {"mnist": "mnist-2m", "fashion-mnist": "fashion-500k"}
DEFAULT_OUT = Path(__file__).parent / "results" / "frontier_cpu"
# -P: the cells import the svdgrow this script imports (PYTHONPATH or the installed one), not a
# svdgrow/ folder that happens to sit in the working directory; a frozen checkout on PYTHONPATH
# then really is the code the cells run while the work tree changes.
SVDGROW = [sys.executable, "-P", "-m", "svdgrow"]


CELL_KEYS = ("params", "test_acc", "elapsed", "start_params", "flops")


def speed_reference(threads: int = 1, steps: int = 30) -> float:
    """Seconds this machine takes, now, for a fixed CPU workload (``steps`` training steps of a
    small convolutional network at batch 64 on ``threads`` threads; best of 3).

    Recorded in each cell as ``ref_s`` right after the run, under the load it ran under (the
    other copies still running), so that times measured on different hosts or sittings can be
    compared as ``elapsed / ref_s``: the "AMD EPYC" this project's sessions are given differs in
    speed from one session to the next by up to ~1.8x (the same 120k Fashion network trained at
    87 s/epoch in one session and 157 s/epoch in another)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(32 * 14 * 14, 10),
        )  # fmt: skip
        x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(old)


def run_cell(
    cmd: list[str], run_dir: Path, log: Path, threads: int = 1
) -> dict[str, Any] | None | str:
    """Run (or resume) one ``svdgrow train``: its cell record, None when it failed, or "busy"
    when another copy of this script holds the cell."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir.parent / f".{run_dir.name}.lock", "w")  # noqa: SIM115 - held until return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return "busy"
    try:
        cell = _cell(run_dir)
        if cell is not None:  # finished by another copy meanwhile
            return cell
        if (run_dir / "config.json").is_file():  # an interrupted svdgrow train
            cmd = [*SVDGROW, "train", "--resume", str(run_dir),
                   "--no-progress"]  # fmt: skip
        commit = _commit()  # the code this (re)start of the cell imports
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        summary = _summary(run_dir)
        if rc != 0 or not summary or not summary.get("finished"):
            print(f"  cell failed (exit {rc}); see {log}", file=sys.stderr)
            return None
        cell = {k: summary.get(k) for k in CELL_KEYS}
        cell["commit"] = commit  # of its last (re)start; a resumed cell may have begun on another
        cell["ref_s"] = round(speed_reference(threads), 4)  # see speed_reference
        cell["cpu"] = cpu_model()  # hosts differ between sittings
        _atomic_write(run_dir / "cell.json", json.dumps(cell))
        return cell
    finally:
        lock.close()


def _claimed(run_dir: Path) -> bool:
    """Whether another copy of this script is running the cell now (holds its lock)."""
    path = run_dir.parent / f".{run_dir.name}.lock"
    if not path.is_file():
        return False
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _cell(run_dir: Path) -> dict[str, Any] | None:
    """A finished cell's record (written by run_cell), or None."""
    try:
        return json.loads((run_dir / "cell.json").read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_results(out: Path) -> dict[tuple, dict]:
    """Every finished cell under ``out``/runs, keyed (dataset, budget, method, seed)."""
    results = {}
    for d in sorted((out / "runs").glob("*-s*")):
        cell = _cell(d)
        key = _cell_key(d.name)
        if cell is None or key is None:
            continue
        results[key] = cell
    return results


def _cell_key(name: str) -> tuple[str, int, str, int] | None:
    """(dataset, budget, method, seed) of a run folder named ``DATASET-BUDGET-METHOD-sSEED``;
    the dataset and the method may hold hyphens (``fashion-mnist``, ``found-f4s``)."""
    m = re.fullmatch(r"(.+?)-(\d+)-(.+)-s(\d+)", name)
    return (m[1], int(m[2]), m[3], int(m[4])) if m else None


def _summary(run_dir: Path) -> dict[str, Any] | None:
    if (run_dir / "summary.json").is_file():  # tp_train.py's
        return json.loads((run_dir / "summary.json").read_text())
    if not (run_dir / "log.jsonl").is_file():
        return None
    out = subprocess.run(
        [*SVDGROW, "summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout) if out.returncode == 0 else None


def train_cmd(args, dataset: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        *SVDGROW, "train", "--dataset", dataset, "--epochs", str(args.epochs),
        "--seed", str(seed), "--threads", str(args.threads), "--data-dir", args.data_dir,
        "--run-dir", str(run_dir), "--no-progress", *args.train_flags.split(), *extra,
    ]  # fmt: skip


def tp_cmd(args, dataset: str, seed: int, run_dir: Path, budget: int) -> list[str]:
    """Torch-Pruning's cell: benchmarks/tp_train.py on the same recipe and shrink schedule."""
    steps = args.shrink_flags.split()
    shrink = steps[steps.index("--shrink-steps") + 1] if "--shrink-steps" in steps else "300"
    every = steps[steps.index("--resize-every") + 1] if "--resize-every" in steps else "10"
    return [
        sys.executable, str(Path(__file__).with_name("tp_train.py")), "--dataset", dataset,
        "--target-params", str(budget), "--epochs", str(args.epochs), "--seed", str(seed),
        "--threads", str(args.threads), "--data-dir", args.data_dir, "--run-dir", str(run_dir),
        "--shrink-steps", shrink, "--prune-every", every, *args.train_flags.split(),
    ]  # fmt: skip


def large_spec(args, dataset: str) -> dict[str, Any]:
    """The large network every method starts from or narrows: ``--preset-spec`` or the
    dataset's preset."""
    if getattr(args, "preset_spec", None):
        return json.loads(Path(args.preset_spec).read_text())
    return preset_spec(PRESET[dataset])


def large_flags(args, dataset: str) -> list[str]:
    """The ``svdgrow train`` flags naming :func:`large_spec`."""
    if getattr(args, "preset_spec", None):
        return ["--spec", str(args.preset_spec)]
    return ["--preset", PRESET[dataset]]


def _spec_file(args, dataset: str, name: str, target: int) -> str:
    spec, _ = narrow_spec(large_spec(args, dataset), target)
    path = Path(args.out) / "specs" / f"{dataset}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return str(path)


def neighbour(base: dict[str, Any], spec: dict[str, Any], up: bool) -> dict[str, Any]:
    """The uniform narrowing of ``base`` next to ``spec`` (itself one) in size, the next larger
    when ``up``, else the next smaller."""
    n = count_params(spec)
    _, f0 = narrow_spec(base, n)
    factors = [min(1.0, f0 * 0.6 * 3 ** (i / 400)) for i in range(401)]  # 0.6 f0 .. 1.8 f0
    sizes = sorted({(count_params(sp), json.dumps(sp)) for sp in map(lambda f: scale_spec(base, f),
                    factors)})  # fmt: skip
    if up:
        return json.loads(next(sp for c, sp in sizes if c > n))
    return json.loads([sp for c, sp in sizes if c < n][-1])


def other_side(base: dict[str, Any], target: int, nearest: dict[str, Any] | None = None):
    """Uniform narrowing brackets ``target`` between two sizes (widths are whole numbers): the
    one beside ``nearest`` (default: the one :func:`narrow_spec` picks) on the target's side, so
    the two can be interpolated."""
    if nearest is None:
        nearest, _ = narrow_spec(base, target)
    return neighbour(base, nearest, up=count_params(nearest) < target)


def match_target(args, dataset: str, budget: int, results: dict) -> int | None:
    """The size uniform narrowing is matched to: the mean final size of the ``--match``
    method's runs of the cell (this command's seeds when it runs that method: None until they
    have all finished; else every finished run), the budget where there are none. Copies
    started with different ``--methods`` thus agree once the match runs are in."""
    if args.match in args.methods:
        if not all((dataset, budget, args.match, seed) in results for seed in args.seeds):
            return None
        sizes = [results[dataset, budget, args.match, seed]["params"] for seed in args.seeds]
    else:
        sizes = [r["params"] for (d, b, m, _), r in results.items()
                 if (d, b, m) == (dataset, budget, args.match)]  # fmt: skip
    return round(statistics.mean(sizes)) if sizes else budget


def cell_extra(args, method: str, dataset: str, budget: int, results: dict) -> list[str] | None:
    """The method-specific flags of one cell (None: cannot run yet)."""
    budget_flags = ["--target-params", str(budget), *args.shrink_flags.split()]
    if method == "shrink":  # the large preset down to the budget
        return [*large_flags(args, dataset), *budget_flags]
    if method == "mid":  # the preset narrowed to mid_factor x budget, down to the budget
        start = _spec_file(args, dataset, f"{budget}-mid", round(args.mid_factor * budget))
        return ["--spec", start, *budget_flags, "--shrink-steps", str(args.mid_shrink_steps)]
    if method == "grow":  # the preset narrowed to grow_factor x budget, grown to the budget
        start = _spec_file(args, dataset, f"{budget}-grow", round(args.grow_factor * budget))
        return ["--spec", start, *budget_flags]
    if method in ("uniform", "uniform2"):  # matched to the mean size the --match runs ended at
        kept = Path(args.out) / "specs" / f"{dataset}-{budget}-{method}.json"
        if kept.is_file():  # later seeds train the network the first ones did (delete: re-match)
            return ["--spec", str(kept)]
        target = match_target(args, dataset, budget, results)
        if target is None:
            return None
        if method == "uniform2":  # the uniform size on the other side of the target
            first = kept.with_name(f"{dataset}-{budget}-uniform.json")  # beside it if kept
            nearest = json.loads(first.read_text()) if first.is_file() else None
            spec = other_side(large_spec(args, dataset), target, nearest)
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(spec, indent=1))
            return ["--spec", str(kept)]
        return ["--spec", _spec_file(args, dataset, f"{budget}-uniform", target)]
    if method in args.variant:  # the large preset, the shrink flags, then the variant's own
        return [*large_flags(args, dataset), *budget_flags, *args.variant[method].split()]
    if method == "tp":  # benchmarks/tp_train.py (see tp_cmd)
        return []
    if method == "found" or method.startswith("found-"):  # a method's seed-0 widths, from scratch
        source = args.match if method == "found" else method.removeprefix("found-")
        if (dataset, budget, source, 0) not in results:
            return None
        src = Path(args.out) / "runs" / f"{dataset}-{budget}-{source}-s0"
        return ["--baseline-from", str(src)]
    raise ValueError(f"unknown method {method!r}")


def cpu_model() -> str:
    """This host's CPU model name (/proc/cpuinfo), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "gpu": None,
            "svdgrow_commit": _commit()}  # fmt: skip


def cells_hosts(rows: list[dict]) -> str:
    """The CPUs the cells ran on, with counts ("not recorded" for cells older than the record)."""
    counts = Counter(r.get("cpu") or "not recorded" for r in rows)
    return ", ".join(f"{cpu} ({n})" for cpu, n in sorted(counts.items()))


def _commit() -> str | None:
    """The git commit of the svdgrow package the cells import (+ "-dirty" when edited)."""
    root = Path(svdgrow.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "svdgrow"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _stats(rs: list[dict]) -> tuple[float, float, float, int]:
    """(mean params, mean accuracy %, its variance of the mean, seeds)."""
    acc, sd = _mean_sd([100 * r["test_acc"] for r in rs])
    var = sd**2 / len(rs) if len(rs) > 1 else float("nan")
    return statistics.mean(r["params"] for r in rs), acc, var, len(rs)


def uniform_at(points: list[tuple[float, float, float, int]], params: float):
    """Uniform narrowing's accuracy at ``params``: interpolated linearly in log(params) between
    the two measured sizes around it (the nearest one when it lies outside them), with the
    variance of that estimate; returns (accuracy, variance, label)."""
    pts = sorted(points)
    lo = [p for p in pts if p[0] <= params]
    hi = [p for p in pts if p[0] >= params]
    if not lo or not hi:
        near = min(pts, key=lambda p: abs(math.log(p[0] / params)))
        return near[1], near[2], f"{near[0]:,.0f}"
    a, b = lo[-1], hi[0]
    if a[0] == b[0]:
        return a[1], a[2], f"{a[0]:,.0f}"
    w = math.log(params / a[0]) / math.log(b[0] / a[0])
    acc = (1 - w) * a[1] + w * b[1]
    var = (1 - w) ** 2 * a[2] + w**2 * b[2]
    return acc, var, f"{a[0]:,.0f}..{b[0]:,.0f} (interpolated)"


RECIPE_METHOD = {"mnist": ("m1k",), "fashion-mnist": ("f8sw", "f8s")}
"""The frontier methods that ran each dataset's default recipe (svdgrow.app.config.RECIPES),
the first with cells at a budget standing for it there. The Fashion recipe is ``f8sw`` (8x
the budget from ``mnist-2m``); ``f8s`` ran the same from ``fashion-500k``, which at 30k and
60k starts from the very same network (tests/test_frontier.py checks the recorded configs)."""


def recipe_method(groups: dict[tuple, list[dict]], ds: str, budget: int) -> str | None:
    """The method whose cells stand for ``ds``'s default recipe at ``budget``
    (:data:`RECIPE_METHOD`); None when none ran there."""
    return next((m for m in RECIPE_METHOD.get(ds, ()) if (ds, budget, m) in groups), None)


def versus_uniform(groups: dict[tuple, list[dict]], ds: str, budget: int, method: str):
    """``method`` against uniform narrowing at the same (dataset, budget) and the method's own
    mean size: (mean params, uniform's label, accuracy difference, its standard error (Welch),
    difference / SE, the ratio of the method's mean time to that of every uniform run at that
    budget (:func:`time_ratio`)); None without uniform runs there."""
    us = [groups[k] for k in ((ds, budget, "uniform"), (ds, budget, "uniform2")) if k in groups]
    if not us:
        return None
    params, acc, var, _ = _stats(groups[ds, budget, method])
    u_acc, u_var, label = uniform_at([_stats(u) for u in us], params)
    se = math.sqrt(var + u_var)
    z = (acc - u_acc) / se if se > 0 else float("nan")
    return params, label, acc - u_acc, se, z, time_ratio(groups[ds, budget, method], us)


def _timed(cells: list[dict]) -> list[dict]:
    """The cells whose wall time counts: not marked ``timing_excluded`` in their cell.json."""
    return [c for c in cells if not c.get("timing_excluded")]


def sittings(rs: list[dict], us: list[dict]) -> list[tuple[str, list[float], list[float]]]:
    """``(commit, wall times of rs, wall times of us)`` for every commit both lists have
    cells of: one sitting's frozen checkout, so one host. A cell whose ``cell.json`` carries
    ``timing_excluded`` (why: other work shared its cores for part of the run) is left out."""
    rs, us = _timed(rs), _timed(us)
    shared = {r.get("commit") for r in rs} & {u.get("commit") for u in us}
    return [
        (c, [r["elapsed"] for r in rs if r.get("commit") == c],
         [u["elapsed"] for u in us if u.get("commit") == c])
        for c in sorted(c for c in shared if c)
    ]  # fmt: skip


def sitting_ratio(rs: list[dict], us: list[list[dict]]) -> tuple[float, int] | None:
    """The wall time of the runs ``rs`` over that of the uniform runs ``us`` (both sizes)
    within sittings (:func:`sittings`): per sitting the ratio of their mean wall times; the
    mean of those ratios weighted by the cells of ``rs`` in each, and the number of
    sittings. None when no commit has both."""
    ratios = [(statistics.mean(a) / statistics.mean(b), len(a))
              for _, a, b in sittings(rs, [u for c in us for u in c])]  # fmt: skip
    if not ratios:
        return None
    return sum(x * n for x, n in ratios) / sum(n for _, n in ratios), len(ratios)


def time_ratio(rs: list[dict], us: list[list[dict]]) -> str:
    """The mean time of the runs ``rs`` over that of every uniform run in ``us`` (both sizes):
    within the sittings where both ran (:func:`sitting_ratio`), unmarked; else across sittings,
    of ``elapsed / ref_s`` (see :func:`speed_reference`) over the cells that recorded ``ref_s``
    when both sides have some, marked ``†`` (the correction is noisy: equal-work cells of one
    sitting differ up to ~2.6x after it), else of the wall times, marked ``*`` (the cells may
    come from sittings of different speed)."""
    within = sitting_ratio(rs, us)
    if within is not None:
        return f"{within[0]:.2f}"
    rs, pooled = _timed(rs), _timed([r for u in us for r in u])
    if not rs or not pooled:
        return "n/a"
    timed = [[r for r in c if r.get("ref_s")] for c in (rs, pooled)]
    if all(timed):
        norm = [statistics.mean(r["elapsed"] / r["ref_s"] for r in c) for c in timed]
        return f"{norm[0] / norm[1]:.2f}†"
    ta, tb = (statistics.mean(r["elapsed"] for r in c) for c in (rs, pooled))
    return f"{ta / tb:.2f}*"


def compare_rows(groups: dict[tuple, list[dict]]) -> list[str]:
    """Each method against uniform narrowing (see :func:`versus_uniform`)."""
    lines = [
        "| dataset | budget | method | params | uniform at | acc diff (points) | SE | diff/SE "
        "| time / uniform |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for ds, budget, method in sorted(groups):
        vs = None if method.startswith("uniform") else versus_uniform(groups, ds, budget, method)
        if vs is None:
            continue
        params, label, diff, se, z, ratio = vs
        lines.append(f"| {ds} | {budget:,} | {method} | {params:,.0f} | {label} | "
                     f"{diff:+.3f} | {se:.3f} | {z:+.1f} | {ratio} |")  # fmt: skip
    return lines


def recipe_rows(groups: dict[tuple, list[dict]]) -> list[str]:
    """The headline: each dataset's default recipe (:data:`RECIPE_METHOD`) at every budget,
    beside uniform narrowing and Torch-Pruning at that budget."""
    lines = [
        "| dataset | budget | recipe | seeds | params | test acc (mean ± sd) | vs uniform "
        "(points, SE) | Torch-Pruning | time / uniform |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ds, budget in sorted({(k[0], k[1]) for k in groups}):
        method = recipe_method(groups, ds, budget)
        if method is None:
            continue
        rs = groups[ds, budget, method]
        acc, sd = _mean_sd([100 * r["test_acc"] for r in rs])
        params = statistics.mean(r["params"] for r in rs)
        vs = versus_uniform(groups, ds, budget, method)
        versus, ratio = ("-", "-") if vs is None else (
            f"{vs[2]:+.2f} ({vs[4]:+.1f} SE)", vs[5])  # fmt: skip
        tp = groups.get((ds, budget, "tp"))
        tp_txt = "-" if not tp else (f"{statistics.mean(100 * r['test_acc'] for r in tp):.2f}"
                                     f" ({len(tp)} seed{'s' if len(tp) > 1 else ''})")  # fmt: skip
        lines.append(f"| {ds} | {budget:,} | {method} | {len(rs)} | {params:,.0f} | "
                     f"{acc:.2f} ± {sd:.2f} | {versus} | {tp_txt} | {ratio} |")  # fmt: skip
    return lines


def sitting_rows(groups: dict[tuple, list[dict]]) -> list[str]:
    """The recipe's wall time over uniform narrowing's (both sizes pooled) among the cells that
    ran from one commit: each sitting runs its cells from one frozen checkout, so these times
    come from one host, with no speed correction to trust (the load may still change within
    a sitting)."""
    lines = [
        "| dataset | budget | commit | recipe cells | recipe time (s) | uniform cells "
        "| uniform time (s) | time / uniform |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for ds, budget in sorted({(k[0], k[1]) for k in groups}):
        rs = groups.get((ds, budget, recipe_method(groups, ds, budget)), [])
        us = [u for m in ("uniform", "uniform2") for u in groups.get((ds, budget, m), [])]
        for commit, a, b in sittings(rs, us):
            ta, tb = statistics.mean(a), statistics.mean(b)
            lines.append(f"| {ds} | {budget:,} | {commit} | {len(a)} | {ta:.0f} | {len(b)} | "
                         f"{tb:.0f} | {ta / tb:.2f} |")  # fmt: skip
    return lines


def _section(intro: str, table: list[str], none: str) -> list[str]:
    """A blank line, ``intro``, a blank line, then ``table`` (its header and rows), or the
    sentence ``none`` in its place when the table has no rows past its two header lines."""
    return ["", intro, "", *(table if len(table) > 2 else [none])]


def write_tables(out: Path, results: dict, meta: dict[str, Any]) -> None:
    """frontier.json, frontier.md and frontier.png from every finished cell (under a lock: several
    copies of this script may finish cells at once)."""
    rows = [
        dict(zip(("dataset", "budget", "method", "seed"), k, strict=True), **v)
        for k, v in sorted(results.items())
    ]
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    untagged = sum(1 for r in rows if not r.get("commit"))
    code = f"svdgrow commits the cells ran: {', '.join(commits) or 'none recorded'}"
    if commits and untagged:
        code += f" ({untagged} older cells did not record theirs)"
    lines = [
        f"Cells' hosts (cells before session 10 did not record theirs; those sessions' hosts "
        f"all reported a 2-core AMD EPYC): {cells_hosts(rows)}. Tables written on "
        f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch "
        f"{meta['machine']['torch']}; {code}; "
        f"{meta['epochs']} epochs, {meta['threads']} thread(s) per run.",
        "",
        "| dataset | budget | method | seeds | params | MFLOPs/sample | test acc (mean ± sd) "
        "| time (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"], r["method"]), []).append(r)
    for (ds, budget, method), rs in sorted(groups.items()):
        acc, sd = _mean_sd([100 * r["test_acc"] for r in rs])
        flops = [r["flops"] for r in rs if r.get("flops")]
        mflops = f"{statistics.mean(flops) / 1e6:.2f}" if flops else "-"
        lines.append(
            f"| {ds} | {budget:,} | {method} | {len(rs)} | "
            f"{round(statistics.mean(r['params'] for r in rs)):,} | {mflops} | "
            f"{acc:.2f} ± {sd:.2f} | {statistics.mean(r['elapsed'] for r in rs):.0f} |"
        )
    lines += [
        "",
        "Time ratios compare wall times within sittings (cells that ran from one commit, "
        "one sitting's frozen checkout: see the last table), weighted by the method's cells "
        "in each; where no sitting ran both, those marked † compare `elapsed / ref_s` (the "
        "machine's speed recorded after each cell, a noisy correction: equal-work cells of "
        "one sitting differ up to ~2.6x after it) and those marked * raw wall times, across "
        "sittings on hosts of different speed.",
        *_section(
            "The default recipe of each dataset (`svdgrow train --dataset D --target-params B`; "
            "vs uniform: interpolated to the recipe's size, SE of the difference):",
            recipe_rows(groups),
            "none: no cell ran a dataset's default recipe (the method RECIPE_METHOD names).",
        ),
        *_section(
            "Against uniform narrowing at the same size (SE: standard error of the "
            "difference; NaN with one seed):",
            compare_rows(groups),
            "none: no budget has both a method's cells and uniform narrowing's.",
        ),
        *_section(
            "The recipe's time in one sitting: wall times of the recipe's cells and of uniform "
            "narrowing's (both sizes) that ran from the same commit (one sitting's frozen "
            "checkout: one host, though the load on its cores may have changed during the "
            "sitting):",
            sitting_rows(groups),
            "none: no sitting ran both the recipe and uniform narrowing.",
        ),
    ]
    with open(out / ".tables.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _atomic_write(out / "frontier.json", json.dumps({"machine": meta, "cells": rows}, indent=1))
        _atomic_write(out / "frontier.md", "\n".join(lines) + "\n")
        plot(out, groups)


def plot(out: Path, groups: dict[tuple, list[dict]]) -> None:
    import matplotlib  # noqa: PLC0415 - optional: the table is written without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    datasets = sorted({k[0] for k in groups})
    if not datasets:  # no finished cell yet (a fresh --out): nothing to draw
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(8.5 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        # uniform and uniform2 make one line, and so do the methods that stand for the recipe
        recipe = "/".join(RECIPE_METHOD.get(ds, ())) + " (default recipe)"
        lines: dict[str, list[list[dict]]] = {}
        for (d, budget, method), rs in groups.items():
            if d == ds:
                line = ("uniform" if method == "uniform2" else
                        recipe if method == recipe_method(groups, ds, budget) else method)  # fmt: skip
                lines.setdefault(line, []).append(rs)
        for i, (method, cells) in enumerate(sorted(lines.items())):
            pts = sorted(cells, key=lambda rs: statistics.mean(r["params"] for r in rs))
            xs = [statistics.mean(r["params"] for r in rs) for rs in pts]
            ys = [statistics.mean(100 * r["test_acc"] for r in rs) for rs in pts]
            es = [statistics.stdev([100 * r["test_acc"] for r in rs]) if len(rs) > 1 else 0
                  for rs in pts]  # fmt: skip
            style = ({"color": "black", "linewidth": 2} if method == "uniform" else
                     {"color": "tab:red", "linewidth": 2.5} if method == recipe else
                     {"alpha": 0.6, "linewidth": 1})  # fmt: skip
            marker = "osD^v"[i // 10 % 5]  # the colour cycle has 10 colours
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=method, **style)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(ds)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=sorted(PRESET), default="mnist")
    p.add_argument("--budgets", type=int, nargs="+", default=[3000, 6000, 12000])
    p.add_argument("--methods", nargs="+", default=["shrink", "uniform", "found"],
                   help="in the order to run; METHOD:N runs only the first N of --seeds")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    )
    p.add_argument("--shrink-flags", default="--shrink-steps 300 --resize-every 10 --energy-eps 1e-4",
                   help="flags of the shrink method besides preset and budget")  # fmt: skip
    p.add_argument("--mid-factor", type=float, default=4.0, help="mid: start size / budget")
    p.add_argument("--mid-shrink-steps", type=int, default=600, help="mid: steps to the budget")
    p.add_argument("--grow-factor", type=float, default=0.25, help="grow: start size / budget")
    p.add_argument(
        "--train-flags", default="", help="flags for every run (e.g. a --subset smoke test)"
    )
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra svdgrow method: the large preset to the budget with the shrink "
                        "flags and then FLAGS (e.g. midlong='--start-scale 4 --shrink-steps "
                        "2000'); list NAME in --methods")  # fmt: skip
    p.add_argument("--match", default="shrink", help="uniform: match this method's mean size")
    p.add_argument("--preset-spec", metavar="FILE",
                   help="a spec JSON to use as the large network in place of the dataset's "
                        "preset (every method but tp); give it its own --out")  # fmt: skip
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tables-only", action="store_true",
                   help="rewrite the JSON, table and plot from the finished cells, run nothing")  # fmt: skip
    args = p.parse_args()
    try:
        args.variant = dict(v.split("=", 1) for v in args.variant)
    except ValueError:
        p.error("--variant takes NAME=FLAGS")
    if args.preset_spec:
        args.preset_spec = str(Path(args.preset_spec).resolve())
        try:
            validate_spec(json.loads(Path(args.preset_spec).read_text()))
        except (OSError, ValueError) as e:
            p.error(f"--preset-spec {args.preset_spec}: {e}")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "epochs": args.epochs, "threads": args.threads}
    if args.tables_only:  # the machine and commit the cells recorded, not this process's
        if (out / "frontier.json").is_file():
            meta = json.loads((out / "frontier.json").read_text())["machine"]
        write_tables(out, load_results(out), meta)
        return 0
    methods = [m.split(":")[0] for m in args.methods]
    n_seeds = {m.split(":")[0]: int(m.split(":")[1]) for m in args.methods if ":" in m}
    for m in methods:  # retraining found widths: one seed unless asked
        if m == "found" or m.startswith("found-"):
            n_seeds.setdefault(m, 1)
    args.methods = methods
    cells = [
        (args.dataset, budget, method, seed)
        for budget in args.budgets
        for method in methods  # in order: uniform matches --match, found reuses it
        for seed in args.seeds[: n_seeds.get(method, len(args.seeds))]
    ]
    failed: set[tuple] = set()
    while True:
        results = load_results(out)
        todo = [k for k in cells if k not in results and k not in failed]
        if not todo:
            break
        progressed = False
        for key in todo:
            results = load_results(out)  # another copy may have finished cells meanwhile
            if key in results:
                continue
            extra = cell_extra(args, key[2], key[0], key[1], results)
            if extra is None:
                continue  # waits for the runs it depends on
            run_dir = out / "runs" / "{}-{}-{}-s{}".format(*key)
            print(f"{time.strftime('%H:%M:%S')} {key} ...", flush=True)
            cmd = (tp_cmd(args, key[0], key[3], run_dir, key[1]) if key[2] == "tp"
                   else train_cmd(args, key[0], key[3], run_dir, extra))  # fmt: skip
            cell = run_cell(cmd, run_dir, out / "runs.log", args.threads)
            if cell == "busy":
                print("  claimed by another copy", flush=True)
                continue
            progressed = True
            if cell is None:
                failed.add(key)
                continue
            print(f"  {cell['params']:,} params, {100 * cell['test_acc']:.2f}%, "
                  f"{cell['elapsed']:.0f} s", flush=True)  # fmt: skip
            write_tables(out, load_results(out), meta)
        if not progressed:  # the rest is run by other copies, or waits for cells they run
            results = load_results(out)
            claimed = {k for k in todo if _claimed(out / "runs" / "{}-{}-{}-s{}".format(*k))}
            blocked = [k for k in todo if k not in claimed
                       and cell_extra(args, k[2], k[0], k[1], results) is None]  # fmt: skip
            if not blocked:  # every cell left is another copy's: leave them to it
                print(f"the cells left are run by other copies: {sorted(claimed)}", flush=True)
                break
            if not claimed:
                print(f"cannot run {blocked}: the runs they depend on failed or are not among "
                      f"--methods (--match {args.match})", file=sys.stderr)  # fmt: skip
                return 1
            time.sleep(30)
    write_tables(out, load_results(out), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
