"""Benchmark svdgrow.ops.batched_svd against per-matrix torch SVD loops on real layer shapes.

Two matrix sets, each a list of layer weights reshaped to ``out x (in * kh * kw)``:

* ``mnist-2m``: the ~2M-parameter MNIST ResNet (svdgrow's ``mnist-2m`` preset): stem 1->128,
  a 128->256 stride-2 block with a 1x1 projection, a 256->128->256 block, a 256->128->256
  stride-2 block with a projection, and the 10 x 256*7*7 head.
* ``resnet18``: every convolution of torchvision's resnet18 with a 1-channel stem.

Methods, all timed in the same run: warm-up, then ``--repeats`` rounds that run each method
once in turn (so that changes in machine load hit all alike); the median is reported:

* ``batched_svd full``: one ``svdgrow.ops.batched_svd(mats)`` call.
* ``batched_svd top-k``: ``k = min(m, n) // 4`` per matrix (at least 1), ``randomized=True``
  (on CUDA the range finder, the counterpart of ``svd_lowrank``; the CPU kernel is exact); the
  op takes one ``k`` per call, so this makes one call per distinct ``k`` (the count is printed).
* ``loop linalg.svd``: ``torch.linalg.svd(A, full_matrices=False)`` per matrix (the baseline).
* ``loop linalg.svdvals``: singular values only, per matrix.
* ``loop svd_lowrank top-k``: ``torch.svd_lowrank(A, q=k, niter=2)`` per matrix.

Accuracy columns, against a float64 ``torch.linalg.svd`` of each matrix: the largest relative
error of the singular values that are >= 1e-3 sigma_max (over the values each method
returns), and for top-k the largest Frobenius norm of ``U_k U_k^T - U_ref U_ref^T``. The
weights are synthetic with a power-law spectrum (``--spectrum``) so that top-k subspaces are
defined; the gap column gives the largest ``sigma_{k+1} / sigma_k`` over the set.

Writes a JSON file naming the machine (CPU model or GPU name, torch version, threads) to
``benchmarks/results/bench_svd_<device>.json`` (``--out``) and a Markdown copy of the table
beside it.

Example::

    python benchmarks/bench_svd.py --device cpu --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from svdgrow import ops

MNIST_2M = [
    (128, 1 * 9),  # stem conv 1 -> 128
    (256, 128 * 9),  # block 1 conv1 128 -> 256, stride 2
    (256, 256 * 9),  # block 1 conv2 256 -> 256
    (256, 128),  # block 1 projection 1x1 128 -> 256
    (128, 256 * 9),  # block 2 conv1 256 -> 128
    (256, 128 * 9),  # block 2 conv2 128 -> 256
    (128, 256 * 9),  # block 3 conv1 256 -> 128, stride 2
    (256, 128 * 9),  # block 3 conv2 128 -> 256
    (256, 256),  # block 3 projection 1x1 256 -> 256
    (10, 256 * 7 * 7),  # head after Flatten
]


def resnet18_shapes() -> list[tuple[int, int]]:
    """Convolution weights of torchvision's resnet18 with a 1-channel stem, as (out, in*kh*kw)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return [
        (m.weight.shape[0], m.weight[0].numel())
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


def make_weights(shapes, spectrum: str, seed: int, device, dtype) -> list[torch.Tensor]:
    """Synthetic weights: a power-law spectrum sigma_i = (i + 1)^-0.5 / sqrt(fan_in), or Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for m, n in shapes:
        if spectrum == "gaussian":
            a = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        else:
            p = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))
            s = torch.arange(1, p + 1, dtype=torch.float64).pow(-0.5) * math.sqrt(p / n)
            a = (u * s) @ v.T
        mats.append(a.to(device=device, dtype=dtype))
    return mats


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> list[list[float]]:
    """Wall times of each function, taken in turns (one run of each per round), so that a
    change in machine load hits all methods alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return times


def reference(mats):
    refs = []
    for a in mats:
        u, s, vh = torch.linalg.svd(a.detach().double().cpu(), full_matrices=False)
        refs.append((u, s))
    return refs


def sigma_error(s_list, refs) -> float:
    worst = 0.0
    for s, (_, sr) in zip(s_list, refs, strict=True):
        s = s.double().cpu()
        r = s.numel()
        ref = sr[:r]
        keep = ref >= 1e-3 * sr[0]
        if keep.any():
            worst = max(worst, float(((s[keep] - ref[keep]).abs() / ref[keep]).max()))
    return worst


def projector_error(u_list, refs, ks) -> float:
    worst = 0.0
    for u, (ur, _), k in zip(u_list, refs, ks, strict=True):
        uk = u.double().cpu()[:, :k]
        urk = ur[:, :k]
        worst = max(worst, float((uk @ uk.T - urk @ urk.T).norm()))
    return worst


def run_set(name: str, mats, device, repeats: int, warmup: int) -> list[dict]:
    ks = [max(1, min(a.shape) // 4) for a in mats]
    refs = reference(mats)
    gap = max(
        float(sr[k] / sr[k - 1]) if k < sr.numel() else 0.0
        for (_, sr), k in zip(refs, ks, strict=True)
    )
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(ks):
        groups.setdefault(k, []).append(i)

    def batched_full():
        return ops.batched_svd(mats)

    def batched_topk():
        S, U = [None] * len(mats), [None] * len(mats)
        for k, idx in groups.items():
            s, u, _ = ops.batched_svd([mats[i] for i in idx], k=k, randomized=True)
            for i, si, ui in zip(idx, s, u, strict=True):
                S[i], U[i] = si, ui
        return S, U

    def loop_svd():
        outs = [torch.linalg.svd(a, full_matrices=False) for a in mats]
        return [o[1] for o in outs], [o[0] for o in outs]

    def loop_svdvals():
        return [torch.linalg.svdvals(a) for a in mats]

    def loop_lowrank():
        outs = [torch.svd_lowrank(a, q=k, niter=2) for a, k in zip(mats, ks, strict=True)]
        return [o[1] for o in outs], [o[0] for o in outs]

    methods = [
        ("batched_svd full", batched_full, "full"),
        (f"batched_svd top-k ({len(groups)} calls)", batched_topk, "topk"),
        ("loop linalg.svd", loop_svd, "full"),
        ("loop linalg.svdvals", loop_svdvals, "vals"),
        ("loop svd_lowrank top-k", loop_lowrank, "topk"),
    ]
    rows = []
    all_times = time_round_robin([fn for _, fn, _ in methods], device, repeats, warmup)
    for (label, fn, kind), times in zip(methods, all_times, strict=True):
        out = fn()
        if kind == "vals":
            s_list, u_list = out, None
        elif label.startswith("batched_svd full"):
            s_list, u_list = out[0], out[1]
        else:
            s_list, u_list = out
        rows.append(
            dict(
                set=name,
                method=label,
                kind=kind,
                median_s=statistics.median(times),
                times_s=times,
                sigma_rel_err=sigma_error(s_list, refs),
                proj_err_topk=None if u_list is None else projector_error(u_list, refs, ks),
            )
        )
    base = next(r["median_s"] for r in rows if r["method"] == "loop linalg.svd")
    for r in rows:
        r["speedup_vs_loop_svd"] = base / r["median_s"]
    for r in rows:
        r["max_gap_ratio"] = gap
    return rows


def table(rows, info) -> str:
    head = (
        f"Device: {info.get('gpu', info['cpu'])} ({info['device']}), torch {info['torch']}, "
        f"{info['threads']} threads, load average {info.get('loadavg_at_start', ['?'])[0]} at start, "
        f"{info.get('loadavg_at_end', ['?'])[0]} at end (1 min; the machine is shared)\n\n"
        "| set | method | median ms | speedup vs loop svd | max rel sigma err (>=1e-3 smax) | top-k projector err |\n"
        "|---|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        proj = "-" if r["proj_err_topk"] is None else f"{r['proj_err_topk']:.2e}"
        lines.append(
            f"| {r['set']} | {r['method']} | {r['median_s'] * 1e3:.1f} | {r['speedup_vs_loop_svd']:.2f}x | "
            f"{r['sigma_rel_err']:.2e} | {proj} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on: cpu (default) or cuda"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per method; the median is reported (default 5)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed runs per method before timing (default 2)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="weight dtype (default float32)",
    )
    parser.add_argument(
        "--spectrum",
        default="powerlaw",
        choices=["powerlaw", "gaussian"],
        help="synthetic weights: power-law singular values (default) or i.i.d. Gaussian",
    )
    parser.add_argument(
        "--sets",
        default="mnist-2m,resnet18",
        help="comma-separated matrix sets (mnist-2m, resnet18)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output path (default benchmarks/results/bench_svd_<device>.json); a .md table is written beside it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: leave torch's default, all cores)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_svd: --device cuda but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    info = machine(device)
    print(f"machine: {json.dumps(info)}")
    sets = {"mnist-2m": MNIST_2M, "resnet18": None}
    rows = []
    for name in args.sets.split(","):
        if name not in sets:
            raise SystemExit(f"bench_svd: unknown set {name!r}; known: {', '.join(sets)}")
        shapes = sets[name] if sets[name] is not None else resnet18_shapes()
        print(f"{name}: {len(shapes)} matrices {shapes}")
        mats = make_weights(shapes, args.spectrum, args.seed, device, dtype)
        rows += run_set(name, mats, device, args.repeats, args.warmup)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = table(rows, info)
    print()
    print(text)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"bench_svd_{device.type}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(machine=info, args=vars(args), rows=rows), f, indent=2)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(
            f"# bench_svd ({args.dtype}, {args.spectrum} spectrum, median of {args.repeats})\n\n"
        )
        f.write(text)
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
