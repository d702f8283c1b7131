"""The run folder: its file names, the JSONL event log, config.json, and reading them back.

One run lives in one folder::

    config.json          the TrainConfig, the starting spec and parameter count, device, torch
    log.jsonl            one JSON object per line: start, resize, epoch, interrupted, resume, end
    checkpoints/last.pt  the latest checkpoint (see svdgrow.app.checkpoint)
    final_spec.json      the architecture at the end
    *.png                plots (see svdgrow.app.plot)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_bytes, load_checkpoint
from .config import TrainConfig

__all__ = [
    "CKPT_NAME",
    "CONFIG_NAME",
    "FINAL_SPEC_NAME",
    "LOG_NAME",
    "JsonlLog",
    "NullLog",
    "RunDirError",
    "baseline_config",
    "check_new_run_dir",
    "default_run_dir",
    "last_checkpoint",
    "load_run_config",
    "read_json",
    "read_log",
    "write_json",
]

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"
CKPT_NAME = os.path.join("checkpoints", "last.pt")
FINAL_SPEC_NAME = "final_spec.json"


class RunDirError(ValueError):
    """A run folder's file is missing or not valid JSON (the message names the file and line)."""


class JsonlLog:
    """Appends one JSON object per line to ``path``, flushed at once.

    Args:
        path: the log file.
        fresh: start it empty (a new run) instead of appending (a resumed one).
    """

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        self.fh = open(path, "w" if fresh else "a", buffering=1)  # held open for the whole run

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, **fields}`` as one line."""
        self.fh.write(json.dumps({"event": event, **fields}, default=_json_default) + "\n")
        self.fh.flush()

    def close(self) -> None:
        """Close the file."""
        self.fh.close()


class NullLog:
    """A log that writes nothing (the processes other than rank 0 of a run)."""

    def write(self, event: str, **fields: Any) -> None:
        """Drop the event."""

    def close(self) -> None:
        """Nothing to close."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file.

    Args:
        path: the file.
        what: what the file is, for the error message (e.g. ``"spec file"``).

    Raises:
        RunDirError: naming the file (and the line and column) when it is missing, unreadable
            or not valid JSON.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunDirError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunDirError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a temp file renamed over ``path``)."""
    atomic_write_bytes(json.dumps(obj, indent=2).encode(), path)


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event of a run's ``log.jsonl`` (a torn last line, from a crash, is skipped).

    Raises:
        FileNotFoundError: when the folder has no log.
        RunDirError: naming the file and line of a corrupt line other than the last.
    """
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {LOG_NAME} in {Path(run_dir).resolve()}: is this a run folder?"
        )
    lines = path.read_text().splitlines()
    events = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                logger.warning("skipping a torn last line of %s", path)
                continue
            raise RunDirError(f"{path} line {i + 1} is not valid JSON: {exc.msg}") from None
        if not isinstance(event, dict) or "event" not in event:
            raise RunDirError(
                f"{path} line {i + 1} is not a log event (a JSON object with 'event')"
            )
        events.append(event)
    return events


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """Path of a run's latest checkpoint."""
    return Path(run_dir) / CKPT_NAME


def default_run_dir(cfg: TrainConfig) -> str:
    """``runs/<dataset>-<preset, spec or baseline-RUN>-<YYYYmmdd-HHMMSS>``."""
    name = cfg.preset if cfg.spec is None else "spec"
    if cfg.baseline_of:
        name = f"baseline-{Path(cfg.baseline_of).name}"
    return os.path.join("runs", f"{cfg.dataset}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_new_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuse a ``--run-dir`` that is a file, or a folder that already holds a run.

    Raises:
        RunDirError: saying what to do instead.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file, not a folder: choose another --run-dir")
    if (path / CONFIG_NAME).exists():
        raise RunDirError(
            f"--run-dir {path} already holds a run: continue it with --resume {path}, or choose "
            "another --run-dir"
        )


def load_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any]]:
    """A run's :class:`TrainConfig` and the whole ``config.json`` record.

    Returns:
        ``(config, record)``; ``record`` also holds ``start_spec``, ``start_params``, ``device``
        and ``torch``.

    Raises:
        RunDirError: when the folder has no config.json, or it is corrupt.
    """
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise RunDirError(
            f"no {CONFIG_NAME} in {Path(run_dir).resolve()}: not a run folder (or one whose start "
            "was killed before its first checkpoint: start that run again)"
        )
    record = read_json(path, "run config")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunDirError(f"run config {path} has no 'config' object: not written by svdgrow train")
    return TrainConfig.from_json(record["config"]), record


def baseline_config(source: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A config that trains run ``source``'s final architecture from scratch, without resizing.

    Same dataset, epochs, optimizer and schedule as the run; ``overrides`` that are not None
    replace fields (e.g. ``run_dir``, ``epochs``, ``device``).
    """
    run_dir = Path(source)
    base, _ = load_run_config(run_dir)
    spec_path = run_dir / FINAL_SPEC_NAME
    if spec_path.is_file():
        base.spec = read_json(spec_path, "final spec")
    else:
        base.spec = load_checkpoint(last_checkpoint(run_dir))["spec"]
    base.bn = None
    base.resize_every = 0
    base.target_params = None
    base.target_mflops = None  # the budgets and what needs one go with the resizing
    base.distill = 0.0
    base.start_scale = None
    base.run_dir = None
    base.baseline_of = str(run_dir)
    for k, v in overrides.items():
        if v is not None:
            setattr(base, k, v)
    return base
