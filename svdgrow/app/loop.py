"""The training loop: train a light ResNet on (Fashion-)MNIST while the resizer changes its widths.

``train(cfg)`` writes one run folder (see :mod:`svdgrow.app.rundir`); ``train(resume=RUN_DIR)``
continues one from its last checkpoint. With ``target_params`` set, a parameter budget falls
geometrically from the starting count to ``target_params`` over ``shrink_steps`` steps and caps
growth afterwards; resizing stops after ``resize_until`` of all steps so the final network
trains undisturbed under the cosine LR schedule (docs/design.md, "The application").
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from svdgrow._utils import eval_mode
from svdgrow.policy import budget_at
from svdgrow.surgery import renormalize_rows_, row_norm_snapshot

from .checkpoint import load_checkpoint
from .config import TrainConfig, lr_at
from .data import DeviceDataset
from .models import count_flops, count_params, spec_of
from .plot import plot_run
from .rundir import (
    CKPT_NAME,
    FINAL_SPEC_NAME,
    RunDirError,
    check_new_run_dir,
    default_run_dir,
    last_checkpoint,
    load_run_config,
    write_json,
)
from .state import EpochStats, RunState, TrainingDiverged, open_run_folder, setup_run

__all__ = ["TrainingDiverged", "TrainingInterrupted", "evaluate", "train"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint.

    Attributes:
        signum: the signal's number.
        run_dir: the run folder, to resume with ``svdgrow train --resume``.
    """

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"{signal.Signals(signum).name} at a step boundary")
        self.signum = signum
        self.run_dir = run_dir


def train(
    cfg: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run, writing its run folder.

    SIGINT (Ctrl-C) and SIGTERM stop the run at the next step boundary with a checkpoint; a
    second one aborts at once, leaving the last checkpoint.

    Args:
        cfg: the run's config (ignored when ``resume`` is given).
        resume: a run folder to continue from its last checkpoint (its log is appended).
        overrides: when resuming, fields to change (e.g. ``epochs``, ``device``, ``data_dir``).

    Returns:
        a summary: ``run_dir``, ``params``, ``test_acc``, ``test_loss``, ``elapsed``, ``spec``,
        ``step``, ``epoch``, ``widths``.

    Raises:
        TrainingInterrupted: after the checkpoint of a stop signal.
        TrainingDiverged: when the weights become NaN/inf (the last finite checkpoint stays).
        ValueError: a bad setting or run folder (nothing is written).
        CheckpointError: the checkpoint to resume cannot be used.
    """
    with _stop_signals() as stop:
        cfg, start_spec, ckpt = _prepare(cfg, resume, overrides)
        with _num_threads(cfg.threads):
            r = setup_run(cfg, start_spec, ckpt)
            open_run_folder(r, resumed=ckpt is not None)
            return _run_loop(r, stop)


def _run_loop(r: RunState, stop: _StopRequest) -> dict[str, Any]:
    cfg = r.cfg
    try:
        while r.epoch < cfg.epochs and stop.signum is None:
            while r.batch_in_epoch < r.steps_per_epoch and stop.signum is None:
                # forward, backward, update (an epoch's first step draws its batch order)
                x, y, loss = _train_step(r)
                # every resize_every steps until resize_until: resize, renormalise, log
                _maybe_resize(r, x, y)
                # progress bar; a mid-epoch checkpoint every checkpoint_minutes
                _show_progress(r, loss)
                if _checkpoint_due(r):
                    r.save()
            # at the epoch's end: evaluate on the test split, log the epoch, checkpoint
            if r.batch_in_epoch == r.steps_per_epoch:
                _end_epoch(r)
        if stop.signum is not None and r.epoch < cfg.epochs:
            # a stop signal: checkpoint at this step boundary and leave
            _stop(r, stop.signum)
        return _finish(r)
    except TrainingDiverged as exc:
        _diverged(r, exc)
    finally:
        if r.bar is not None:
            r.bar.close()
        r.log.close()


def _prepare(
    cfg: TrainConfig | None, resume: str | os.PathLike | None, overrides: dict[str, Any] | None
) -> tuple[TrainConfig, dict[str, Any], dict[str, Any] | None]:
    """The checked config, starting spec and checkpoint (None: a new run) of a run."""
    if resume is None:
        cfg = cfg if cfg is not None else TrainConfig()
        cfg.validate()
        cfg.run_dir = cfg.run_dir or default_run_dir(cfg)
        check_new_run_dir(cfg.run_dir)
        return cfg, cfg.starting_spec(), None
    cfg, record = load_run_config(resume)
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.run_dir = str(resume)
    cfg.validate()
    path = last_checkpoint(resume)
    if not path.is_file() or not isinstance(record.get("start_spec"), dict):
        raise RunDirError(
            f"cannot resume {resume}: it has no checkpoint or no start_spec in its config.json "
            "(the files were removed or come from elsewhere); start the run again"
        )
    ckpt = load_checkpoint(path)
    if ckpt["epoch"] >= cfg.epochs:
        raise RunDirError(
            f"run {resume} is finished: it trained {ckpt['epoch']} of {cfg.epochs} epochs; to "
            f"train it further, resume it with --epochs N, N > {ckpt['epoch']}"
        )
    return cfg, record["start_spec"], ckpt


@dataclass
class _StopRequest:
    signum: int | None = None


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopRequest]:
    """SIGINT and SIGTERM only set a flag that the loop reads at step boundaries; a second
    signal raises KeyboardInterrupt at once. Handlers are installed from the main thread only."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt  # a second signal: abort without a new checkpoint
        stop.signum = signum
        logger.warning("%s: stopping after this step (send it again to abort at once)",
                       signal.Signals(signum).name)  # fmt: skip

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# one step


def _train_step(r: RunState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on the next batch; returns the batch and its (detached) loss."""
    cfg = r.cfg
    if r.order is None or r.batch_in_epoch == 0:
        r.order = torch.randperm(len(r.train_ds), device=r.device, generator=r.generators["data"])
        r.stats = EpochStats(r.device)
    lo = r.batch_in_epoch * cfg.batch_size
    index = r.order[lo : lo + cfg.batch_size]
    x, y = r.train_ds.batch(
        index, augment=cfg.augment, shift=cfg.shift, generator=r.generators["data"]
    )
    r.lr = lr_at(r.step, r.total_steps, cfg.resolved_lr(), cfg.warmup_steps)
    for group in r.optimizer.param_groups:
        group["lr"] = r.lr
    with r.autocast():
        logits = r.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.step(r.optimizer)
    r.scaler.update()
    # drop the autograd graph now: it holds the parameters' AccumulateGrad nodes, whose
    # recorded shapes would go stale when the resizer changes a width
    loss, logits = loss.detach(), logits.detach()
    r.stats.add(loss, logits, y)
    r.step += 1
    r.batch_in_epoch += 1
    return x, y, loss


def _maybe_resize(r: RunState, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every ``resize_every`` steps until ``resize_until``: resize, renormalise, log a change."""
    cfg = r.cfg
    if r.resizer is None or r.step % cfg.resize_every or r.step > cfg.resize_until * r.total_steps:
        return
    budget = budget_at(r.step, r.start_params, cfg.target_params, cfg.shrink_steps)
    shrinking = cfg.target_params is not None and r.step <= cfg.shrink_steps
    # the energy epsilon follows the schedule too (Policy has no per-step argument for it)
    r.resizer.policy.energy_eps = cfg.shrink_energy_eps if shrinking else r.eps_after
    params_before = count_params(r.model)
    graph = r.resizer.graph
    norms = row_norm_snapshot(r.model, graph) if cfg.renorm else {}
    with r.autocast():
        loss_before = _probe_loss(r.model, x, y)
    if not math.isfinite(loss_before):  # no point resizing garbage: the spectra are NaN too
        raise TrainingDiverged(
            f"training diverged by step {r.step}: the batch loss is {loss_before}"
        )
    t0 = time.perf_counter()
    try:
        report = r.resizer.step(data=x if cfg.mode == "data" else None, budget=budget)
    except FloatingPointError as exc:  # NaN/inf weights: nothing was resized
        raise TrainingDiverged(f"training diverged by step {r.step}: {exc}") from None
    renorm = renormalize_rows_(r.model, graph, r.optimizer, norms) if cfg.renorm else {}
    seconds = time.perf_counter() - t0
    r.resize_checks += 1
    if not report.changed:
        return
    with r.autocast():
        loss_after = _probe_loss(r.model, x, y)
    rep = report.as_dict()
    r.log.write(
        "resize", step=r.step, epoch=r.epoch + r.batch_in_epoch / r.steps_per_epoch,
        budget=budget, params_before=params_before, params=count_params(r.model),
        flops=count_flops(r.model), widths=r.widths(),
        decisions=[d for d in rep["decisions"] if d.get("action") != "keep"],
        batch_loss_before=loss_before, batch_loss_after=loss_after, warnings=rep["warnings"],
        seconds=seconds, seconds_by_stage=rep["seconds"], renorm=renorm, elapsed=r.elapsed(),
        lr=r.lr,
    )  # fmt: skip


def _show_progress(r: RunState, loss: torch.Tensor) -> None:
    if r.bar is None:
        return
    r.bar.update(1)
    if r.step % 10 == 0 or r.batch_in_epoch == r.steps_per_epoch:
        stats = r.stats.as_dict()
        acc = stats["correct"] / max(1, stats["seen"])
        r.bar.set_postfix(epoch=r.epoch + 1, loss=f"{loss.item():.3f}", acc=f"{acc:.3f}",
                          params=count_params(r.model), refresh=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# epoch end, checkpoints, the end of the run


def _end_epoch(r: RunState) -> None:
    """Evaluate, log the ``epoch`` event, checkpoint."""
    cfg = r.cfg
    r.epoch += 1
    r.batch_in_epoch = 0
    r.test_acc, r.test_loss = evaluate(r.model, r.test_ds, cfg.eval_batch_size, r.autocast)
    stats = r.stats.as_dict()
    seen = max(1, stats["seen"])
    params = count_params(r.model)
    r.log.write(
        "epoch", step=r.step, epoch=r.epoch, params=params, flops=count_flops(r.model),
        widths=r.widths(), train_acc=stats["correct"] / seen, train_loss=stats["loss"] / seen,
        test_acc=r.test_acc, test_loss=r.test_loss,
        lr=lr_at(r.step - 1, r.total_steps, cfg.resolved_lr(), cfg.warmup_steps),
        elapsed=r.elapsed(), resize_checks=r.resize_checks,
    )  # fmt: skip
    if r.bar is not None:
        r.bar.write(
            f"epoch {r.epoch}/{cfg.epochs}: train acc {stats['correct'] / seen:.4f} "
            f"test acc {r.test_acc:.4f} params {params:,} ({r.elapsed():.0f} s)"
        )
    r.save(final=r.epoch == cfg.epochs)


def _checkpoint_due(r: RunState) -> bool:
    minutes = r.cfg.checkpoint_minutes
    return minutes > 0 and time.perf_counter() - r.last_save > 60 * minutes


def _stop(r: RunState, signum: int) -> None:
    """Checkpoint at this step boundary, log the interruption, raise TrainingInterrupted."""
    name = signal.Signals(signum).name
    logger.warning("%s: checkpointing step %d to %s (resume with --resume %s)", name, r.step,
                   r.dir / CKPT_NAME, r.dir)  # fmt: skip
    r.save()
    r.log.write("interrupted", step=r.step, epoch=r.epoch, signal=name, elapsed=r.elapsed())
    raise TrainingInterrupted(signum, r.dir)


def _diverged(r: RunState, exc: TrainingDiverged) -> NoReturn:
    """Log the divergence and raise it again, saying which checkpoint the folder keeps."""
    r.log.write("diverged", step=r.step, epoch=r.epoch, saved_step=r.saved_step,
                error=str(exc), elapsed=r.elapsed())  # fmt: skip
    raise TrainingDiverged(
        f"{exc}. The run folder {r.dir} keeps its last finite checkpoint (step {r.saved_step}); "
        "start again with a lower --lr"
    ) from None


def _finish(r: RunState) -> dict[str, Any]:
    """Write final_spec.json, the ``end`` event and the plots; return the run's summary."""
    if r.bar is not None:
        r.bar.close()
        r.bar = None
    spec = spec_of(r.model)
    write_json(r.dir / FINAL_SPEC_NAME, spec)
    result = {"params": count_params(r.model), "test_acc": r.test_acc, "test_loss": r.test_loss,
              "elapsed": r.elapsed(), "spec": spec, "step": r.step, "epoch": r.epoch,
              "widths": r.widths()}  # fmt: skip
    r.log.write("end", **result)
    try:
        plot_run(r.dir)
    except Exception as exc:  # noqa: BLE001 - plots must never fail a finished run
        logger.warning("plotting failed: %s", exc)
    return {"run_dir": str(r.dir), **result}


# ----------------------------------------------------------------------------------------------
# measurements


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DeviceDataset, batch_size: int = 1000, autocast: Any = None
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode, no augmentation).

    Args:
        model: the network.
        data: the split to evaluate on.
        batch_size: evaluation batch size.
        autocast: a context-manager factory for mixed precision (None: full precision).

    Returns:
        ``(accuracy in [0, 1], loss)``.
    """
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with eval_mode(model):
        for x, y in data.batches(batch_size, shuffle=False):
            with ctx():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    n = max(1, len(data))
    return correct.item() / n, loss_sum.item() / n


@torch.no_grad()
def _probe_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training-mode loss on one batch, leaving every BatchNorm buffer as it was."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, _clone(m.num_batches_tracked)) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0  # running stats stay put
        return float(F.cross_entropy(model(x).float(), y))
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
