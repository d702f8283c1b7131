"""The training loop: train a light ResNet on (Fashion-)MNIST while the resizer changes its widths.

``train(cfg)`` writes one run folder (see :mod:`svdgrow.app.rundir`); ``train(resume=RUN_DIR)``
continues one from its last checkpoint. With ``target_params`` set, a parameter budget falls
geometrically from the starting count to ``target_params`` over ``shrink_steps`` steps and caps
growth afterwards; resizing stops after ``resize_until`` of all steps so the final network
trains undisturbed under the cosine LR schedule. Under torchrun every process runs this loop on
its share of each batch; rank 0 resizes and writes, the others follow it (docs/design.md, "The
application" and "Several processes and torch.compile").
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from svdgrow import StepReport
from svdgrow.distributed import DistributedResizeError, resize_ddp, state_checksum
from svdgrow.policy import budget_at
from svdgrow.surgery import renormalize_rows_, row_norm_snapshot

from .config import TrainConfig, lr_at
from .measure import evaluate, probe_loss
from .models import count_flops, count_params, spec_of
from .parallel import Launch, Ranks, RunFailed, process_group, report_error
from .plot import plot_run
from .rundir import CKPT_NAME, FINAL_SPEC_NAME, write_json
from .start import (
    StopRequest,
    TrainingInterrupted,
    num_threads,
    prepare,
    stop_signals,
)
from .state import EpochStats, RunState, TrainingDiverged, open_run_folder, setup_run, wrap_model

__all__ = ["RunFailed", "TrainingDiverged", "TrainingInterrupted", "evaluate", "train"]

logger = logging.getLogger(__name__)


def train(
    cfg: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    launch: Launch | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run, writing its run folder.

    SIGINT (Ctrl-C) and SIGTERM stop the run at the next step boundary with a checkpoint; a
    second one aborts at once, leaving the last checkpoint.

    Args:
        cfg: the run's config (ignored when ``resume`` is given).
        resume: a run folder to continue from its last checkpoint (its log is appended).
        overrides: when resuming, fields to change (e.g. ``epochs``, ``device``, ``data_dir``).
        launch: this process's place in a torchrun launch (default: from the environment).

    Returns:
        a summary: ``run_dir``, ``params``, ``test_acc``, ``test_loss``, ``elapsed``, ``spec``,
        ``step``, ``epoch``, ``widths``.

    Raises:
        TrainingInterrupted: after the checkpoint of a stop signal.
        TrainingDiverged: when the weights become NaN/inf (the last finite checkpoint stays).
        ValueError: a bad setting or run folder (nothing is written).
        CheckpointError: the checkpoint to resume cannot be used.
        RunFailed: a rank failed (several processes); the last checkpoint stays.
    """
    launch = launch if launch is not None else Launch.from_env()
    with stop_signals() as stop:
        cfg, start_spec, ckpt = prepare(cfg, resume, overrides, launch)
        with (
            num_threads(cfg.threads),
            process_group(cfg.device, cfg.backend, cfg.dist_timeout, launch) as ranks,
        ):
            try:
                cfg.run_dir = ranks.share(cfg.run_dir, "the run folder's name")
                r = _setup(cfg, start_spec, ckpt, ranks)
                open_run_folder(r, resumed=ckpt is not None)
                return _run_loop(r, stop)
            except Exception as exc:
                if ranks.distributed:  # say it while this process still may (torchrun)
                    report_error(exc, launch)
                raise


def _setup(cfg: TrainConfig, start_spec: dict[str, Any], ckpt: Any, ranks: Ranks) -> RunState:
    """``setup_run`` on every rank; a rank that fails raises its own error, the others
    RunFailed naming it (so no rank waits for one that is gone)."""
    error = r = None
    try:
        r = setup_run(cfg, start_spec, ckpt, ranks)
    except Exception as exc:  # noqa: BLE001 - raised again below
        error = exc
    try:
        ranks.agree(error, "the setup")
    except RunFailed:
        if error is not None:
            raise error from None
        raise
    return r


def _run_loop(r: RunState, stop: StopRequest) -> dict[str, Any]:
    cfg = r.cfg
    try:
        while r.epoch < cfg.epochs and not _stopping(r, stop):
            while r.batch_in_epoch < r.steps_per_epoch and not _stopping(r, stop):
                # forward, backward, update (an epoch's first step draws its batch order)
                x, y, loss = _train_step(r)
                # every resize_every steps until resize_until: resize, renormalise, log
                _maybe_resize(r, x, y)
                _show_progress(r, loss)
            # at the epoch's end: evaluate on the test split, log the epoch, checkpoint
            if r.batch_in_epoch == r.steps_per_epoch:
                _end_epoch(r)
        if stop.signum is not None and r.epoch < cfg.epochs:
            # a stop signal: checkpoint at this step boundary and leave
            _stop(r, stop.signum)
        return _finish(r)
    except TrainingDiverged as exc:
        _diverged(r, exc)
    except RunFailed as exc:
        _failed(r, exc)
    finally:
        if r.bar is not None:
            r.bar.close()
        r.log.close()


def _stopping(r: RunState, stop: StopRequest) -> bool:
    """At a step boundary: whether to stop (the same answer on every rank), after a mid-epoch
    checkpoint when ``checkpoint_minutes`` have passed (by rank 0's clock)."""
    stop.signum, due = r.ranks.flags(stop.signum, _checkpoint_due(r))
    if stop.signum is None and due:
        r.save()
    return stop.signum is not None


# ----------------------------------------------------------------------------------------------
# one step


def _train_step(r: RunState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's share of the next global batch; returns that
    share and its (detached) loss."""
    cfg, t0 = r.cfg, time.perf_counter()
    if r.order is None or r.batch_in_epoch == 0:
        r.order = torch.randperm(len(r.train_ds), device=r.device, generator=r.generators["data"])
        r.stats = EpochStats(r.device)
        r.seconds = {}
    size = cfg.batch_size * r.ranks.size  # the global batch
    index = r.order[r.batch_in_epoch * size : (r.batch_in_epoch + 1) * size]
    x, y = r.train_ds.batch(index, augment=cfg.augment, shift=cfg.shift,
                            generator=r.generators["data"], part=(r.ranks.rank, r.ranks.size))  # fmt: skip
    t1 = time.perf_counter()  # host time: on a GPU the gather's kernels are counted in "train"
    _time(r, "data", t0)
    r.lr = lr_at(r.step, r.total_steps, cfg.resolved_lr(), cfg.warmup_steps)
    for group in r.optimizer.param_groups:
        group["lr"] = r.lr
    with r.autocast():
        logits = r.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if r.teacher is not None:
            loss = _distilled(loss, logits, r.teacher, x, cfg)
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
    _time(r, "train", t1)
    r.step_clock[0] += time.perf_counter() - t0
    r.step_clock[1] += 1
    return x, y, loss


def _distilled(
    ce: torch.Tensor, logits: torch.Tensor, teacher: torch.nn.Module, x: torch.Tensor, cfg
) -> torch.Tensor:
    """``(1 - w) * ce + w * T^2 * KL(teacher || student)`` at temperature T (Hinton et al.)."""
    t = cfg.distill_temperature
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / t, dim=1)
    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), target, log_target=True,
                  reduction="batchmean")  # fmt: skip
    return (1.0 - cfg.distill) * ce + cfg.distill * t * t * kd


def _time(r: RunState, phase: str, t0: float) -> None:
    r.seconds[phase] = r.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _maybe_resize(r: RunState, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every ``resize_every`` steps until ``resize_until``: resize, renormalise, log a change.

    With several processes rank 0 resizes on its share of the batch and every rank ends with
    its widths and values (:func:`svdgrow.distributed.resize_ddp`), checked by checksums."""
    cfg = r.cfg
    if r.resizer is None or r.step % cfg.resize_every or r.step > cfg.resize_until * r.total_steps:
        return
    if r.step < r.next_check:  # backing off after checks that changed nothing
        return
    budget = budget_at(r.step, r.start_params, cfg.target_params, cfg.shrink_steps,
                       cfg.shrink_start)  # fmt: skip
    flops_budget = None  # per sample; the Resizer counts FLOPs on its example batch
    if cfg.target_mflops is not None:
        flops_budget = budget_at(r.step, r.start_flops, round(cfg.target_mflops * 1e6),
                                 cfg.shrink_steps, cfg.shrink_start)  # fmt: skip
    budgets = (budget, flops_budget)
    shrinking = cfg.target_params is not None and r.step <= cfg.shrink_start + cfg.shrink_steps
    # the energy epsilon follows the schedule too (Policy has no per-step argument for it)
    r.resizer.policy.energy_eps = cfg.shrink_energy_eps if shrinking else r.eps_after
    if cfg.round_after_shrink:  # free widths while it runs, then aligned (Policy.align)
        r.resizer.policy.round_to = 1 if shrinking else cfg.round_to
        r.resizer.policy.align = not shrinking
    params_before = count_params(r.model)
    if cfg.distill > 0 and r.teacher is None and budget is not None and budget < params_before:
        # the first shrinking resize: the network as it is now teaches the rest of the run
        r.teacher = copy.deepcopy(r.model).eval().requires_grad_(False)
        for p in r.teacher.parameters():
            p.grad = None
        if r.ranks.main:
            r.log.write("teacher", step=r.step, params=params_before, elapsed=r.elapsed())
    probe: dict[str, Any] = {}
    t0 = time.perf_counter()
    if r.ranks.distributed:

        def on_rank0() -> StepReport:
            t1 = time.perf_counter()
            try:
                return _resize_here(r, x, y, budgets, probe)
            finally:
                probe["rank0_seconds"] = time.perf_counter() - t1  # probes included

        report = _resize_everywhere(r, on_rank0, probe)
    else:
        report = _resize_here(r, x, y, budgets, probe)
    _time(r, "resize", t0)
    r.resize_checks += 1
    _schedule_next_check(r, report.changed, shrinking)
    probe["step_seconds"] = r.step_clock[0] / max(1, r.step_clock[1])  # a step's time, lately
    r.step_clock = [0.0, 0]
    if report.changed and r.ranks.main:
        _log_resize(r, report, budgets, params_before, probe)


def _schedule_next_check(r: RunState, changed: bool, shrinking: bool) -> None:
    """The step of the next resize check. While the budget schedule runs, or after a check
    that changed a width: ``resize_every`` steps on. After ``hold_grown`` checks in a row that
    changed nothing (the checks a grown layer is held for), each further one doubles the gap,
    up to ``resize_every * resize_backoff`` steps (docs/design.md, "The loop"). It depends
    only on what every rank knows (the report and the config), so every rank agrees."""
    cfg = r.cfg
    r.quiet_checks = 0 if changed or shrinking else r.quiet_checks + 1
    doublings = max(0, r.quiet_checks - cfg.hold_grown)
    factor = min(cfg.resize_backoff, 2 ** min(doublings, 30))
    r.next_check = r.step + cfg.resize_every * factor


def _resize_here(
    r: RunState, x: torch.Tensor, y: torch.Tensor, budgets: tuple, probe: dict[str, Any]
) -> StepReport:
    """The resize in this process: ``Resizer.step``, probing the batch loss before (when the
    step will change a width) and after a change, and renormalising.
    ``budgets``: ``(parameters, forward FLOPs per sample)``, each None when not set."""
    budget, flops_budget = budgets
    if flops_budget is not None:  # the Resizer's FLOPs are those of its example batch
        flops_budget = flops_budget * r.resizer.example_input.shape[0]
    cfg = r.cfg
    graph = r.resizer.graph
    norms = {}

    def before_change(_decisions) -> None:  # only a check that will resize pays for this
        norms.update(row_norm_snapshot(r.model, graph) if cfg.renorm else {})
        with r.autocast():
            probe["loss_before"] = probe_loss(r.model, x, y)
        if not math.isfinite(probe["loss_before"]):  # no point resizing garbage
            raise TrainingDiverged(
                f"training diverged by step {r.step}: the batch loss is {probe['loss_before']}"
            )

    t0 = time.perf_counter()
    try:
        report = r.resizer.step(data=x if cfg.mode == "data" else None, budget=budget,
                                flops_budget=flops_budget, before_change=before_change)  # fmt: skip
    except FloatingPointError as exc:  # NaN/inf weights or features: nothing was resized
        raise TrainingDiverged(f"training diverged by step {r.step}: {exc}") from None
    probe["renorm"] = {}
    if report.changed and cfg.renorm:
        probe["renorm"] = renormalize_rows_(r.model, graph, r.optimizer, norms)
    probe["seconds"] = time.perf_counter() - t0
    if report.changed:
        with r.autocast():
            probe["loss_after"] = probe_loss(r.model, x, y)
    return report


def _resize_everywhere(r: RunState, resize_here: Any, probe: dict[str, Any]) -> StepReport:
    """Rank 0 resizes, every rank takes its widths and values, the DDP wrapper (and the
    compiled model) is rebuilt, and every rank's checksum must be the same."""
    what = f"the resize at step {r.step}"
    t0 = time.perf_counter()
    try:
        ddp, report = resize_ddp(r.ddp, r.resizer, step=resize_here, what=what,
                                 before_rewrap=lambda: setattr(r, "net", None))  # fmt: skip
    except DistributedResizeError as exc:
        if exc.diverged:
            raise TrainingDiverged(str(exc)) from None
        raise RunFailed(str(exc)) from exc
    if report.changed:
        wrap_model(r, ddp)
    # what DDP adds to the resize: everything but rank 0's own part (others: their wait)
    probe["sync_seconds"] = time.perf_counter() - t0 - probe.get("rank0_seconds", 0.0)
    if report.changed:
        t1 = time.perf_counter()
        sums = r.ranks.gather(state_checksum(r.model, r.optimizer), "the checksum check")
        probe["checksums"] = sums
        probe["check_seconds"] = time.perf_counter() - t1
        if len(set(sums)) > 1:
            raise RunFailed(f"after {what} the ranks' weights differ (checksums {sums})")
    return report


def _log_resize(
    r: RunState, report: StepReport, budgets: tuple, params_before: int, probe: dict
) -> None:
    rep = report.as_dict()
    keys = ("step_seconds", "sync_seconds", "check_seconds", "checksums")
    dist = {k: probe[k] for k in keys if k in probe}
    r.log.write(
        "resize", step=r.step, epoch=r.epoch + r.batch_in_epoch / r.steps_per_epoch,
        budget=budgets[0], params_before=params_before, params=count_params(r.model),
        flops=count_flops(r.model), widths=r.widths(),
        decisions=[d for d in rep["decisions"] if d.get("action") != "keep"],
        batch_loss_before=probe["loss_before"], batch_loss_after=probe["loss_after"],
        warnings=rep["warnings"], seconds=probe["seconds"], seconds_by_stage=rep["seconds"],
        renorm=probe["renorm"], elapsed=r.elapsed(), lr=r.lr, **dist,
        **({"flops_budget": budgets[1]} if budgets[1] is not None else {}),
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
    cfg, t0 = r.cfg, time.perf_counter()
    r.epoch += 1
    r.batch_in_epoch = 0
    r.ranks.sync_model(r.model)  # rank 0's BatchNorm statistics on every rank
    r.test_acc, r.test_loss = evaluate(r.model, r.test_ds, cfg.eval_batch_size, r.autocast,
                                       r.ranks)  # fmt: skip
    _time(r, "eval", t0)
    stats = r.epoch_stats()
    seen = max(1, stats["seen"])
    params = count_params(r.model)
    if r.ranks.main:
        r.log.write(
            "epoch", step=r.step, epoch=r.epoch, params=params, flops=count_flops(r.model),
            widths=r.widths(), train_acc=stats["correct"] / seen, train_loss=stats["loss"] / seen,
            test_acc=r.test_acc, test_loss=r.test_loss,
            lr=lr_at(r.step - 1, r.total_steps, cfg.resolved_lr(), cfg.warmup_steps),
            elapsed=r.elapsed(), resize_checks=r.resize_checks, seconds_by_phase=r.seconds,
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
    if r.ranks.main:
        logger.warning("%s: checkpointing step %d to %s (resume with --resume %s)", name,
                       r.step, r.dir / CKPT_NAME, r.dir)  # fmt: skip
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


def _failed(r: RunState, exc: RunFailed) -> NoReturn:
    """Log a rank's failure and raise it again, saying which checkpoint the folder keeps."""
    r.log.write("failed", step=r.step, epoch=r.epoch, saved_step=r.saved_step, error=str(exc),
                elapsed=r.elapsed())  # fmt: skip
    raise RunFailed(
        f"{exc}. The run folder {r.dir} keeps its last checkpoint (step {r.saved_step}): "
        f"torchrun --max-restarts resumes from it, or resume with --resume {r.dir}"
    ) from exc


def _finish(r: RunState) -> dict[str, Any]:
    """Write final_spec.json, the ``end`` event and the plots; return the run's summary."""
    if r.bar is not None:
        r.bar.close()
        r.bar = None
    spec = spec_of(r.model)
    result = {"params": count_params(r.model), "test_acc": r.test_acc, "test_loss": r.test_loss,
              "elapsed": r.elapsed(), "spec": spec, "step": r.step, "epoch": r.epoch,
              "widths": r.widths()}  # fmt: skip
    if r.ranks.main:
        write_json(r.dir / FINAL_SPEC_NAME, spec)
        r.log.write("end", **result)
        try:
            plot_run(r.dir)
        except Exception as exc:  # noqa: BLE001 - plots must never fail a finished run
            logger.warning("plotting failed: %s", exc)
    return {"run_dir": str(r.dir), **result}
