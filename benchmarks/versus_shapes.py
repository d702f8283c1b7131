"""The searched network against uniform narrowing of *other* large networks, across frontier folders.

``frontier.py`` compares a method with uniform narrowing of the same large network (one
``--out`` folder). Whether the search is worth running also depends on what a user would get by
narrowing a *different* network uniformly (``frontier.py --preset-spec``, e.g. the deeper ``d5``
of ``benchmarks/results/explore_depth6k_cpu``). This script reads finished cells from several
folders and puts, for each (dataset, budget), every searched set (the default recipe's cells,
``frontier.RECIPE_METHOD``) beside every uniform set, interpolated to the searched set's mean
size exactly as frontier.py does (log-linear between the two sizes around it; the standard
error of the difference combines both sides' seeds, Welch). It runs nothing::

    E=benchmarks/results/explore_depth6k_cpu
    python benchmarks/versus_shapes.py \\
        --searched mnist-2m=benchmarks/results/frontier_cpu --searched d5=$E/d5 \\
        --uniform mnist-2m=benchmarks/results/frontier_cpu \\
        --uniform d5=$E/d5 --uniform d5=$E/fashion30k --out $E/versus_shapes

A LABEL may be given with several folders (their cells are pooled; a cell key found twice is an
error). ``--method LABEL=METHOD`` reads a searched label's METHOD cells instead of the default
recipe's (a variant, e.g. ``--method d5-r8=f8s8``). Writes ``OUT.json`` (the machine, the folders, every row) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402  (benchmarks/ on sys.path: run as a script)


def _labelled(pairs: list[str], flag: str) -> dict[str, list[Path]]:
    """``LABEL=DIR`` arguments as {label: [dirs]}; a one-line error for a malformed one."""
    out: dict[str, list[Path]] = {}
    for p in pairs:
        label, sep, folder = p.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"versus_shapes: {flag} takes LABEL=DIR, got {p!r}")
        if not (Path(folder) / "runs").is_dir():
            raise SystemExit(f"versus_shapes: {flag} {p}: no runs/ folder in {folder} "
                             "(give a frontier.py --out folder)")  # fmt: skip
        out.setdefault(label, []).append(Path(folder))
    return out


def pooled_groups(folders: list[Path]) -> dict[tuple, list[dict]]:
    """The finished cells of ``folders``, grouped by (dataset, budget, method)."""
    cells: dict[tuple, dict] = {}
    for folder in folders:
        for key, cell in frontier.load_results(folder).items():
            if key in cells:
                raise SystemExit(f"versus_shapes: cell {key} is in two folders of one label "
                                 f"(second: {folder})")  # fmt: skip
            cells[key] = cell
    groups: dict[tuple, list[dict]] = {}
    for (ds, budget, method, _), cell in sorted(cells.items()):
        groups.setdefault((ds, budget, method), []).append(cell)
    return groups


def compare(
    searched: dict[str, dict], uniform: dict[str, dict], methods: dict[str, str] | None = None
) -> list[dict]:
    """One row per (searched label, dataset, budget, uniform label) where both have cells;
    ``methods``: searched label -> the method to read (default: the dataset's recipe)."""
    rows = []
    for s_label, s_groups in searched.items():
        for ds, budget in sorted({(k[0], k[1]) for k in s_groups}):
            method = (methods or {}).get(s_label) or frontier.recipe_method(s_groups, ds, budget)
            if method is None or (ds, budget, method) not in s_groups:
                continue
            rs = s_groups[ds, budget, method]
            params, acc, var, n = frontier._stats(rs)
            sd = frontier._mean_sd([100 * r["test_acc"] for r in rs])[1]
            for u_label, u_groups in uniform.items():
                us = [u_groups[k] for k in ((ds, budget, "uniform"), (ds, budget, "uniform2"))
                      if k in u_groups]  # fmt: skip
                if not us:
                    continue
                points = [frontier._stats(u) for u in us]
                u_acc, u_var, at = frontier.uniform_at(points, params)
                se = math.sqrt(var + u_var)
                rows.append({
                    "dataset": ds, "budget": budget, "searched": s_label, "method": method,
                    "seeds": n, "params": params, "acc": acc, "sd": sd,
                    "uniform": u_label, "uniform_at": at,
                    "uniform_sizes": [{"params": p[0], "acc": p[1], "seeds": p[3]}
                                      for p in sorted(points)],
                    "uniform_acc": u_acc, "diff": acc - u_acc, "se": se,
                    "z": (acc - u_acc) / se if se > 0 else float("nan"),
                })  # fmt: skip
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| dataset | budget | searched from | method | seeds | params | test acc (mean ± sd) "
        "| uniform narrowing of | its sizes (params: acc, seeds) | uniform at that size "
        "| searched - uniform (points) | SE | diff/SE |",
        "|---|---:|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sizes = "; ".join(f"{s['params']:,.0f}: {s['acc']:.2f} ({s['seeds']})"
                          for s in r["uniform_sizes"])  # fmt: skip
        lines.append(
            f"| {r['dataset']} | {r['budget']:,} | {r['searched']} | {r['method']} | "
            f"{r['seeds']} | {r['params']:,.0f} | {r['acc']:.2f} ± {r['sd']:.2f} | "
            f"{r['uniform']} | {sizes} | {r['uniform_acc']:.2f} | {r['diff']:+.3f} | "
            f"{r['se']:.3f} | {r['z']:+.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--searched", action="append", default=[], metavar="LABEL=DIR",
                   help="a frontier.py --out folder whose default-recipe cells to compare")  # fmt: skip
    p.add_argument("--uniform", action="append", default=[], metavar="LABEL=DIR",
                   help="a frontier.py --out folder whose uniform narrowing to compare with")  # fmt: skip
    p.add_argument("--method", action="append", default=[], metavar="LABEL=METHOD",
                   help="read a --searched label's METHOD cells, not the default recipe's")  # fmt: skip
    p.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if not args.searched or not args.uniform:
        p.error("give at least one --searched and one --uniform")
    s_dirs = _labelled(args.searched, "--searched")
    u_dirs = _labelled(args.uniform, "--uniform")
    methods = {}
    for m in args.method:
        label, sep, name = m.partition("=")
        if not sep or label not in s_dirs or not name:
            p.error(f"--method takes LABEL=METHOD with a LABEL given to --searched, got {m!r}")
        methods[label] = name
    rows = compare({k: pooled_groups(v) for k, v in s_dirs.items()},
                   {k: pooled_groups(v) for k, v in u_dirs.items()}, methods)  # fmt: skip
    meta = frontier.machine()
    command = "python benchmarks/versus_shapes.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Tables written on {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; the "
        "cells' own hosts and commits are in each folder's frontier.md. Searched: "
        + "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in s_dirs.items())
        + ". Uniform: "
        + "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in u_dirs.items())
        + ".",
        "",
        "Each default-recipe set (or the method `--method` names) against uniform narrowing of each large network, interpolated "
        "(log-linear in parameters) to the recipe's mean size; SE: standard error of the "
        "difference (both sides' seeds):",
        "",
        *(table(rows) if rows else ["none: no (dataset, budget) has both kinds of cells."]),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folders = {"searched": {k: [str(d) for d in v] for k, v in s_dirs.items()},
               "uniform": {k: [str(d) for d in v] for k, v in u_dirs.items()}}  # fmt: skip
    frontier._atomic_write(out.with_suffix(".json"),
                           json.dumps({"machine": meta, "command": command, "folders": folders, "rows": rows},
                                      indent=1))  # fmt: skip
    frontier._atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
