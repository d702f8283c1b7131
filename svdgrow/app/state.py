"""A run's state between steps (:class:`RunState`): how a run gets it, saves it and restores it.

:func:`setup_run` loads the data and builds (or restores) the model, optimizer, mixed precision
and resizer without touching the run folder, so a start that fails leaves nothing behind;
:func:`open_run_folder` then writes a new run's first checkpoint before its config.json (a
folder with a config.json can always be resumed), or appends a ``resume`` event to a resumed
run's log. :meth:`RunState.save` and :meth:`RunState.restore` are each other's inverse: a
checkpoint holds everything the next step depends on (docs/design.md, "The application").
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from svdgrow import Resizer
from svdgrow._utils import all_finite

from .checkpoint import (
    CheckpointError,
    load_model,
    load_teacher,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .data import DeviceDataset, load_dataset
from .models import build_model, count_flops, count_params, layer_widths, spec_of
from .parallel import Ranks, pick_device
from .rundir import CKPT_NAME, CONFIG_NAME, LOG_NAME, JsonlLog, NullLog, write_json

__all__ = [
    "EpochStats",
    "RunState",
    "TrainingDiverged",
    "open_run_folder",
    "setup_run",
    "wrap_model",
]

logger = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The weights became NaN/inf; the run folder keeps its last finite checkpoint."""


@dataclass
class RunState:
    """Everything one run carries from step to step."""

    cfg: TrainConfig
    dir: Path
    device: torch.device
    train_ds: DeviceDataset
    test_ds: DeviceDataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    resizer: Resizer | None
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]
    start_spec: dict[str, Any]
    start_params: int
    steps_per_epoch: int
    stats: EpochStats
    start_flops: int = 0  # forward FLOPs per sample of the starting network (with target_mflops)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    order: torch.Tensor | None = None  # this epoch's sample order
    lr: float = 0.0
    resize_checks: int = 0
    quiet_checks: int = 0  # resize checks in a row that changed nothing, outside the schedule
    next_check: int = 0  # the first step the next resize check may run at (backoff)
    eps_after: float = 0.0  # the energy policy's epsilon once the budget schedule is over
    test_acc: float = math.nan
    test_loss: float = math.nan
    saved_step: int | None = None  # the step of the checkpoint on disk
    log: JsonlLog | None = None
    bar: Any = None
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)  # this session's start
    last_save: float = field(default_factory=time.perf_counter)
    ranks: Ranks = field(default_factory=Ranks)  # the processes of the run (one by default)
    ddp: DDP | None = None  # the DDP wrapper of model (several processes)
    net: nn.Module | None = None  # what a training step calls: model, ddp, or their compiled form
    seconds: dict[str, float] = field(default_factory=dict)  # this epoch's time by phase
    step_clock: list[float] = field(default_factory=lambda: [0.0, 0])  # since the last resize
    teacher: nn.Module | None = None  # the frozen distillation teacher (--distill)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def elapsed(self) -> float:
        """Training seconds so far, over every session of the run."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def widths(self) -> dict[str, Any]:
        """Every layer's width, and every coupling group's when resizing."""
        out: dict[str, Any] = {"layers": layer_widths(spec_of(self.model))}
        if self.resizer is not None:
            out["groups"] = {str(k): int(v) for k, v in self.resizer.widths().items()}
        return out

    def epoch_stats(self) -> dict[str, Any]:
        """The epoch's training loss sum, correct count and samples seen, over every rank."""
        mine = self.stats.as_dict()
        if not self.ranks.distributed:
            return mine
        loss, correct, seen = self.ranks.sum(
            [mine["loss"], mine["correct"], mine["seen"]], "the epoch statistics"
        )
        return {"loss": loss, "correct": int(correct), "seen": int(seen)}

    def save(self, final: bool = False, local: bool = False) -> None:
        """Checkpoint the run at the current step boundary (atomically, over the last one).

        With several processes every rank calls it: they check their weights together, rank 0
        writes (with the epoch statistics of all ranks) and every rank hears whether it could.

        Args:
            final: the run's last checkpoint.
            local: write from this process alone, without the collectives (rank 0's start).

        Raises:
            TrainingDiverged: when a weight or buffer is NaN/inf on any rank (the last
                checkpoint stays).
            RunFailed: rank 0 could not write it (several processes).
        """
        tensors = [*self.model.parameters(), *self.model.buffers()]
        finite = bool(all_finite(tensors))
        if not (finite if local else self.ranks.all_true(finite, "the finite-weights check")):
            raise TrainingDiverged(
                f"training diverged by step {self.step}: the weights hold NaN/inf"
            )
        stats = self.stats.as_dict() if local else self.epoch_stats()
        if local or not self.ranks.distributed:
            self._write(final, stats)
            return
        error = None
        if self.ranks.main:
            try:
                self._write(final, stats)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                error = exc
        self.ranks.agree(error, f"the checkpoint of step {self.step}")
        self.saved_step = self.step
        self.last_save = time.perf_counter()

    def _write(self, final: bool, stats: dict[str, Any]) -> None:
        extra = {"elapsed": self.elapsed(), "batch_in_epoch": self.batch_in_epoch,
                 "epoch_stats": stats, "resize_checks": self.resize_checks,
                 "quiet_checks": self.quiet_checks, "next_check": self.next_check,
                 "final": final}  # fmt: skip
        if self.resizer is not None and self.resizer.held:
            extra["held"] = {k: list(v) for k, v in self.resizer.held.items()}
        if self.resizer is not None:  # what Policy(allocation="uniform") keeps a fraction of
            extra["reference_widths"] = dict(self.resizer.reference_widths)
        rng = rng_state(self.generators)
        if self.order is not None and self.batch_in_epoch > 0:
            rng["order"] = self.order.cpu()
        scaler = self.scaler if self.scaler.is_enabled() else None
        save_checkpoint(self.dir / CKPT_NAME, self.model, self.optimizer, scaler=scaler,
                        step=self.step, epoch=self.epoch, rng=rng, extra=extra,
                        teacher=self.teacher)  # fmt: skip
        self.saved_step = self.step
        self.last_save = time.perf_counter()

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Step, epoch, position in the epoch, statistics, scaler and RNG states of ``ckpt``."""
        extra = ckpt["extra"]
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.saved_step = self.step
        self.elapsed_before = float(extra.get("elapsed", 0.0))
        self.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
        self.resize_checks = int(extra.get("resize_checks", 0))
        self.quiet_checks = int(extra.get("quiet_checks", 0))
        self.next_check = int(extra.get("next_check", 0))
        if self.resizer is not None:
            self.resizer.held = {k: (int(w), int(n)) for k, (w, n) in extra.get("held", {}).items()}
            if "reference_widths" in extra:
                ref = {k: int(w) for k, w in extra["reference_widths"].items()}
                self.resizer.reference_widths.update(ref)
        if "epoch_stats" in extra and self.ranks.main:  # the sums of every rank: on one
            self.stats.load(extra["epoch_stats"])
        if self.batch_in_epoch > 0 and "order" in ckpt["rng"]:
            self.order = ckpt["rng"]["order"].to(self.device)
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.generators)
        self.teacher = load_teacher(ckpt, self.device)


class EpochStats:
    """The running training loss and accuracy of the current epoch (kept on the device)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.double() * y.shape[0]
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += y.shape[0]

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.item(), "correct": int(self.correct.item()), "seen": self.seen}

    def load(self, saved: dict[str, Any]) -> None:
        self.loss.fill_(float(saved["loss"]))
        self.correct.fill_(int(saved["correct"]))
        self.seen = int(saved["seen"])


def setup_run(
    cfg: TrainConfig,
    start_spec: dict[str, Any],
    ckpt: dict[str, Any] | None,
    ranks: Ranks | None = None,
) -> RunState:
    """Data, model, optimizer, AMP and resizer, and a resumed run's saved position.

    Writes nothing: the run folder is :func:`open_run_folder`'s job.

    Args:
        cfg: the run's settings (``run_dir`` set).
        start_spec: the architecture the run started from.
        ckpt: the checkpoint to resume from (None: a new run).
        ranks: the run's processes and this one's device (default: one process, on
            ``cfg.device``).
    """
    t_start = time.perf_counter()
    ranks = ranks if ranks is not None else Ranks(device=pick_device(cfg.device))
    device = ranks.device
    train_ds, test_ds = _load_data(cfg, device)
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model, optimizer = _restore_model(cfg, ckpt, device)
    else:
        model = build_model(start_spec).to(device).train()
        optimizer = make_optimizer(cfg, list(model.parameters()))
    autocast, scaler = _amp(cfg, device)
    resizer = None
    if cfg.resize_every > 0:
        example = train_ds.batch(torch.arange(min(len(train_ds), 8), device=device))[0]
        policy = cfg.make_policy()
        if (cfg.target_params is not None and count_params(start_spec) < cfg.target_params
                and "fill_budget" not in cfg.policy):  # fmt: skip
            policy.fill_budget = True  # a growing run reaches its budget (Policy.fill_budget)
        resizer = Resizer(model, example, policy=policy, optimizer=optimizer, mode=cfg.mode,
                          spectrum=cfg.spectrum, hold_grown=cfg.hold_grown)  # fmt: skip
    # the generators a checkpoint carries: batch order and augmentation; the resizer's draws
    generators = {"data": data_gen}
    if resizer is not None:
        generators["resizer"] = resizer.generator
    global_batch = cfg.batch_size * ranks.size  # each process reads batch_size of it
    r = RunState(
        cfg=cfg, dir=Path(cfg.run_dir), device=device, train_ds=train_ds, test_ds=test_ds,
        model=model, optimizer=optimizer, resizer=resizer, autocast=autocast, scaler=scaler,
        generators=generators, start_spec=start_spec, start_params=count_params(start_spec),
        steps_per_epoch=train_ds.num_batches(global_batch, drop_last=len(train_ds) >= global_batch),
        stats=EpochStats(device), t_start=t_start, ranks=ranks,
    )  # fmt: skip
    if resizer is not None:
        r.eps_after = resizer.policy.energy_eps
    if cfg.target_mflops is not None:  # from the spec, so a resumed run gets the same schedule
        r.start_flops = count_flops(build_model(start_spec))
    if ckpt is not None:
        r.restore(ckpt)
    wrap_model(r)
    return r


def wrap_model(r: RunState, ddp: DDP | None = None) -> None:
    """Set what a training step calls: the model, its DDP wrapper (``ddp``, or a new one with
    several processes) and, with ``--compile``, that compiled (afresh: compiled graphs of other
    widths are dropped first)."""
    if r.ranks.distributed:
        ids = [r.device.index] if r.device.type == "cuda" else None
        r.ddp = ddp if ddp is not None else DDP(r.model, device_ids=ids)
    r.net = r.ddp if r.ddp is not None else r.model
    if r.cfg.compile:
        torch.compiler.reset()
        r.net = torch.compile(r.net, backend=r.cfg.compile)


def open_run_folder(r: RunState, resumed: bool) -> None:
    """Start writing the run folder: clear stale temp files, then log a resume, or (a new run)
    write the first checkpoint, the ``start`` event and, last, config.json.

    A new run's folder is removed again (or, when it existed before, emptied of what was
    written) if this fails part way. With several processes rank 0 alone writes, and every
    rank hears whether it could.
    """
    error = None
    if r.ranks.main:
        try:
            _open_folder(r, resumed)
        except Exception as exc:  # noqa: BLE001 - raised again by agree, on every rank
            error = exc
    else:
        r.log = NullLog()
    r.ranks.agree(error, "the start of the run folder")
    if r.cfg.progress and r.ranks.main:
        r.bar = tqdm(total=r.total_steps, initial=r.step, dynamic_ncols=True, unit="step",
                     desc=r.cfg.dataset)  # fmt: skip
    logger.info("run folder %s: %s on %s, %d params, %d steps, %d process(es) x batch %d",
                r.dir, r.cfg.dataset, r.device, count_params(r.model), r.total_steps,
                r.ranks.size, r.cfg.batch_size)  # fmt: skip
    _warn_unreachable_budget(r)


def _warn_unreachable_budget(r: RunState) -> None:
    """Say so when the budget schedule ends after resizing stops (a short run, a subset)."""
    cfg = r.cfg
    if cfg.target_params is None or r.start_params == cfg.target_params or not r.ranks.main:
        return
    last = int(cfg.resize_until * r.total_steps)
    if cfg.shrink_start + cfg.shrink_steps > last:
        logger.warning(
            "the budget reaches --target-params %d at step %d, but resizing stops at step %d "
            "(--resize-until %g of %d steps): the network will not reach the target; "
            "lower --shrink-steps (or --shrink-start) or train longer",
            cfg.target_params, cfg.shrink_start + cfg.shrink_steps, last, cfg.resize_until,
            r.total_steps,
        )  # fmt: skip


def _open_folder(r: RunState, resumed: bool) -> None:
    for folder in (r.dir, (r.dir / CKPT_NAME).parent):
        remove_stale_temps(folder)
    if resumed:
        r.log = JsonlLog(r.dir / LOG_NAME)
        r.log.write("resume", step=r.step, epoch=r.epoch, params=count_params(r.model),
                    elapsed=r.elapsed(), batch_in_epoch=r.batch_in_epoch,
                    world_size=r.ranks.size, restart=r.ranks.launch.restart)  # fmt: skip
        return
    created = not r.dir.exists()
    try:
        _start_folder(r)
    except BaseException:
        if r.log is not None:
            r.log.close()
        _remove_start(r.dir, created)
        raise


def _start_folder(r: RunState) -> None:
    r.dir.mkdir(parents=True, exist_ok=True)
    r.save(local=True)
    r.log = JsonlLog(r.dir / LOG_NAME, fresh=True)
    global_batch = r.cfg.batch_size * r.ranks.size
    r.log.write("start", step=0, epoch=0, params=count_params(r.model),
                flops=count_flops(r.model), widths=r.widths(), spec=spec_of(r.model),
                elapsed=r.elapsed(), steps_per_epoch=r.steps_per_epoch,
                total_steps=r.total_steps, device=str(r.device), world_size=r.ranks.size,
                global_batch_size=global_batch, backend=r.ranks.backend)  # fmt: skip
    record = {"config": r.cfg.to_json(), "start_spec": r.start_spec,
              "start_params": r.start_params, "device": str(r.device),
              "torch": torch.__version__, "global_batch_size": global_batch}  # fmt: skip
    write_json(r.dir / CONFIG_NAME, record)


def _remove_start(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (CKPT_NAME, LOG_NAME, CONFIG_NAME):
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty
        (run_dir / CKPT_NAME).parent.rmdir()


def _load_data(cfg: TrainConfig, device: torch.device) -> tuple[DeviceDataset, DeviceDataset]:
    common = {"device": device, "data_dir": cfg.data_dir, "download": cfg.download}
    train_ds = load_dataset(
        cfg.dataset, train=True, subset=cfg.subset, subset_seed=cfg.seed, **common
    )
    test_ds = load_dataset(
        cfg.dataset, train=False, subset=cfg.test_subset, subset_seed=cfg.seed, **common
    )
    return train_ds, test_ds


def _restore_model(
    cfg: TrainConfig, ckpt: dict[str, Any], device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The checkpoint's model in training mode and the optimizer re-attached to it by name."""
    model, _ = load_model(ckpt, device)
    model.train()
    named = dict(model.named_parameters())
    if not isinstance(ckpt.get("optimizer"), dict) or not ckpt.get("optimizer_param_names"):
        raise CheckpointError("the checkpoint holds no optimizer state: it cannot resume training")
    try:
        optimizer = make_optimizer(cfg, [named[n] for n in ckpt["optimizer_param_names"][0]])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit its model ({type(exc).__name__}: "
            f"{exc}): it cannot resume training"
        ) from None
    return model, optimizer


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, wd = cfg.resolved_lr(), cfg.resolved_wd()
    if cfg.optimizer == "sgd":
        nesterov = cfg.momentum > 0
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=wd
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _amp(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """The autocast context factory and grad scaler (both inert unless ``--amp`` on CUDA)."""
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        logger.warning("--amp only acts on CUDA; training in float32 on %s", device)
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    if not use_amp:
        return contextlib.nullcontext, scaler
    return lambda: torch.autocast("cuda", dtype=dtype), scaler
