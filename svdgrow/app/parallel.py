"""Several processes: the launch (torchrun's rank and world size), the process group, and the
few collectives the training loop needs.

``torchrun --nproc_per_node N -m svdgrow train ...`` starts N copies of the run. Each reads its
own share of every global batch (``--batch-size`` per process, so the global batch is
``batch_size * N``), DDP averages the gradients, rank 0 alone writes the run folder. With one
process (``WORLD_SIZE`` unset or 1) :class:`Ranks` does nothing: every collective returns its
input, and a run computes exactly what it computed before this module existed.
(docs/design.md, "Several processes and torch.compile").
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from svdgrow.distributed import (
    DistributedResizeError,
    broadcast_state,
    check_all_ok,
    collective_errors,
)

__all__ = [
    "Launch",
    "Ranks",
    "RunFailed",
    "error_line",
    "pick_device",
    "process_group",
    "report_error",
]

logger = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A rank failed (a resize, a checkpoint write, a collective); raised on every rank, exit
    status 1. The run folder keeps its last checkpoint."""


@dataclass(frozen=True)
class Launch:
    """What torchrun tells a process about the launch (all defaults: one plain process).

    Attributes:
        rank: this process's rank (``RANK``).
        world_size: the number of processes (``WORLD_SIZE``).
        local_rank: the rank on this machine (``LOCAL_RANK``): the CUDA device it takes.
        restart: how many times torchrun restarted the workers (``TORCHELASTIC_RESTART_COUNT``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        env = os.environ
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                       int(env.get("LOCAL_RANK", 0)),
                       int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))  # fmt: skip
        except ValueError as exc:
            raise ValueError(
                f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers: {exc}"
            ) from None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Ranks:
    """The process group of a run, and its collectives (no-ops with one process).

    Attributes:
        launch: the launch.
        device: this process's device.
        backend: the process group's backend (None with one process).
    """

    launch: Launch = field(default_factory=Launch)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def size(self) -> int:
        return self.launch.world_size

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.launch.rank == 0

    def _comm(self, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        comm = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(values, dtype=dtype, device=comm)

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank reports whether its part of ``what`` worked; a failure anywhere raises
        :class:`RunFailed` on every rank (or the original error, with one process)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        try:
            check_all_ok(error, what)
        except DistributedResizeError as exc:
            raise RunFailed(str(exc)) from exc

    def flags(self, signum: int | None, due: bool) -> tuple[int | None, bool]:
        """The loop's step-boundary decision, the same on every rank: stop when any rank got a
        signal (the largest number wins), checkpoint when rank 0's clock says so."""
        if not self.distributed:
            return signum, due
        t = self._comm([signum or 0, int(due and self.main)], torch.int64)
        with _failures("the step-boundary agreement"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sig, due_all = (int(v) for v in t.tolist())
        return (sig or None), bool(due_all)

    def all_true(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.distributed:
            return flag
        t = self._comm([int(flag)], torch.int64)
        with _failures(what):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def sum(self, values: list[float], what: str) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.distributed:
            return values
        t = self._comm(values, torch.float64)
        with _failures(what):
            dist.all_reduce(t)
        return t.tolist()

    def share(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with _failures(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        with _failures(what):
            dist.all_gather_object(out, obj)
        return out

    def sync_model(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (BatchNorm statistics drift apart:
        each rank normalises its own share of the batch)."""
        if self.distributed:
            with _failures("the model sync"):
                broadcast_state(model, check=False)


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), or a named CPU or CUDA device.

    Raises:
        ValueError: for a name torch does not know, a device type other than cpu/cuda, or a
            CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: training runs on cpu or cuda (or auto)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return dev


def error_line(exc: BaseException, launch: Launch) -> str:
    """``svdgrow: error: <message on one line>``, without control characters (terminal
    escapes); ``rank R: `` before the message under torchrun with several processes."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", " ".join(str(exc).split()) or type(exc).__name__)
    rank = f"rank {launch.rank}: " if launch.distributed else ""
    return f"svdgrow: error: {rank}{text}"


def report_error(exc: BaseException, launch: Launch) -> None:
    """Print ``exc``'s error line now and mark it printed: under torchrun, once one process
    has exited the agent stops the others, which would die before the command line prints."""
    line = error_line(exc, launch)
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured)
        print(line, file=sys.stderr, flush=True)
    else:  # one write: the processes share the terminal, lines must not interleave
        sys.stderr.flush()
        os.write(fd, (line + "\n").encode(errors="replace"))
    exc.svdgrow_reported = True


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    try:
        with collective_errors(what):
            yield
    except DistributedResizeError as exc:
        raise RunFailed(str(exc)) from exc


def _device(name: str, launch: Launch) -> torch.device:
    """``pick_device``; with several processes, CUDA means ``cuda:LOCAL_RANK``."""
    device = pick_device(name)
    if not launch.distributed or device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise ValueError(
            f"--device {name}: with torchrun give --device cuda (or auto): each process takes "
            "the GPU of its LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {launch.local_rank} has no GPU: this machine has {count}; start at most "
            f"{count} processes per machine (torchrun --nproc_per_node {count})"
        )
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def process_group(
    device_name: str, backend: str | None, timeout_s: float, launch: Launch | None = None
) -> Iterator[Ranks]:
    """This process's :class:`Ranks`: its device, and with several processes the process group
    (gloo for the CPU, NCCL for CUDA, unless ``backend`` says otherwise), torn down at the end.

    Args:
        device_name: ``--device``.
        backend: ``--backend`` (None: from the device).
        timeout_s: every collective's timeout: a rank that died or hangs fails the others after
            this many seconds instead of blocking them forever.
        launch: the launch (default: from torchrun's environment variables).
    """
    launch = launch if launch is not None else Launch.from_env()
    device = _device(device_name, launch)
    if not launch.distributed:
        yield Ranks(launch, device)
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun keeps its store across restarts: keys of the failed attempt (a dead rank's
    # address) would be read by the next one, so every attempt gets its own key prefix
    store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=timeout))
    store = dist.PrefixStore(f"svdgrow/attempt{launch.restart}", store)
    dist.init_process_group(backend, store=store, timeout=timeout, rank=launch.rank,
                            world_size=launch.world_size)  # fmt: skip
    logger.info("rank %d of %d on %s (%s)", launch.rank, launch.world_size, device, backend)
    try:
        yield Ranks(launch, device, backend)
    finally:
        with contextlib.suppress(Exception):  # a group whose peer died may not tear down
            dist.destroy_process_group()
