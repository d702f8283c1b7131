"""Coverage table: how much of each torchvision model svdgrow can resize, beside Torch-Pruning.

For every model (torchvision's own constructors, full size, 10 classes, traced on a 2 x 3 x 64 x 64
batch) it counts:

* svdgrow: resizable coupling groups / all groups (``svdgrow.trace``, then what
  ``svdgrow.Resizer`` accepts), the Conv/Linear layers whose output width can change (producers
  and per-channel layers of resizable groups) / all Conv/Linear layers, and why the other groups
  are frozen (model input and output aside);
* Torch-Pruning 1.6.1 (optional: ``pip install -r requirements-bench.txt``): the groups its
  ``DependencyGraph`` considers prunable,
  ``len(DG.get_all_groups(ignored_layers=[final classifier], root_module_types=[Conv2d, Linear]))``,
  and the Conv/Linear layers whose output channels one of those groups prunes. Torch-Pruning has no
  notion of a frozen group (it prunes LayerNorm'd and grouped channels by magnitude, with no
  function-preserving fold or growth), so its column is one number of groups.

Usage::

    python benchmarks/coverage.py [--models mobilenet_v2,densenet121] [--out STEM]

Writes ``benchmarks/results/coverage.json`` (naming the machine and versions) and
``coverage.md`` (the README table), and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: run as a script)
from svdgrow import Resizer  # noqa: E402
from svdgrow.trace import CouplingWarning  # noqa: E402

MODELS = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "resnext50_32x4d",
    "convnext_tiny",
    "regnet_y_400mf",
]

# what a freeze reason is about, for the table (first match)
REASONS = (
    ("grouped convolution", "grouped conv"),
    ("channel multiplier", "depthwise multiplier"),
    ("layer norm over the channel dim", "LayerNorm over channels"),
    ("GroupNorm", "GroupNorm"),
    ("model output", "model output"),
    ("model input", "model input"),
)


def conv_linear(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def svdgrow_counts(model: nn.Module, x: torch.Tensor) -> dict:
    """Resizable groups, resizable layers and freeze reasons, from a Resizer on ``model``."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CouplingWarning)
        rs = Resizer(model, x)
    seconds = time.perf_counter() - t0
    graph, resizable = rs.graph, rs.resizable()
    layers = {
        n
        for g in resizable
        for n in g.producers + [c for c in g.channelwise if graph.channelwise[c].kind == "layer"]
    }
    why: Counter = Counter()
    for g in graph.groups:
        if g in resizable:
            continue
        text = g.frozen or ""
        label = next((short for key, short in REASONS if key in text), "other")
        if label not in ("model input", "model output"):
            why[label] += 1
    return {
        "groups": len(graph.groups),
        "resizable": len(resizable),
        "layers": len(conv_linear(model)),
        "resizable_layers": len(layers),
        "frozen_because": dict(why),
        "seconds": round(seconds, 3),
    }


def torch_pruning_counts(model: nn.Module, x: torch.Tensor) -> dict | None:
    """Torch-Pruning's prunable groups and layers, or None when it is not installed."""
    try:
        import torch_pruning as tp  # noqa: PLC0415 - optional benchmark dependency
    except ImportError:
        return None
    t0 = time.perf_counter()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with warnings.catch_warnings():  # it warns about ConvNeXt's layer scales, which it prunes
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    groups = list(
        dg.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear])
    )
    out_fns = (
        tp.prune_conv_out_channels,
        tp.prune_depthwise_conv_out_channels,
        tp.prune_linear_out_channels,
    )
    layers = {
        dep.target.module
        for g in groups
        for dep, _ in g
        if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and dep.handler in out_fns
    }
    return {
        "version": importlib.metadata.version("torch-pruning"),
        "groups": len(groups),
        "prunable_layers": len(layers),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def markdown(res: dict) -> str:
    head = (
        f"Coverage on torchvision {res['torchvision']} models (full size, traced on a "
        f"{res['input']} batch), {res['device']}; Torch-Pruning "
        f"{res['torch_pruning'] or 'not installed'}.\n\n"
        "| model | svdgrow: resizable groups | svdgrow: layers whose width changes | "
        "Torch-Pruning: prunable groups | Torch-Pruning: layers it prunes | "
        "svdgrow freezes (besides input and output) |\n"
        "|---|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for name, r in res["models"].items():
        s, t = r["svdgrow"], r["torch_pruning"]
        frozen = ", ".join(f"{k}: {v}" for k, v in sorted(s["frozen_because"].items())) or "-"
        tp_groups = "-" if t is None else str(t["groups"])
        tp_layers = "-" if t is None else f"{t['prunable_layers']} / {s['layers']}"
        rows.append(
            f"| {name} | {s['resizable']} / {s['groups']} | {s['resizable_layers']} / "
            f"{s['layers']} | {tp_groups} | {tp_layers} | {frozen} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    ap.add_argument("--side", type=int, default=64, help="input height and width")
    ap.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "coverage"), help="stem"
    )
    args = ap.parse_args()
    import torchvision  # noqa: PLC0415 - the models come from torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, args.side, args.side)
    res = {
        "device": cpu_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "input": f"2 x 3 x {args.side} x {args.side}",
        "torch_pruning": None,
        "models": {},
    }
    for name in args.models.split(","):
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        s = svdgrow_counts(model, x)
        t = torch_pruning_counts(getattr(torchvision.models, name)(num_classes=10).eval(), x)
        if t is not None:
            res["torch_pruning"] = t["version"]
        res["models"][name] = {"svdgrow": s, "torch_pruning": t}
        print(
            f"{name}: svdgrow {s['resizable']}/{s['groups']}, Torch-Pruning "
            f"{'-' if t is None else t['groups']}",
            flush=True,
        )
    table = markdown(res)
    print()
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
