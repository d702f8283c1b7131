"""A run's state between steps (:class:`RunState`), and how a new or resumed run gets it.

:func:`setup_run` loads the data, builds (or restores) the model, optimizer, mixed precision and
resizer, restores the saved position of a resumed run, and opens the run folder's log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdgrow import Resizer

from .checkpoint import load_model, set_rng_state
from .config import TrainConfig
from .data import DeviceDataset, load_dataset
from .models import build_model, count_flops, count_params, layer_widths, spec_of
from .rundir import CONFIG_NAME, LOG_NAME, JsonlLog, default_run_dir, write_json

__all__ = ["EpochStats", "RunState", "pick_device", "setup_run"]

logger = logging.getLogger(__name__)


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
    start_params: int
    steps_per_epoch: int
    stats: EpochStats
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    order: torch.Tensor | None = None  # this epoch's sample order
    lr: float = 0.0
    resize_checks: int = 0
    eps_after: float = 0.0  # the energy policy's epsilon once the budget schedule is over
    test_acc: float = math.nan
    test_loss: float = math.nan
    log: JsonlLog | None = None
    bar: Any = None
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)  # this session's start
    last_save: float = field(default_factory=time.perf_counter)

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
    cfg: TrainConfig, start_spec: dict[str, Any], ckpt: dict[str, Any] | None
) -> RunState:
    """Data, model, optimizer, AMP and resizer; the run folder; the saved position on resume.

    Args:
        cfg: the run's settings.
        start_spec: the architecture the run started from.
        ckpt: the checkpoint to resume from (None: a new run).
    """
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    cfg.run_dir = cfg.run_dir or default_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_ds, test_ds = _load_data(cfg, device)
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model, optimizer = _restore_model(cfg, ckpt, device)
    else:
        model = build_model(start_spec).to(device).train()
        optimizer = _make_optimizer(cfg, list(model.parameters()))
    autocast, scaler = _amp(cfg, device)
    resizer = None
    if cfg.resize_every > 0:
        example = train_ds.batch(torch.arange(min(len(train_ds), 8), device=device))[0]
        policy = cfg.make_policy()
        resizer = Resizer(model, example, policy=policy, optimizer=optimizer, mode=cfg.mode)
    # the generators a checkpoint carries: batch order and augmentation; the resizer's draws
    generators = {"data": data_gen}
    if resizer is not None:
        generators["resizer"] = resizer._gen
    r = RunState(
        cfg=cfg, dir=run_dir, device=device, train_ds=train_ds, test_ds=test_ds, model=model,
        optimizer=optimizer, resizer=resizer, autocast=autocast, scaler=scaler,
        generators=generators, start_params=count_params(start_spec),
        steps_per_epoch=train_ds.num_batches(cfg.batch_size, drop_last=len(train_ds) >= cfg.batch_size),
        stats=EpochStats(device), t_start=t_start,
    )  # fmt: skip
    if resizer is not None:
        r.eps_after = resizer.policy.energy_eps
    if ckpt is not None:
        _restore_position(r, ckpt)
    _open_log(r, start_spec, resumed=ckpt is not None)
    if cfg.progress:
        r.bar = tqdm(total=r.total_steps, initial=r.step, dynamic_ncols=True, unit="step",
                     desc=cfg.dataset)  # fmt: skip
    return r


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
    model, _ = load_model(ckpt, device)
    model.train()
    named = dict(model.named_parameters())
    optimizer = _make_optimizer(cfg, [named[n] for n in ckpt["optimizer_param_names"][0]])
    optimizer.load_state_dict(ckpt["optimizer"])
    return model, optimizer


def _restore_position(r: RunState, ckpt: dict[str, Any]) -> None:
    """Step, epoch, position in the epoch, epoch statistics, scaler and RNG states."""
    extra = ckpt["extra"]
    r.step, r.epoch = ckpt["step"], ckpt["epoch"]
    r.elapsed_before = float(extra.get("elapsed", 0.0))
    r.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
    if "epoch_stats" in extra:
        r.stats.load(extra["epoch_stats"])
    if r.batch_in_epoch > 0 and "order" in ckpt["rng"]:
        r.order = ckpt["rng"]["order"].to(r.device)
    if ckpt.get("scaler") and r.scaler.is_enabled():
        r.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], r.generators)


def _open_log(r: RunState, start_spec: dict[str, Any], resumed: bool) -> None:
    """Open the event log; a new run first writes config.json and a ``start`` event."""
    r.log = JsonlLog(r.dir / LOG_NAME)
    params = count_params(r.model)
    if resumed:
        r.log.write("resume", step=r.step, epoch=r.epoch, params=params, elapsed=r.elapsed(),
                    batch_in_epoch=r.batch_in_epoch)  # fmt: skip
    else:
        record = {"config": r.cfg.to_json(), "start_spec": start_spec,
                  "start_params": r.start_params, "device": str(r.device),
                  "torch": torch.__version__}  # fmt: skip
        write_json(r.dir / CONFIG_NAME, record)
        r.log.write("start", step=0, epoch=0, params=params, flops=count_flops(r.model),
                    widths=r.widths(), spec=spec_of(r.model), elapsed=r.elapsed(),
                    steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps,
                    device=str(r.device))  # fmt: skip
    logger.info("run folder %s: %s on %s, %d params, %d steps", r.dir, r.cfg.dataset, r.device,
                params, r.total_steps)  # fmt: skip


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), or the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return dev


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
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
