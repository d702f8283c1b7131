"""Plots and summaries of a run folder (matplotlib figures drawn without pyplot: no display).

``plot_run(run_dir)`` writes:

- ``params_accuracy.png``: parameter count (log scale) and test accuracy against elapsed time
  and against the training step;
- ``widths.png``: every coupling group's width (or every layer's, for runs without a resizer)
  against the training step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .rundir import CONFIG_NAME, load_run_config, read_log

__all__ = ["format_summary", "plot_run", "summarize_run"]


def _width_series(events: list[dict[str, Any]]) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    kind = "groups" if any("groups" in (e.get("widths") or {}) for e in events) else "layers"
    series: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        widths = (e.get("widths") or {}).get(kind)
        if not widths:
            continue
        for name, w in widths.items():
            series.setdefault(name, []).append((e["step"], w))
    return kind, series


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """(Re)draw a run's PNG plots from its ``log.jsonl``.

    Returns:
        the paths written (``widths.png`` only when the log holds widths).
    """
    run_dir = Path(run_dir)
    events = read_log(run_dir)
    written = [_plot_params_accuracy(run_dir, events)]
    kind, series = _width_series(events)
    if series:
        written.append(_plot_widths(run_dir, kind, series))
    return written


def _plot_params_accuracy(run_dir: Path, events: list[dict[str, Any]]) -> Path:
    timeline = [
        e for e in events if e["event"] in ("start", "resize", "epoch", "end") and "params" in e
    ]
    epochs = [e for e in events if e["event"] == "epoch"]
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "elapsed", "elapsed seconds"),
        (axes[1], "step", "training step"),
    ):
        xs = [e.get(key, 0) for e in timeline]
        ax.step(
            xs, [e["params"] for e in timeline], where="post", color="tab:blue", label="parameters"
        )
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("parameters", color="tab:blue")
        ax.grid(True, which="both", alpha=0.3)
        if epochs:
            ax2 = ax.twinx()
            ax2.plot(
                [e.get(key, 0) for e in epochs],
                [100 * e["test_acc"] for e in epochs],
                "o-",
                color="tab:red",
                label="test accuracy",
            )
            ax2.set_ylabel("test accuracy (%)", color="tab:red")
    title = run_dir.name
    if epochs:
        final = epochs[-1]
        title += f": {final['params']:,} params, test acc {100 * final['test_acc']:.2f}%"
    fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / "params_accuracy.png"
    fig.savefig(path, dpi=110)
    return path


def _plot_widths(run_dir: Path, kind: str, series: dict[str, list[tuple[int, int]]]) -> Path:
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for name, pts in sorted(series.items()):
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"width ({'coupling group' if kind == 'groups' else 'layer'})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(f"{run_dir.name}: widths")
    fig.tight_layout()
    path = run_dir / "widths.png"
    fig.savefig(path, dpi=110)
    return path


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The headline numbers of a run: final params, accuracy, time, widths, resizes."""
    run_dir = Path(run_dir)
    events = read_log(run_dir)
    start = next((e for e in events if e["event"] == "start"), {})
    epochs = [e for e in events if e["event"] == "epoch"]
    resizes = [e for e in events if e["event"] == "resize"]
    end = next((e for e in reversed(events) if e["event"] == "end"), None)
    last = epochs[-1] if epochs else {}
    record = load_run_config(run_dir)[1] if (run_dir / CONFIG_NAME).is_file() else {}
    best = max(epochs, key=lambda e: e["test_acc"]) if epochs else {}
    return {
        "run_dir": str(run_dir),
        "dataset": record.get("config", {}).get("dataset"),
        "finished": end is not None,
        "epochs": last.get("epoch", 0),
        "steps": last.get("step", 0),
        "start_params": start.get("params", record.get("start_params")),
        "params": last.get("params", start.get("params")),
        "flops": last.get("flops"),
        "test_acc": last.get("test_acc"),
        "best_test_acc": best.get("test_acc"),
        "best_epoch": best.get("epoch"),
        "train_acc": last.get("train_acc"),
        "elapsed": (end or last).get("elapsed"),
        "resizes": len(resizes),
        "seconds_by_phase": _phase_totals(epochs),
        "widths": last.get("widths", start.get("widths")),
        "per_epoch": [
            {k: e.get(k) for k in ("epoch", "params", "test_acc", "train_acc", "elapsed")}
            for e in epochs
        ],
    }


#: the loop's timed phases (``seconds_by_phase`` of an epoch event), in the order shown
PHASES = {"data": "batches", "train": "steps", "resize": "resize checks", "eval": "evaluation"}


def _phase_totals(epochs: list[dict]) -> dict[str, float]:
    """Seconds per phase of the training loop summed over the epochs (logs before the "data"
    phase was timed counted the batches in "train")."""
    totals: dict[str, float] = {}
    for e in epochs:
        for k, v in (e.get("seconds_by_phase") or {}).items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def format_summary(s: dict[str, Any]) -> str:
    """A readable text form of :func:`summarize_run`'s result."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"run:          {s['run_dir']} ({s['dataset']}, {'finished' if s['finished'] else 'NOT finished'})",
        f"epochs/steps: {s['epochs']} / {s['steps']}",
        f"parameters:   {s['start_params']:,} -> {s['params']:,}"
        if s["start_params"] and s["params"]
        else f"parameters:   {s['params']}",
        f"FLOPs/sample: {s['flops']:,}" if s.get("flops") else "FLOPs/sample: n/a",
        f"test acc:     {pct(s['test_acc'])} (best {pct(s['best_test_acc'])} at epoch {s['best_epoch']})",
        f"train acc:    {pct(s['train_acc'])}",
        f"time:         {s['elapsed']:.1f} s" if s.get("elapsed") is not None else "time: n/a",
        f"resizes:      {s['resizes']}",
    ]
    phases = s.get("seconds_by_phase") or {}
    if phases:
        parts = [f"{label} {phases[k]:.1f} s" for k, label in PHASES.items() if k in phases]
        if s.get("elapsed") is not None:  # checkpoints, logging, the start
            parts.append(f"other {s['elapsed'] - sum(phases.values()):.1f} s")
        lines.append("time split:   " + ", ".join(parts))
    widths = s.get("widths") or {}
    for kind in ("groups", "layers"):
        if widths.get(kind):
            lines.append(
                f"widths ({kind}): " + ", ".join(f"{k}={v}" for k, v in widths[kind].items())
            )
    if s["per_epoch"]:
        lines.append("epoch  params      test acc  elapsed")
        for e in s["per_epoch"]:
            lines.append(
                f"{e['epoch']:>5}  {e['params']:>10,}  {pct(e['test_acc']):>8}  {e['elapsed']:>7.1f}"
            )
    return "\n".join(lines)
