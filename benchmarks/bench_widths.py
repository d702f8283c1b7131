"""Time a training step of the widths a search found against the same widths rounded to
multiples of 8 (or any ``--round-to``), and against uniform narrowings.

Why: convolution kernels work on blocks of channels (8 or 16 on a CPU with AVX-512, 8 for GPU
tensor cores), so the time of a step follows the widths' alignment as much as their FLOPs: a
search that puts 18 or 37 channels in a layer can train slower than a uniform network with
more FLOPs. ``svdgrow.Policy(round_to=8)`` keeps a search's widths on multiples of 8; this
script measures what that buys on the machine it runs on.

Each network (``--runs``: run folders, their ``final_spec.json``; ``--spec``: spec files;
default: the committed Fashion-MNIST and MNIST runs that showed it) is timed as it is and with
every width rounded to the nearest multiple of each ``--round-to`` (never below it): one SGD
step (forward, backward, momentum step) at batch ``--batch`` on random 1x28x28 input, median
of ``--repeats`` timings of ``--steps`` steps each after warm-up. Prints a table and writes
``benchmarks/results/bench_widths_<device>[_1thread].json`` and ``.md`` naming the machine::

    python benchmarks/bench_widths.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:  # installed (or on PYTHONPATH); the checkout goes on sys.path only when it is not, since
    import svdgrow  # noqa: F401  processes spawned later (tests' DDP workers) inherit sys.path
except ImportError:  # and the checkout's svdgrow has no built extension
    sys.path.insert(0, str(ROOT))

from _common import cpu_name, write_results  # noqa: E402  (benchmarks/ is on sys.path: run as a script)
from svdgrow.app.models import build_model, count_flops, count_params  # noqa: E402

R = "benchmarks/results"
DEFAULT_RUNS = [
    f"{R}/explore_depth6k_cpu/d5fashion60k/runs/fashion-mnist-60000-f8s-s2",
    f"{R}/explore_depth6k_cpu/d5fashion60k_r8b/runs/fashion-mnist-60000-f8s8-s1",
    f"{R}/explore_depth6k_cpu/fashion60k/runs/fashion-mnist-60000-uniform-s0",
    f"{R}/explore_depth6k_cpu/fashion60k/runs/fashion-mnist-60000-uniform2-s0",
    f"{R}/frontier_cpu/runs/fashion-mnist-60000-f8s-s0",
    f"{R}/frontier_cpu/runs/fashion-mnist-60000-uniform-s0",
    f"{R}/frontier_cpu/runs/fashion-mnist-30000-f8s-s0",
    f"{R}/frontier_cpu/runs/fashion-mnist-30000-uniform-s0",
    f"{R}/frontier_cpu/runs/mnist-12000-m1k-s0",
    f"{R}/frontier_cpu/runs/mnist-12000-uniform-s0",
]


def rounded(spec: dict, q: int) -> dict:
    """``spec`` with the stem and every block's widths at the nearest multiple of ``q``."""
    out = copy.deepcopy(spec)

    def r(c: int) -> int:
        return max(q, round(c / q) * q)

    out["stem"] = r(out["stem"])
    for b in out["blocks"]:
        b["mid"], b["out"] = r(b["mid"]), r(b["out"])
    return out


def widths_text(spec: dict) -> str:
    """``stem | mid/out ...`` for the table."""
    return f"{spec['stem']} | " + " ".join(f"{b['mid']}/{b['out']}" for b in spec["blocks"])


def step_ms(spec: dict, args, device: torch.device) -> float:
    """Median milliseconds of one SGD step of ``spec`` at batch ``args.batch``."""
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, spec.get("in_channels", 1), 28, 28, device=device)
    y = torch.randint(0, spec.get("num_classes", 10), (args.batch,), device=device)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(3)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        steps(args.steps)
        times.append((time.perf_counter() - t) / args.steps * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", nargs="*", default=None, help="run folders (final_spec.json)")
    ap.add_argument("--spec", nargs="*", default=[], help="spec JSON files")
    ap.add_argument("--round-to", nargs="*", type=int, default=[8], help="multiples (default 8)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if any(q < 1 for q in args.round_to):
        ap.error("--round-to takes whole numbers >= 1")
    runs = DEFAULT_RUNS if args.runs is None and not args.spec else args.runs or []
    nets = []
    for path in [*(Path(r) / "final_spec.json" for r in runs), *map(Path, args.spec)]:
        if not path.is_file():
            ap.error(f"{path}: no such spec file (a run folder needs its final_spec.json)")
        label = path.parent.name if path.name == "final_spec.json" else path.stem
        nets.append((label, json.loads(path.read_text())))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for label, spec in nets:
        ref = None
        for q in [None, *args.round_to]:
            s = spec if q is None else rounded(spec, q)
            ms = step_ms(s, args, device)
            ref = ms if q is None else ref
            rows.append({
                "network": label, "round_to": q, "params": count_params(s),
                "mflops": count_flops(build_model(s)) / 1e6, "widths": widths_text(s),
                "step_ms": ms, "vs_as_found": ms / ref,
            })  # fmt: skip
            print(f"{label} round_to={q}: {ms:.1f} ms", flush=True)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    res = {
        "device": dev_name, "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "command": " ".join(sys.argv),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }  # fmt: skip
    text = [
        f"bench_widths on {dev_name} ({device.type}, {res['threads']} thread(s), "
        f"{os.cpu_count()} cores), torch {torch.__version__}, batch {args.batch}, median of "
        f"{args.repeats} x {args.steps} steps",
        "",
        "| network | widths (stem \\| mid/out per block) | round_to | params | MFLOPs/sample "
        "| ms/step | vs as found |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        text.append(
            f"| {r['network']} | {r['widths']} | {r['round_to'] or '-'} | {r['params']:,} | "
            f"{r['mflops']:.2f} | {r['step_ms']:.1f} | {r['vs_as_found']:.2f} |"
        )
    print("\n".join(text))
    suffix = "_1thread" if res["threads"] == 1 and device.type == "cpu" else ""
    stem = args.out or str(ROOT / "benchmarks" / "results" / f"bench_widths_{device.type}{suffix}")
    write_results(stem, res, text)
    return res


if __name__ == "__main__":
    main()
