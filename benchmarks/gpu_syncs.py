"""Host synchronisations on a CUDA device, counted and located (issue 13, item 2).

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA operation (``.item()``,
``float(t)``, a blocking device-to-host copy, ``nonzero``...) emit a warning. This script counts
them for ``svdgrow.ops.batched_svd`` and ``slice_copy`` alone, and for one ``Resizer.step()``
per mode on the models of ``bench_resize.py``, and names for each the stage of the step
(analyse / decide / apply, from the call stack) and the svdgrow source lines that synchronised.
A resize needs some: the policy's decisions (widths) must reach the host to reshape tensors;
what the table shows is how many there are beyond that, and where.

    python benchmarks/gpu_syncs.py [--models mnist-2m,resnet18] [--out STEM]

Writes ``STEM.json`` (the device named) and ``STEM.md``; default
``benchmarks/results/gpu_syncs_<device>``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_resize as br  # noqa: E402
from bench_svd import machine  # noqa: E402

from svdgrow import ops  # noqa: E402
from svdgrow.policy import Policy  # noqa: E402
from svdgrow.resizer import Resizer  # noqa: E402

#: function name on the stack -> the stage of ``Resizer.step`` it belongs to (innermost wins)
STAGES = {"check_finite": "check", "_analyse": "analyse", "decide": "decide", "cost": "decide",
          "_resize": "apply", "_update_held": "apply"}  # fmt: skip
PKG = str(Path(ops.__file__).resolve().parent)


class SyncLog:
    """Records every sync warning with its stage and innermost svdgrow source line."""

    def __init__(self, device: torch.device):
        self.events: list[tuple[str, str]] = []
        self.cuda = device.type == "cuda"  # on the CPU nothing synchronises (tests only)

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        if self.cuda:
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._mode)
        self._ctx.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [fr for fr in traceback.extract_stack()[:-1] if fr.filename.startswith(PKG)]
        where = f"{Path(filename).name}:{lineno}"  # outside svdgrow (a test's own line)
        if ours:
            fr = ours[-1]  # innermost svdgrow frame
            where = f"{Path(fr.filename).relative_to(Path(PKG).parent)}:{fr.lineno} ({fr.name})"
        stage = next((STAGES[fr.name] for fr in reversed(ours) if fr.name in STAGES), "outside")
        self.events.append((stage, where))

    def summary(self) -> dict:
        return {
            "syncs": len(self.events),
            "by_stage": dict(collections.Counter(s for s, _ in self.events)),
            "by_line": collections.Counter(w for _, w in self.events).most_common(),
        }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def op_syncs(device) -> dict:
    """Syncs of the two kernels alone (after a warm-up call of each)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(*s, generator=gen).to(device) for s in [(64, 576), (128, 1152), (10, 64)]]
    src = [torch.randn(8, 4, 3, 3, device=device), torch.randn(8, device=device)]
    rows = [torch.tensor([0, 2, 5, -1], device=device), torch.tensor([1, 3], device=device)]
    out = {}
    for name, fn in [
        ("batched_svd (full)", lambda: ops.batched_svd(mats)),
        ("batched_svd (k=8)", lambda: ops.batched_svd(mats, 8)),
        ("slice_copy", lambda: ops.slice_copy(src, rows, [None, None], [9, 1], [None, None])),
    ]:
        fn()
        _sync(device)
        with SyncLog(device) as log:
            fn()
        out[name] = log.summary()
    return out


def step_syncs(name: str, device, fraction: float) -> dict:
    """Syncs of one ``Resizer.step()`` per mode (every group pruned by ``fraction``)."""
    build, shape, _, _ = br.MODELS[name]
    torch.manual_seed(0)
    model = build().to(device)
    x = torch.randn(128, *shape, device=device)
    t = torch.randint(0, 10, (128,), device=device)
    opt = br._sgd(model)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    policy = Policy(energy_eps=0.5, min_width=1, max_prune_fraction=fraction, grow_threshold=1e9)
    graph = Resizer(model, x[:8], policy=policy).graph
    out = {}
    for mode in br.MODES:
        for trial in ("warm-up", "counted"):
            m = copy.deepcopy(model)
            o = br._sgd(m, opt.state_dict())
            r = Resizer(m, x[:8], policy=policy, optimizer=o, graph=graph, mode=mode)
            _sync(device)
            data = x if mode == "data" else None
            if trial == "warm-up":
                r.step(data=data)
                continue
            with SyncLog(device) as log:
                rep = r.step(data=data)
            out[mode] = {**log.summary(), "groups_changed": sum(
                1 for d in rep.decisions if d.action != "keep")}  # fmt: skip
    return out


def table(res: dict) -> list[str]:
    info = res["machine"]
    lines = [f"Host synchronisations on {info.get('gpu', info['cpu'])}, torch "
             f"{info['torch']}; counted with torch.cuda.set_sync_debug_mode('warn')",
             "", "| what | syncs | finiteness check | analyse | decide | apply | top svdgrow lines |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip

    def row(what, s):
        st = s.get("by_stage", {})
        cells = " | ".join(str(st.get(k, "")) for k in ("check", "analyse", "decide", "apply"))
        top = "; ".join(f"{w} x{c}" for w, c in s["by_line"][:3])
        lines.append(f"| {what} | {s['syncs']} | {cells} | {top} |")

    for what, s in res["ops"].items():
        row(what, s)
    for model, modes in res["steps"].items():
        for mode, s in modes.items():
            row(f"{model} Resizer.step, {mode} ({s['groups_changed']} groups resized)", s)
    for model, err in res.get("errors", {}).items():
        lines.append(f"| {model}: failed, {err} | | | | | | |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mnist-2m,mlp,resnet18",
                    help="comma-separated, of " + ", ".join(br.MODELS))  # fmt: skip
    ap.add_argument("--fraction", type=float, default=0.1, help="prune per group (default 0.1)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/...)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: tests only
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (torch.cuda.is_available() is False)")
    unknown = [n for n in args.models.split(",") if n and n not in br.MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(br.MODELS)}")
    device = torch.device(args.device)
    res = {"machine": machine(device), "ops": op_syncs(device), "steps": {}}
    for name in (n for n in args.models.split(",") if n):
        try:
            res["steps"][name] = step_syncs(name, device, args.fraction)
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the others
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
    stem = Path(args.out) if args.out else HERE / "results" / f"gpu_syncs_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = "\n".join(table(res)) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
