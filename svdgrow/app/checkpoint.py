"""Checkpoints: an architecture spec plus tensors, written atomically, read with weights_only.

A checkpoint holds no pickled modules or classes, only what ``torch.load(weights_only=True)``
accepts: the architecture spec as a JSON string (see :mod:`svdgrow.app.models`), the model's
``state_dict``, optionally the optimizer's ``state_dict`` with the names of its parameters in
order (so it can be re-attached to a rebuilt model), the LR scheduler's and the grad scaler's
state, the step and epoch, RNG states as tensors, a JSON string of free-form extras, and a
``sha256`` over all of these (every tensor's dtype, shape and bytes, every other value's repr,
in a fixed order), verified on load: a flipped byte inside a tensor is refused by name.

Writes go to a temporary file ``.<name>.<random>.tmp`` in the same folder, are flushed and
fsynced, and then renamed over the target with ``os.replace``: a crash or exception while
writing leaves the previous checkpoint as it was (:func:`remove_stale_temps` clears the temp
file a SIGKILL leaves behind).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .models import build_model, spec_of

__all__ = [
    "CheckpointError",
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_teacher",
    "optimizer_param_names",
    "rng_state",
    "set_rng_state",
    "atomic_torch_save",
    "atomic_write_bytes",
    "checksum",
    "remove_stale_temps",
]

logger = logging.getLogger(__name__)

FORMAT = "svdgrow-checkpoint-v1"
"""Value of the ``format`` field of every checkpoint this module writes."""

REQUIRED = ("spec", "model", "step", "epoch", "rng", "extra")
"""Keys every checkpoint has (resuming a run also needs ``optimizer`` and its param names)."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt or not an svdgrow checkpoint."""


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file in ``path``'s folder, fsync it and rename it over ``path``.

    If anything fails before the rename, the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable where the platform allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        pass


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that an atomic write killed mid-way (SIGKILL) left in ``folder``.

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        logger.info("removing %s, left by a write that was killed", path)
        path.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through a temp file and ``os.replace`` (all or nothing)."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace`` (all or nothing)."""
    _atomic_write(path, lambda fh: fh.write(data))


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names (in ``model``) of every parameter of every optimizer param group, in order.

    Raises:
        ValueError: when the optimizer holds a parameter that is not in the model.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    names: list[list[str]] = []
    for gi, group in enumerate(optimizer.param_groups):
        row = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(
                    f"optimizer param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                    "not a parameter of the model; build the optimizer over model.parameters()"
                )
            row.append(by_id[id(p)])
        names.append(row)
    return names


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as tensors: torch's CPU and CUDA generators and any named extra ones."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (generators or {}).items():
        state[f"gen:{name}"] = gen.get_state()
    return state


def set_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Restore the states saved by :func:`rng_state` (missing entries are left as they are)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states, this machine %d GPUs: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
    for name, gen in (generators or {}).items():
        key = f"gen:{name}"
        if key in state:
            gen.set_state(state[key].cpu())


def _state(obj: Any) -> Any:
    if obj is None or isinstance(obj, dict):
        return obj
    return obj.state_dict()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int = 0,
    epoch: int = 0,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the file to write (its folder is created).
        model: the network; its spec is read with :func:`spec_of` unless ``spec`` is given.
        optimizer: saved with its parameters' names so it can be re-attached after a rebuild.
        scheduler: an LR scheduler (anything with ``state_dict()``) or a dict of its state.
        scaler: a ``GradScaler`` (anything with ``state_dict()``) or a dict of its state.
        step: the number of optimizer steps taken.
        epoch: the number of finished epochs.
        rng: RNG states from :func:`rng_state`.
        extra: JSON-able extras (stored as a JSON string).
        spec: the architecture spec, when the model is not a :class:`~svdgrow.app.models.ResNet`.
        teacher: a distillation teacher (a ResNet) to keep with the run (see :func:`load_teacher`).

    Returns:
        the path written.
    """
    spec = spec if spec is not None else spec_of(model)
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "spec": json.dumps(spec, sort_keys=True),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _state(optimizer),
        "optimizer_param_names": optimizer_param_names(model, optimizer)
        if optimizer is not None
        else None,
        "scheduler": _state(scheduler),
        "scaler": _state(scaler),
        "step": int(step),
        "epoch": int(epoch),
        "rng": rng if rng is not None else rng_state(),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    if teacher is not None:
        ckpt["teacher"] = {
            "spec": json.dumps(spec_of(teacher), sort_keys=True),
            "model": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
        }
    ckpt["sha256"] = checksum(ckpt)
    atomic_torch_save(ckpt, path)
    logger.debug("checkpoint written: %s (step %d)", path, step)
    return Path(path)


def checksum(ckpt: dict[str, Any]) -> str:
    """sha256 (hex) of a checkpoint's content: every key and value but ``sha256`` itself.

    Tensors contribute their dtype, shape and raw bytes; other values their repr; dict entries
    go in sorted key order, so the digest does not depend on insertion order.
    """
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(obj.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}\n".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            _hash_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)}\n".encode())
        for item in obj:
            _hash_into(h, item)
    else:
        h.update(f"{obj!r}\n".encode())


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and verify its checksum.

    Returns:
        the checkpoint dict, with ``spec`` and ``extra`` parsed from JSON.

    Raises:
        CheckpointError: naming the path and the reason, when the file is missing, unreadable,
            truncated, holds objects weights_only loading refuses, is not an svdgrow checkpoint,
            lacks a key, or its content does not match its checksum.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refused(path, exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any other failure to unpickle means a bad file
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt, truncated or not a torch file "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an svdgrow checkpoint (format {got!r}, expected {FORMAT!r})"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(map(repr, missing))}")
    if "sha256" in ckpt and ckpt["sha256"] != checksum(ckpt):  # older checkpoints have none
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match the sha256 stored in it "
            "(bytes changed on disk); resume from another copy or start the run again"
        )
    try:
        ckpt["spec"] = json.loads(ckpt["spec"])
        ckpt["extra"] = json.loads(ckpt["extra"] or "{}")
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a malformed spec/extra: {exc}") from exc
    return ckpt


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def _first_line(exc: BaseException) -> str:
    lines = _ESCAPES.sub("", str(exc)).strip().splitlines()
    return lines[0] if lines else ""


def _refused(path: Path, exc: BaseException) -> str:
    """The reason ``weights_only`` loading refused a file, without torch's boilerplate."""
    text = _ESCAPES.sub("", str(exc))
    if "Weights only load failed" not in text:
        return f"cannot read checkpoint {path}: it is corrupt ({_first_line(exc)})"
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    reasons = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")]
    why = "; ".join(reasons) or "it holds a Python object that is not a tensor or plain data"
    return (
        f"refusing to load checkpoint {path}: it holds pickled Python objects that "
        f"weights_only loading does not allow ({why}). svdgrow never writes such objects, so "
        "the file comes from elsewhere or was altered; load it only if you trust its source"
    )


def load_model(
    path_or_ckpt: str | os.PathLike | dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (with its resized widths) and load its weights.

    Args:
        path_or_ckpt: a checkpoint path, or a dict from :func:`load_checkpoint`.
        device: where to put the model.

    Returns:
        ``(model, ckpt)``: the model in eval mode, and the checkpoint dict.
    """
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    try:
        model = build_model(ckpt["spec"])
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint weights do not match its own spec: {_first_line(exc)}"
        ) from exc
    return model.to(device).eval(), ckpt


def load_teacher(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module | None:
    """The distillation teacher a checkpoint keeps (eval mode, frozen), or None."""
    if not isinstance(ckpt.get("teacher"), dict):
        return None
    try:
        teacher = build_model(json.loads(ckpt["teacher"]["spec"]))
        teacher.load_state_dict(ckpt["teacher"]["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"the checkpoint's teacher does not load: {_first_line(exc)}"
        ) from exc
    return teacher.to(device).eval().requires_grad_(False)
