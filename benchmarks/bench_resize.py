"""Time a whole resize step against one training step of the same model.

The model is the ~2.3M-parameter MNIST ResNet (``svdgrow.app.models`` preset ``mnist-2m``): stem
conv 1->128, residual
blocks of two 3x3 convs with LeakyReLU and BatchNorm at 256 channels, two stride-2
downsamplings with 1x1 projection shortcuts, Flatten + Linear(256*7*7, 10).

Timed (median of ``--repeats``):

* ``train_step``: one SGD (momentum) step at batch ``--batch`` (forward, backward, step);
* ``resize_step``: ``Resizer.step()`` = analyse (ONE batched SVD of every group matrix) +
  decide + apply, with a policy that prunes every group by 10% (``max_prune_fraction=0.1``),
  the SGD momentum following; each repeat on a fresh copy of the trained model;
* its parts (analyse / decide / apply), the same step in ``mode="data"`` on one batch, a
  growth step (every group below its input-dimension cap +10%), the one-time trace, and the spectrum's SVD through
  ``svdgrow.ops.batched_svd`` vs a loop of ``torch.linalg.svd``.

Writes ``benchmarks/results/bench_resize_<device>.json`` and ``.md`` naming the CPU (or GPU)
and the torch version. Run it when the machine is quiet::

    python benchmarks/bench_resize.py --threads 2
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

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from svdgrow import ops  # noqa: E402
from svdgrow.app import models  # noqa: E402
from svdgrow.app.data import load_dataset  # noqa: E402
from svdgrow.policy import Policy  # noqa: E402
from svdgrow.resizer import Resizer  # noqa: E402
from svdgrow.spectrum import group_matrix  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def med(xs):
    return statistics.median(xs)


QUALITY_SPEC = {
    "arch": "resnet",
    "in_channels": 1,
    "num_classes": 10,
    "input_size": 28,
    "bn": True,
    "stem": 32,
    "blocks": [
        {"mid": 64, "out": 64, "stride": 2, "projection": True},
        {"mid": 32, "out": 64, "stride": 1, "projection": False},
        {"mid": 32, "out": 64, "stride": 2, "projection": True},
    ],
}


def quality(steps: int = 300, fractions=(0.25, 0.5), seed: int = 0) -> dict:
    """Prune a briefly trained MNIST ResNet by each mode; compare output change and accuracy.

    The weights-mode and data-mode folds against naive magnitude pruning (keep the largest
    rows, fold nothing), by the change in network output on held data (docs/design.md,
    "Stage 4: surgery"). Every resizable group is cut by ``fraction`` at once, no fine-tuning.
    """
    torch.manual_seed(seed)
    train = load_dataset("mnist", True, subset=20000, download=False)
    test = load_dataset("mnist", False, subset=2000, download=False)
    m = models.build_model(QUALITY_SPEC)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb, yb = train.batch(torch.randint(0, len(train), (128,), generator=g))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    m.eval()
    xt, yt = test.batch(torch.arange(len(test)))
    xfit, _ = train.batch(torch.arange(256))
    with torch.no_grad():
        y0 = m(xt)
    acc0 = float((y0.argmax(1) == yt).float().mean())
    rows = []
    for frac in fractions:
        for mode in ("weights", "data", "magnitude"):
            mm = copy.deepcopy(m)
            rs = Resizer(mm, xt[:1], mode=mode)
            names = {gr.name for gr in rs.resizable()}
            new = {n: max(1, w - int(w * frac)) for n, w in rs.widths().items() if n in names}
            rep = rs.apply(new, data=xfit)
            with torch.no_grad():
                y1 = mm(xt)
            rows.append(
                {
                    "fraction": frac,
                    "mode": mode,
                    "params": rep.params_after,
                    "rel_output_change": float((y1 - y0).norm() / y0.norm()),
                    "accuracy": float((y1.argmax(1) == yt).float().mean()),
                    "agreement_with_unpruned": float((y1.argmax(1) == y0.argmax(1)).float().mean()),
                }
            )
    return {
        "spec": QUALITY_SPEC,
        "train_steps": steps,
        "train_seconds": train_s,
        "params": sum(p.numel() for p in m.parameters()),
        "test_samples": len(test),
        "accuracy_unpruned": acc0,
        "rows": rows,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported")
    ap.add_argument(
        "--fraction", type=float, default=0.1, help="fraction of every group pruned (default 0.1)"
    )
    ap.add_argument(
        "--quality-steps",
        type=int,
        default=300,
        help="training steps of the quality comparison (0: skip it)",
    )
    ap.add_argument(
        "--out", default=None, help="output stem (default benchmarks/results/bench_resize_<device>)"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build_model(models.preset_spec("mnist-2m")).to(device)
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    t = torch.randint(0, 10, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def train_step(m, o):
        o.zero_grad(set_to_none=True)
        loss_fn(m(x), t).backward()
        o.step()

    for _ in range(2):  # warm-up, and momentum state exists
        train_step(model, opt)
    sync(device)
    train_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_step(model, opt)
        sync(device)
        train_times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())

    def fresh():
        m = copy.deepcopy(model)
        o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        o.load_state_dict(opt.state_dict())
        return m, o

    prune_policy = Policy(
        energy_eps=0.5, min_width=1, max_prune_fraction=args.fraction, grow_threshold=1e9
    )
    example = x[:1]
    # one-time trace
    m, o = fresh()
    t0 = time.perf_counter()
    rs = Resizer(m, example, policy=prune_policy, optimizer=o)
    trace_s = time.perf_counter() - t0
    graph = rs.graph
    rep = rs.step()  # warm-up of the whole path
    widths_before, widths_after = rep.widths_before, rep.widths_after

    def timed_steps(mode, policy, data=None, explicit=None):
        total, parts = [], []
        for _ in range(args.repeats):
            m, o = fresh()
            rs = Resizer(m, example, policy=policy, optimizer=o, mode=mode, graph=graph)
            sync(device)
            t0 = time.perf_counter()
            r = rs.apply(explicit, data=data) if explicit is not None else rs.step(data=data)
            sync(device)
            total.append(time.perf_counter() - t0)
            parts.append(r.seconds)
            # training still works on the same objects
            train_step(m, o)
        return total, parts, r

    resize_t, resize_parts, rep_w = timed_steps("weights", prune_policy)
    data_t, data_parts, rep_d = timed_steps("data", prune_policy, data=x)
    m0, _ = fresh()
    rs0 = Resizer(m0, example, graph=graph)
    caps = {s.name: s.cap for s in rs0.analyse()}
    w0 = rs0.widths()
    # every group that is below its input-dimension cap grows by the fraction (capped)
    grow_w = {
        n: min(w0[n] + max(1, round(w0[n] * args.fraction)), caps[n])
        for n in caps
        if w0[n] < caps[n]
    }
    grow_t, grow_parts, rep_g = timed_steps("weights", prune_policy, explicit=grow_w)

    # SVD of the group matrices: one batched op call vs a loop of torch.linalg.svd
    mods = dict(model.named_modules())
    mats = [group_matrix(mods, g)[0] for g in graph.groups if g.frozen is None and g.producers]
    svd_op, svd_loop = [], []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        ops.batched_svd(mats)
        sync(device)
        svd_op.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for a in mats:
            torch.linalg.svd(a, full_matrices=False)
        sync(device)
        svd_loop.append(time.perf_counter() - t0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    res = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "model": "mnist-2m ResNet",
        "params": params,
        "batch": args.batch,
        "repeats": args.repeats,
        "prune_fraction": args.fraction,
        "groups": len(mats),
        "group_matrix_shapes": [list(a.shape) for a in mats],
        "trace_s": trace_s,
        "train_step_s": {"median": med(train_times), "all": train_times},
        "resize_step_s": {
            "median": med(resize_t),
            "all": resize_t,
            "parts_median": {k: med([p[k] for p in resize_parts]) for k in resize_parts[0]},
        },
        "resize_step_data_mode_s": {
            "median": med(data_t),
            "all": data_t,
            "parts_median": {k: med([p[k] for p in data_parts]) for k in data_parts[0]},
        },
        "grow_step_s": {"median": med(grow_t), "all": grow_t, "widths": grow_w},
        "svd_batched_op_s": med(svd_op),
        "svd_torch_loop_s": med(svd_loop),
        "params_after_prune": rep_w.params_after,
        "params_after_grow": rep_g.params_after,
        "widths_before": widths_before,
        "widths_after_prune": widths_after,
        "ratio_resize_over_train": med(resize_t) / med(train_times),
    }
    rows = [
        (f"training step (SGD, batch {args.batch})", med(train_times)),
        (
            f"resize step, weights mode (prune every group {round(100 * args.fraction)}%)",
            med(resize_t),
        ),
        ("  analyse (one batched SVD)", res["resize_step_s"]["parts_median"]["analyse"]),
        ("  decide", res["resize_step_s"]["parts_median"]["decide"]),
        ("  apply (fold + one slice_copy + commit)", res["resize_step_s"]["parts_median"]["apply"]),
        (f"resize step, data mode (features of batch {args.batch})", med(data_t)),
        (
            f"grow step ({len(grow_w)} groups below their cap +{round(100 * args.fraction)}%, apply)",
            med(grow_t),
        ),
        ("trace (once per Resizer)", trace_s),
        (f"SVD of {len(mats)} group matrices: svdgrow.ops.batched_svd", med(svd_op)),
        (f"SVD of {len(mats)} group matrices: loop of torch.linalg.svd", med(svd_loop)),
    ]
    head = (
        f"bench_resize on {name} ({device.type}, {res['threads']} threads), torch {torch.__version__}, "
        f"model {params:,} params, median of {args.repeats}"
    )
    table = [head, "", "| what | seconds |", "|---|---:|"] + [f"| {a} | {b:.4f} |" for a, b in rows]
    table.append("")
    table.append(
        f"resize step / training step = {res['ratio_resize_over_train']:.3f} (target <= 1)"
    )
    if args.quality_steps and device.type == "cpu":
        try:
            q = quality(args.quality_steps)
        except Exception as e:  # data missing: the timing still stands
            q = {"skipped": f"{type(e).__name__}: {e}"}
        res["quality"] = q
        table += [
            "",
            "Output change on held data after cutting every group at once (no fine-tuning):",
            "",
        ]
        if "rows" in q:
            table.append(
                f"MNIST ResNet {q['params']:,} params, {q['train_steps']} SGD steps, test accuracy "
                f"{q['accuracy_unpruned']:.4f} on {q['test_samples']} held samples"
            )
            table += [
                "",
                "| cut | mode | params | rel. output change | accuracy | agrees with unpruned |",
                "|---:|---|---:|---:|---:|---:|",
            ]
            for r in q["rows"]:
                table.append(
                    f"| {r['fraction']:.0%} | {r['mode']} | {r['params']:,} | {r['rel_output_change']:.4f} | "
                    f"{r['accuracy']:.4f} | {r['agreement_with_unpruned']:.4f} |"
                )
        else:
            table.append(f"skipped: {q['skipped']}")
    text = "\n".join(table)
    print(text)
    stem = args.out or os.path.join(ROOT, "benchmarks", "results", f"bench_resize_{device.type}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
