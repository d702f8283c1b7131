"""What the loop measures without training: test accuracy and loss (split over the ranks), and
the batch loss just before and after a resize."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svdgrow._utils import eval_mode

from .data import DeviceDataset
from .parallel import Ranks

__all__ = ["evaluate", "probe_loss"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DeviceDataset,
    batch_size: int = 1000,
    autocast: Any = None,
    ranks: Ranks | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode, no augmentation).

    Args:
        model: the network.
        data: the split to evaluate on.
        batch_size: evaluation batch size.
        autocast: a context-manager factory for mixed precision (None: full precision).
        ranks: with several processes, each evaluates its contiguous share of ``data`` and the
            sums are added up (every rank gets the result).

    Returns:
        ``(accuracy in [0, 1], loss)``.
    """
    part = data
    if ranks is not None and ranks.distributed:
        part = data.shard(ranks.rank, ranks.size)
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with eval_mode(model):
        for x, y in part.batches(batch_size, shuffle=False):
            with ctx():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    n = max(1, len(data))
    if ranks is not None and ranks.distributed:
        total_correct, total_loss = ranks.sum([correct.item(), loss_sum.item()], "the evaluation")
        return int(total_correct) / n, total_loss / n
    return correct.item() / n, loss_sum.item() / n


@torch.no_grad()
def probe_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training-mode loss on one batch (no autograd graph), leaving every BatchNorm buffer as
    it was."""
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
