"""Stage 5, the optimizer-state remap: every per-parameter state tensor shaped like its
parameter follows the parameter's resize (same index maps, new slices 0); scalars (Adam's
``step``) are kept. Parameter objects never change, so the same optimizer keeps working.
See docs/design.md, "Stage 5: optimizer-state remap".
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["KNOWN_STATE", "state_to_slice", "check_state_shapes"]

#: Per-parameter state keys of the optimizers svdgrow knows, each with the power of the gradient
#: it accumulates (1: momentum, first moments; 2: second moments; 0: unaffected by the gradient's
#: scale, such as ``step`` or RMSprop's momentum of normalised steps). Tensors under these keys
#: that are shaped like the parameter are sliced; scalar tensors (``step``) are kept.
KNOWN_STATE: dict[type, dict[str, int]] = {
    torch.optim.SGD: {"momentum_buffer": 1},
    torch.optim.Adam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.AdamW: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.Adamax: {"step": 0, "exp_avg": 1, "exp_inf": 1},
    torch.optim.NAdam: {"step": 0, "mu_product": 0, "exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.RAdam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.RMSprop: {"step": 0, "square_avg": 2, "momentum_buffer": 0, "grad_avg": 1},
    torch.optim.Adagrad: {"step": 0, "sum": 2},
}


def _is_scalar(v: Tensor) -> bool:
    return v.dim() == 0


def state_to_slice(
    optimizer: torch.optim.Optimizer | None, params: dict[Tensor, str]
) -> dict[Tensor, list[str]]:
    """Decide, before anything is touched, which state entries follow each resized parameter.

    Args:
        optimizer: the optimizer (None: nothing to do).
        params: the parameters about to be resized, with their names (for messages).

    Returns:
        param -> keys of its state tensors to slice like the parameter.

    Raises:
        ValueError: a state entry cannot be mapped (a tensor of another shape, a list or dict
            of tensors, ...). Nothing has been changed when this is raised.

    Warns:
        UserWarning: for an optimizer (or a state key) svdgrow does not know, when tensors
            shaped like their parameter are sliced on that assumption.
    """
    if optimizer is None:
        return {}
    known = KNOWN_STATE.get(type(optimizer))
    out: dict[Tensor, list[str]] = {}
    guessed: set[str] = set()
    for p, pname in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        keys = [k for k, v in st.items() if _follows(optimizer, p, pname, k, v)]
        guessed.update(str(k) for k in keys if known is None or k not in known)
        if keys:
            out[p] = keys
    if guessed:
        warnings.warn(
            f"svdgrow: {type(optimizer).__name__} state {sorted(guessed)} is not known to svdgrow; "
            "tensors shaped like their parameter were sliced like it (new slices 0). Check that "
            "this is right for this optimizer.",
            UserWarning,
            stacklevel=3,
        )
    return out


def _follows(optimizer, p: Tensor, pname: str, key, value) -> bool:
    """Whether state entry ``key`` of parameter ``p`` is sliced like it (a tensor of its
    shape) or kept (a scalar, a plain number or string); raises when it can be neither."""
    name = type(optimizer).__name__
    if torch.is_tensor(value):
        if value.shape == p.shape:
            return True
        if _is_scalar(value):
            return False
        raise ValueError(
            f"cannot resize: {name} state[{pname!r}][{key!r}] has shape {tuple(value.shape)}, "
            f"neither the parameter's {tuple(p.shape)} nor a scalar, so it cannot follow the "
            "resize. Nothing was changed. Rebuild the optimizer after resizing "
            "(Resizer(..., optimizer=None)) or use SGD/Adam/AdamW."
        )
    if isinstance(value, (int, float, bool, str, type(None))):
        return False
    raise ValueError(
        f"cannot resize: {name} state[{pname!r}][{key!r}] is a {type(value).__name__}, which "
        "svdgrow cannot map onto the new shape. Nothing was changed. Rebuild the optimizer "
        "after resizing (Resizer(..., optimizer=None))."
    )


def check_state_shapes(optimizer: torch.optim.Optimizer) -> list[str]:
    """Problems found in an optimizer's state: tensors whose shape differs from their parameter
    (stale) and parameters in the state that are in no parameter group. Empty when all is well."""
    problems = []
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p, st in optimizer.state.items():
        if id(p) not in in_groups:
            problems.append(
                f"a parameter of shape {tuple(p.shape)} has state but is in no param group"
            )
        for k, v in st.items():
            if torch.is_tensor(v) and not _is_scalar(v) and v.shape != p.shape:
                problems.append(
                    f"state {k!r} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}"
                )
    return problems
