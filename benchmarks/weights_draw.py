"""How much weights mode's output change depends on its Gaussian draw: the bench_resize quality
model (trained as there), every resizable group cut by ``--cut`` in weights mode once per resizer
seed, the relative output change on held data per seed, mean and spread.

Writes ``benchmarks/results/weights_draw_<model>[_<tag>].json`` naming the CPU and the svdgrow
it imported (run it with another checkout on PYTHONPATH to compare code)::

    python benchmarks/weights_draw.py --model mnist-2m --seeds 6
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_resize as br  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

import svdgrow  # noqa: E402
from _common import cpu_name  # noqa: E402
from svdgrow.app.data import load_dataset  # noqa: E402
from svdgrow.resizer import Resizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mnist-2m", choices=sorted(br.MODELS))
    ap.add_argument("--seeds", type=int, default=6, help="resizer seeds 0..N-1")
    ap.add_argument("--cut", type=float, default=0.25)
    ap.add_argument("--tag", default="", help="suffix of the output file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    build, shape, dataset, steps = br.MODELS[args.model]
    torch.manual_seed(0)
    train = load_dataset(dataset, True, subset=20000, download=False)
    test = load_dataset(dataset, False, subset=1000, download=False)
    m, g = build(), torch.Generator().manual_seed(0)
    opt = br._sgd(m)
    for _ in range(steps):  # as bench_resize's quality section trains it
        xb, yb = train.batch(torch.randint(0, len(train), (128,), generator=g))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(br._prepare(xb, shape)), yb).backward()
        opt.step()
    m.eval()
    xt = br._prepare(test.batch(torch.arange(len(test)))[0], shape)
    xfit = br._prepare(train.batch(torch.arange(256))[0], shape)
    with torch.no_grad():
        y0 = m(xt)
    changes = []
    for seed in range(args.seeds):
        mm = copy.deepcopy(m)
        rs = Resizer(mm, xfit[:8], mode="weights", seed=seed)
        names = {gr.name for gr in rs.resizable()}
        rs.apply({n: max(1, w - int(w * args.cut)) for n, w in rs.widths().items() if n in names})
        with torch.no_grad():
            changes.append(float((mm(xt) - y0).norm() / y0.norm()))
    res = {
        "cpu": cpu_name(),
        "svdgrow": os.path.dirname(svdgrow.__file__),
        "torch": torch.__version__,
        "model": args.model,
        "cut": args.cut,
        "rel_output_change": changes,
        "mean": statistics.mean(changes),
        "sd": statistics.stdev(changes) if len(changes) > 1 else 0.0,
    }
    print(
        f"{args.model}, weights mode, {args.cut:.0%} cut, {args.seeds} resizer seeds: "
        f"{res['mean']:.3f} ± {res['sd']:.3f}  ({', '.join(f'{c:.3f}' for c in changes)})"
    )
    tag = f"_{args.tag}" if args.tag else ""
    path = os.path.join(ROOT, "benchmarks", "results", f"weights_draw_{args.model}{tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
