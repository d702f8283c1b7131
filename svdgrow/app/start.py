"""How a run starts and stops: its checked settings (a new run, a resume, a torchrun restart),
the stop signals, and the CPU thread count (docs/design.md, "The application")."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .parallel import Launch
from .rundir import (
    CONFIG_NAME,
    RunDirError,
    check_new_run_dir,
    default_run_dir,
    last_checkpoint,
    load_run_config,
)

__all__ = [
    "StopRequest",
    "TrainingInterrupted",
    "num_threads",
    "prepare",
    "restart_resumes",
    "stop_signals",
]

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


def prepare(
    cfg: TrainConfig | None,
    resume: str | os.PathLike | None,
    overrides: dict[str, Any] | None,
    launch: Launch,
) -> tuple[TrainConfig, dict[str, Any], dict[str, Any] | None]:
    """The checked config, starting spec and checkpoint (None: a new run) of a run."""
    if resume is None:
        cfg = cfg if cfg is not None else TrainConfig()
        cfg.world_size = launch.world_size
        cfg.validate()
        cfg.run_dir = cfg.run_dir or default_run_dir(cfg)
        check_new_run_dir(cfg.run_dir)
        spec = cfg.starting_spec()
        shortfall = cfg.start_shortfall(spec)
        if shortfall is not None:
            logger.warning(shortfall)
        return cfg, spec, None
    cfg, record = load_run_config(resume)
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.run_dir = str(resume)
    cfg.validate()
    _check_world_size(cfg, launch, resume)
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


def _check_world_size(cfg: TrainConfig, launch: Launch, run: str | os.PathLike) -> None:
    """A run resumes on as many processes as it trained on: the global batch, each process's
    share of the batch order and the BatchNorm statistics depend on that number."""
    was, now = cfg.world_size, launch.world_size
    if was == now:
        return
    how = f"torchrun --nproc_per_node {was} -m svdgrow" if was > 1 else "svdgrow (one process)"
    raise RunDirError(
        f"cannot resume {run} on {now} process(es): it trained on {was} (global batch "
        f"{cfg.batch_size * was} = {cfg.batch_size} x {was}), and its batches and batch "
        f"statistics depend on that number; resume it with {how} train --resume {run}"
    )


def restart_resumes(run_dir: str | None, launch: Launch) -> bool:
    """Whether this start is torchrun restarting workers (``--max-restarts``) of a run whose
    folder exists: then the command line's run continues from its last checkpoint."""
    return bool(launch.restart > 0 and run_dir and (Path(run_dir) / CONFIG_NAME).is_file())


@dataclass
class StopRequest:
    """The stop signal received (None: none yet)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM only set a flag that the loop reads at step boundaries; a second
    signal raises KeyboardInterrupt at once. Handlers are installed from the main thread only."""
    stop = StopRequest()
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
def num_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` (None: left as they are) for the ``with`` block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
