"""What a resize costs a ``torch.compile``'d model in recompilation (CPU, one thread).

For each model and backend: the eager training step, the first compiled step (compilation
included), the steady compiled step, then a resize (every resizable group cut to 3/4 of its
width, weights mode) followed by ``torch.compiler.reset()`` and a fresh ``torch.compile`` (what
``svdgrow train --compile`` and a compiled model given to the Resizer do) and the first step
after it (recompilation included) and the steady step at the new widths. Inductor writes to an
empty cache folder, so every compilation is cold (new widths are new shapes: a warm cache would
miss anyway). Writes ``--out``.json and .md.

    python benchmarks/bench_compile.py --out benchmarks/results/ddp_cpu/compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: run as a script)
from svdgrow import Resizer  # noqa: E402
from svdgrow.app.models import build_model, count_params, preset_spec  # noqa: E402


def _step(net, opt, x, y) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    del loss
    return time.perf_counter() - t0


def _steady(net, opt, x, y, n: int) -> float:
    return statistics.median(_step(net, opt, x, y) for _ in range(n))


def measure(preset: str, backend: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    torch.compiler.reset()
    model = build_model(preset_spec(preset)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    rs = Resizer(model, x[:8], optimizer=opt, mode="weights")
    out = {"preset": preset, "backend": backend, "batch": batch, "params": count_params(model)}
    out["eager_step_s"] = _steady(model, opt, x, y, repeats)
    net = torch.compile(model, backend=backend)
    out["first_compiled_step_s"] = _step(net, opt, x, y)
    out["compiled_step_s"] = _steady(net, opt, x, y, repeats)
    widths = rs.widths()
    rs.apply({g.name: max(1, widths[g.name] * 3 // 4) for g in rs.resizable()})
    out["params_after"] = count_params(model)
    torch.compiler.reset()
    net = torch.compile(model, backend=backend)
    out["first_step_after_resize_s"] = _step(net, opt, x, y)
    out["compiled_step_after_s"] = _steady(net, opt, x, y, repeats)
    out["eager_step_after_s"] = _steady(model, opt, x, y, repeats)
    out["recompile_s"] = out["first_step_after_resize_s"] - out["compiled_step_after_s"]
    out["recompile_in_steps"] = out["recompile_s"] / out["compiled_step_after_s"]
    return out


def _markdown(rows: list[dict], machine: str) -> str:
    lines = [
        "# What a resize costs a torch.compile'd model (CPU, 1 thread, cold inductor cache)",
        "",
        f"Machine: {machine}; shared with other engineers' work (times are upper bounds).",
        "",
        "| model | backend | batch | eager step (s) | 1st compiled step (s) | compiled step (s) "
        "| 1st step after resize (s) | recompile (s) | = steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} ({r['params']:,} -> {r['params_after']:,}) | {r['backend']} | "
            f"{r['batch']} | {r['eager_step_s']:.4f} | {r['first_compiled_step_s']:.2f} | "
            f"{r['compiled_step_s']:.4f} | {r['first_step_after_resize_s']:.2f} | "
            f"{r['recompile_s']:.2f} | {r['recompile_in_steps']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["quick", "mnist-2m"])
    p.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ddp_cpu/compile")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(preset, backend, args.batch, args.repeats)
            for preset in args.presets for backend in args.backends]  # fmt: skip
    machine = f"{cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=2)
    )
    args.out.with_suffix(".md").write_text(_markdown(rows, machine))
    print(_markdown(rows, machine))


if __name__ == "__main__":
    main()
