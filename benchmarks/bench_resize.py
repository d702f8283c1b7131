"""Time a resize step against a training step on small and large models, and compare the prune
modes' output change after an equal cut.

Models (``--models``): ``mnist-2m`` (the ~2.3M-parameter MNIST ResNet of ``svdgrow.app.models``),
``mlp`` (784-512-256-10 with BatchNorm and ReLU), ``mobilenet_v2`` (torchvision, width 0.5, 10
classes, 3x32x32), ``densenet`` (torchvision DenseNet, growth 12, blocks 6-12-24-16, 3x32x32),
``resnet18`` (torchvision, 10 classes, 3x32x32).

Timing, per model (median of ``--repeats``, each on a fresh copy with SGD momentum state):

* ``train``: one SGD step at batch ``--batch`` (forward, backward, step);
* ``Resizer.step()`` with a policy that prunes every resizable group by ``--fraction``, in each
  mode: ``weights``, ``data`` (fold fitted on the training batch), ``magnitude`` and ``auto``
  without data (the weights fold, or magnitude where that is measured better on the example
  input), each split into analyse / decide / apply; the one-time trace;
* the floor of an exact spectrum: the Gram products alone (``G G^T`` on the short side of each
  resizable group's matrix, float32, ``n^2 D`` multiply-adds; no eigenvalues, no decision, no
  fold), what any resize that reads every group's exact spectrum must at least compute. Where
  it exceeds a training step, no resize of that kind can cost less than one; and with it the
  floors of weights mode (those Grams' eigenvalues, float32 ``eigvalsh``) and of data mode (plus
  one forward pass of the batch, eval mode, no gradients).

Quality (``--quality-steps`` > 0, CPU only): each model trained briefly (MNIST for the ResNet,
Fashion-MNIST otherwise, padded to 3x32x32 where the model wants it), then every resizable
group cut by each of ``--cuts`` at once, no fine-tuning: relative change of the output and
accuracy on held data, per mode (data mode fitted on 256 training samples; the example input
is 8 training samples).

Writes ``benchmarks/results/bench_resize_<device>[_<threads>thread].json`` and ``.md`` naming
the CPU (or GPU), the threads, the load average and the torch version::

    python benchmarks/bench_resize.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import cpu_name, write_results  # noqa: E402  (benchmarks/ is on sys.path: run as a script)
from svdgrow.app import models  # noqa: E402
from svdgrow.app.data import load_dataset  # noqa: E402
from svdgrow.policy import Policy  # noqa: E402
from svdgrow.resizer import Resizer  # noqa: E402
from svdgrow.spectrum import group_matrix  # noqa: E402

MODES = ("weights", "data", "magnitude", "auto")


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def _densenet() -> nn.Module:
    return torchvision.models.DenseNet(
        growth_rate=12, block_config=(6, 12, 24, 16), num_init_features=24, num_classes=10
    )


#: name -> (builder, input shape, dataset of the quality section, its training steps)
MODELS = {
    "mnist-2m": (lambda: models.build_model(models.preset_spec("mnist-2m")), (1, 28, 28),
                 "mnist", 60),
    "mlp": (_mlp, (1, 28, 28), "fashion-mnist", 300),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5),
                     (3, 32, 32), "fashion-mnist", 150),
    "densenet": (_densenet, (3, 32, 32), "fashion-mnist", 100),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32),
                 "fashion-mnist", 100),
}  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def med(xs):
    return statistics.median(xs)


def _sgd(model, state=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if state is not None:
        opt.load_state_dict(state)
    return opt


def time_model(name: str, args, device) -> dict:
    """Training step and resize step (each mode, with its split) of one model."""
    build, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device)
    x = torch.randn(args.batch, *shape, device=device)
    t = torch.randint(0, 10, (args.batch,), device=device)
    opt = _sgd(model)

    def train_step(m, o):
        o.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), t).backward()
        o.step()

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    for _ in range(2):  # warm-up; the momentum state exists
        train_step(model, opt)
    train = [timed(lambda: train_step(model, opt))[0] for _ in range(args.repeats)]
    policy = Policy(
        energy_eps=0.5, min_width=1, max_prune_fraction=args.fraction, grow_threshold=1e9
    )
    trace_s, rs = timed(lambda: Resizer(model, x[:8], policy=policy))
    modules = dict(model.named_modules())
    mats = [group_matrix(modules, g, torch.float32)[0] for g in rs.resizable()]

    def grams():
        return [G @ G.T if G.shape[0] <= G.shape[1] else G.T @ G for G in mats]

    floor = [timed(grams)[0] for _ in range(args.repeats)]
    gs = grams()
    # the cheapest exact eigenvalues of those Grams (float32 LAPACK; the library solves them
    # in float64), and the forward pass data mode needs to see the batch's features
    eig = [timed(lambda: [torch.linalg.eigvalsh(g) for g in gs])[0] for _ in range(args.repeats)]

    def forward():
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()

    fwd = [timed(forward)[0] for _ in range(args.repeats)]
    res = {
        "params": sum(p.numel() for p in model.parameters()),
        "groups": f"{len(rs.resizable())}/{len(rs.graph.groups)}",
        "trace_s": trace_s,
        "train_step_s": med(train),
        "train_all": train,
        "gram_floor_s": med(floor),
        "gram_floor_to_train": med(floor) / med(train),
        "eig_floor_s": med(eig),
        "forward_s": med(fwd),
        "floor_weights_to_train": (med(floor) + med(eig)) / med(train),
        "floor_data_to_train": (med(floor) + med(eig) + med(fwd)) / med(train),
        "modes": {},
    }
    for mode in MODES:
        total, parts = [], []
        for _ in range(args.repeats):
            m = copy.deepcopy(model)
            o = _sgd(m, opt.state_dict())
            r = Resizer(m, x[:8], policy=policy, optimizer=o, graph=rs.graph, mode=mode)
            data = x if mode == "data" else None
            s, rep = timed(lambda r=r, data=data: r.step(data=data))
            total.append(s)
            parts.append(rep.seconds)
            train_step(m, o)  # training goes on with the same objects
        res["modes"][mode] = {
            "median_s": med(total),
            "all": total,
            "parts_median": {k: med([p[k] for p in parts]) for k in parts[0]},
            "ratio_to_train": med(total) / res["train_step_s"],
            "params_after": rep.params_after,
            "fallbacks": len(rep.fallbacks),
        }
    return res


def _prepare(x, shape):
    """Dataset images [N, 1, 28, 28] as the model wants them (zero-padded, 3 channels)."""
    if shape[0] == 3:
        x = nn.functional.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return x


def quality_model(name: str, cuts, steps: int, seed: int = 0) -> dict:
    """Train briefly, cut every resizable group by each fraction in each mode, compare."""
    build, shape, dataset, _ = MODELS[name]
    torch.manual_seed(seed)
    train = load_dataset(dataset, True, subset=20000, download=False)
    test = load_dataset(dataset, False, subset=1000, download=False)
    m = build()
    opt = _sgd(m)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb, yb = train.batch(torch.randint(0, len(train), (128,), generator=g))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(_prepare(xb, shape)), yb).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    m.eval()
    xt, yt = test.batch(torch.arange(len(test)))
    xt = _prepare(xt, shape)
    xfit = _prepare(train.batch(torch.arange(256))[0], shape)
    with torch.no_grad():
        y0 = m(xt)
    rows = []
    for frac in cuts:
        for mode in MODES:
            mm = copy.deepcopy(m)
            rs = Resizer(mm, xfit[:8], mode=mode)
            names = {gr.name for gr in rs.resizable()}
            new = {n: max(1, w - int(w * frac)) for n, w in rs.widths().items() if n in names}
            rep = rs.apply(new, data=xfit if mode == "data" else None)
            with torch.no_grad():
                y1 = mm(xt)
            rows.append(
                {
                    "cut": frac,
                    "mode": mode,
                    "params": rep.params_after,
                    "rel_output_change": float((y1 - y0).norm() / y0.norm()),
                    "accuracy": float((y1.argmax(1) == yt).float().mean()),
                    "fallbacks": len(rep.fallbacks),
                }
            )
    return {
        "dataset": dataset,
        "train_steps": steps,
        "train_seconds": train_s,
        "accuracy_unpruned": float((y0.argmax(1) == yt).float().mean()),
        "test_samples": len(test),
        "rows": rows,
    }


def timing_table(res: dict, fraction: float) -> list[str]:
    lines = [
        f"Resize step (prune every resizable group by {fraction:.0%}) against one training "
        "step (SGD, batch 128); seconds, median; split analyse / decide / apply:",
        "",
        "| model | params | groups | train step | mode | resize | analyse | decide | apply "
        "| resize / train |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        for i, (mode, d) in enumerate(r["modes"].items()):
            p = d["parts_median"]
            head = f"| {name} | {r['params']:,} | {r['groups']} | {r['train_step_s']:.4f} |"
            head = head if i == 0 else "| | | | |"
            lines.append(
                f"{head} {mode} | {d['median_s']:.4f} | {p['analyse']:.4f} | {p['decide']:.4f} "
                f"| {p['apply']:.4f} | {d['ratio_to_train']:.2f} |"
            )
    lines += ["", "trace (once per Resizer): " + ", ".join(
        f"{n} {r['trace_s']:.3f} s" for n, r in res.items())]  # fmt: skip
    floors = [(n, r) for n, r in res.items() if "floor_data_to_train" in r]
    if floors:
        lines += [
            "",
            "Floor of a resize that reads every resizable group's exact spectrum, against one "
            "training step: the Gram products on each group matrix's short side (float32, "
            "`n^2 D` multiply-adds), their eigenvalues (float32 `eigvalsh`, the cheapest exact "
            "call), and for data mode one forward pass of the batch (eval mode, no gradients) "
            "to see its features. No decision, no fold. Where a floor is above 1, no resize of "
            "that kind can cost at most one training step on this machine.",
            "",
            "| model | train step (s) | Gram (s) | eigenvalues (s) | forward (s) "
            "| floor weights / train | floor data / train |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {n} | {r['train_step_s']:.4f} | {r['gram_floor_s']:.4f} | {r['eig_floor_s']:.4f} "
            f"| {r['forward_s']:.4f} | {r['floor_weights_to_train']:.2f} "
            f"| {r['floor_data_to_train']:.2f} |"
            for n, r in floors
        ]
    return lines


def quality_table(q: dict) -> list[str]:
    lines = [
        "Relative output change (and accuracy) on held data after cutting every resizable "
        "group at once, no fine-tuning:",
        "",
        "| model | trained | cut | magnitude | weights | auto (no data) | data |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in q.items():
        if "rows" not in r:
            lines.append(f"| {name} | skipped: {r.get('skipped')} | | | | | |")
            continue
        trained = f"{r['train_steps']} steps, acc {r['accuracy_unpruned']:.3f}"
        for cut in sorted({row["cut"] for row in r["rows"]}):
            cell = {
                row["mode"]: f"{row['rel_output_change']:.3f} ({row['accuracy']:.3f})"
                for row in r["rows"]
                if row["cut"] == cut
            }
            lines.append(
                f"| {name} | {trained} | {cut:.0%} | {cell['magnitude']} | {cell['weights']} "
                f"| {cell['auto']} | {cell['data']} |"
            )
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported")
    ap.add_argument("--fraction", type=float, default=0.1, help="prune per group (default 0.1)")
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS)
    )
    ap.add_argument("--quality-steps", type=float, default=1.0,
                    help="multiplier of each model's quality training steps (0: skip)")  # fmt: skip
    ap.add_argument("--cuts", default="0.1,0.25", help="quality: fractions cut (default 0.1,0.25)")
    ap.add_argument("--note", default="", help="a line about the machine (shared, loaded...)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in args.models.split(",") if n]
    timing = {}
    for n in names:
        timing[n] = time_model(n, args, device)
        print(f"{n}: timed", flush=True)
    quality = {}
    if args.quality_steps and device.type == "cpu":
        cuts = [float(c) for c in args.cuts.split(",")]
        for n in names:
            steps = max(1, round(MODELS[n][3] * args.quality_steps))
            try:
                quality[n] = quality_model(n, cuts, steps)
            except Exception as e:  # data missing: the timing still stands
                quality[n] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"{n}: quality", flush=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    res = {
        "device": dev_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": args.note,
        "batch": args.batch,
        "repeats": args.repeats,
        "prune_fraction": args.fraction,
        "timing": timing,
        "quality": quality,
    }
    head = (
        f"bench_resize on {dev_name} ({device.type}, {res['threads']} threads, {os.cpu_count()} "
        f"cores), torch {torch.__version__}, median of {args.repeats}"
    )
    text = [head] + ([args.note] if args.note else []) + [""] + timing_table(timing, args.fraction)
    if quality:
        text += [""] + quality_table(quality)
    print("\n".join(text))
    suffix = f"_{res['threads']}thread" if args.threads == 1 else ""
    stem = args.out or os.path.join(
        ROOT, "benchmarks", "results", f"bench_resize_{device.type}{suffix}"
    )
    write_results(stem, res, text)
    return res


if __name__ == "__main__":
    main()
