"""Python entry points to the svdgrow kernels (``torch.ops.svdgrow.*``).

Two operators, each with a CPU kernel (``csrc/cpu``), a CUDA kernel where built
(``csrc/cuda``) and a fake (meta) implementation registered here so that ``torch.compile``
and shape propagation see through them:

* :func:`batched_svd` -- singular values and vectors of many matrices of different shapes in
  one call.
* :func:`slice_copy` -- keep, reorder and add rows / channels of many tensors (weights,
  biases, optimizer state) in one pass, honouring the ``kh*kw`` block of a conv weight and the
  ``h*w`` block of a Linear weight after ``Flatten``.

Neither op records autograd history: call them under ``torch.no_grad()`` on detached
parameters, as the resizing step does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

import svdgrow._C  # noqa: F401  (loads the library that defines torch.ops.svdgrow.*)

__all__ = ["batched_svd", "slice_copy", "make_index"]


def batched_svd(
    mats: Sequence[Tensor],
    k: Optional[int] = None,
    niter: int = 2,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Thin SVD of many matrices of different shapes in one call.

    For every ``A = mats[i]`` of shape ``(m, n)`` returns ``S[i]`` (``r``), ``U[i]`` (``m x r``)
    and ``Vh[i]`` (``r x n``) with ``A ~= U[i] @ diag(S[i]) @ Vh[i]``, singular values in
    descending order, ``U[i]`` with orthonormal columns and ``Vh[i]`` with orthonormal rows.
    ``r = min(m, n)``, or ``k`` when given (then only the top ``k`` triplets).

    Args:
        mats: Matrices ``(Tensor[m_i, n_i])``, float32 or float64, all on one device; shapes
            may differ and non-contiguous tensors are accepted. A conv weight
            ``[out, in, kh, kw]`` goes in as ``w.reshape(out, -1)``.
        k: Number of leading singular triplets to return; ``0 < k <= min(m_i, n_i)`` for every
            matrix. ``None`` returns all ``min(m_i, n_i)``.
        niter: Power iterations of the randomized range finder (used by the CUDA kernel when
            ``k`` is well below ``min(m, n)``; the CPU kernel is exact and ignores it).
        oversample: Extra columns of the randomized range finder (CUDA only, as ``niter``).
        seed: Seed of the random vectors (range finder; completion of null-space vectors).

    Returns:
        ``(S, U, Vh)``: three lists with one entry per matrix, in the input dtype and device:
        ``S[i] (Tensor[r])``, ``U[i] (Tensor[m_i, r])``, ``Vh[i] (Tensor[r, n_i])``.

    Raises:
        ValueError: On an empty list.
        RuntimeError: On a matrix that is not 2-D, not float32/float64 or empty,
            matrices on different devices, or ``k`` outside ``(0, min(m_i, n_i)]``; the message
            names the argument and the matrix index.

    Note:
        The CPU kernel forms a float64 Gram matrix on the short side and solves a symmetric
        eigenproblem, so small singular values lose relative accuracy as
        ``eps64 * (sigma_max / sigma)**2`` (about 1e-10 at ``sigma = 1e-3 sigma_max``). Vectors
        of singular values at the rounding floor are completed to an orthonormal set.
    """
    mats = list(mats)
    if not mats:
        raise ValueError("batched_svd: mats is an empty list; pass at least one 2-D matrix")
    return tuple(torch.ops.svdgrow.batched_svd.default(mats, k, niter, oversample, seed))  # type: ignore[return-value]


def make_index(
    kept: Union[Tensor, Sequence[int]],
    n_new: int = 0,
    device: Optional[Union[torch.device, str]] = None,
) -> Tensor:
    """Builds a ``slice_copy`` index: the kept source slices, then ``n_new`` new ones.

    Args:
        kept: Source row / channel numbers to keep, in their new order (``Tensor[K]`` of
            integers or a sequence of ints).
        n_new: Number of new slices appended after the kept ones (marked ``-1``).
        device: Device of the result; defaults to ``kept``'s device (CPU for a sequence).

    Returns:
        ``Tensor[K + n_new]`` of int64: ``cat(kept, full((n_new,), -1))``.
    """
    if n_new < 0:
        raise ValueError(f"make_index: n_new must be >= 0, got {n_new}")
    if not isinstance(kept, Tensor):
        kept = torch.as_tensor(list(kept), dtype=torch.int64)
    if device is None:
        device = kept.device
    kept = kept.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.cat([kept, torch.full((n_new,), -1, dtype=torch.int64, device=device)])


def _per_tensor(name: str, value, n: int) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, (Tensor, int)):
        if isinstance(value, int) and name == "block":
            return [value] * n
        raise ValueError(f"slice_copy: {name} must be a sequence with one entry per tensor, got a {type(value).__name__}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"slice_copy: {name} has {len(value)} entries but src has {n}; pass one per tensor")
    return value


def slice_copy(
    src: Sequence[Tensor],
    row_index: Optional[Sequence[Optional[Tensor]]],
    col_index: Optional[Sequence[Optional[Tensor]]],
    block: Union[int, Sequence[int]],
    fill: Optional[Sequence[Optional[Tensor]]] = None,
    out: Optional[Sequence[Tensor]] = None,
) -> list[Tensor]:
    """Keeps, reorders and adds rows and input channels of many tensors in one pass.

    Each ``src[i]`` is viewed as ``[R, C, B]`` with ``R = size(0)``, ``B = block[i]`` and
    ``C = numel / (R * B)``:

    * conv weight ``[O, I, kh, kw]``: ``B = kh*kw`` (``C = I``);
    * Linear weight after ``Flatten`` ``[O, C*h*w]``: ``B = h*w``;
    * plain Linear weight ``[O, I]``: ``B = 1``;
    * bias / BatchNorm vector ``[O]``: ``B = 1`` (``C = 1``).

    Destination row ``j`` is source row ``row_index[i][j]`` and destination channel ``c`` is
    source channel ``col_index[i][c]``; ``-1`` marks a new slice, taken from ``fill[i]`` (a
    tensor of the destination's shape) or zero. ``None`` keeps that dimension as it is. The
    destination has ``src[i]``'s shape with ``size(0) = len(row_index[i])`` and ``size(1)``
    scaled from ``C`` to ``len(col_index[i])`` channels. Build indices with
    :func:`make_index`.

    Tensors are grouped by (device, dtype) and each group goes to the kernel in one call.

    Args:
        src: Tensors to resize (any mix of shapes, devices and floating dtypes; non-contiguous
            is fine).
        row_index: Per tensor, ``Tensor[R']`` of int64 (or ``None``); ``None`` for all.
        col_index: Per tensor, ``Tensor[C']`` of int64 (or ``None``); ``None`` for all.
            Must be ``None`` (or of length 1) for 1-D tensors.
        block: Per tensor block size ``B`` (an int applies to all).
        fill: Per tensor, the values of new slices (``Tensor`` of the destination shape, same
            dtype and device) or ``None`` for zeros; ``None`` for all.
        out: Preallocated contiguous destinations (``slice_copy_``); may be views into a larger
            buffer, and may overlap ``src`` (the source is then read from a copy).

    Returns:
        The resized tensors, one per ``src`` (``out`` itself when given).

    Raises:
        ValueError: If a per-tensor list has the wrong length.
        RuntimeError: On bad indices (not int64 1-D, out of ``[-1, R)`` / ``[-1, C)``, a
            source slice kept twice), a block that does not divide the tensor, a fill or
            ``out`` of the wrong shape/dtype/device, or a non-contiguous ``out``; the message
            names the argument and the tensor index.
    """
    src = list(src)
    n = len(src)
    rows = _per_tensor("row_index", row_index, n)
    cols = _per_tensor("col_index", col_index, n)
    blocks = [int(b) for b in _per_tensor("block", block, n)]
    fills = _per_tensor("fill", fill, n)
    outs = None if out is None else _per_tensor("out", out, n)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(src):
        groups.setdefault((t.device, t.dtype), []).append(i)
    result: list[Optional[Tensor]] = [None] * n
    for idx in groups.values():
        args = (
            [rows[i] for i in idx],
            [cols[i] for i in idx],
            [blocks[i] for i in idx],
            [fills[i] for i in idx],
        )
        if outs is None:
            res = torch.ops.svdgrow.slice_copy.default([src[i] for i in idx], *args)
            for i, r in zip(idx, res):
                result[i] = r
        else:
            torch.ops.svdgrow.slice_copy_.default([src[i] for i in idx], [outs[i] for i in idx], *args)
            for i in idx:
                result[i] = outs[i]
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, with the kernels' argument checks.
# ---------------------------------------------------------------------------------------


def _check(cond, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


@torch.library.register_fake("svdgrow::batched_svd")
def _batched_svd_fake(mats, k=None, niter=2, oversample=8, seed=0):
    _check(len(mats) > 0, "batched_svd: mats is an empty list; pass at least one 2-D matrix")
    device = mats[0].device
    S, U, Vh = [], [], []
    for i, a in enumerate(mats):
        _check(a.dim() == 2, f"batched_svd: mats[{i}] must be a 2-D matrix, got a {a.dim()}-D tensor of shape {tuple(a.shape)}")
        _check(a.dtype in (torch.float32, torch.float64), f"batched_svd: mats[{i}] must be float32 or float64, got {a.dtype}")
        _check(a.device == device, f"batched_svd: all mats must be on one device; mats[0] is on {device} but mats[{i}] is on {a.device}")
        m, n = a.shape
        p = torch.sym_min(m, n)
        if k is not None:
            torch._check(0 < k, lambda: f"batched_svd: k must be > 0, got {k}")
            torch._check(k <= p, lambda: f"batched_svd: k = {k} exceeds min(m, n) of mats[{i}] of shape {tuple(a.shape)}")
        r = p if k is None else k
        S.append(a.new_empty((r,)))
        U.append(a.new_empty((m, r)))
        Vh.append(a.new_empty((r, n)))
    return S, U, Vh


def _slice_dst_shape(i, src, row, col, block):
    _check(src.dim() >= 1, f"slice_copy: src[{i}] must have at least one dimension")
    shape = list(src.shape)
    for name, idx in (("row_index", row), ("col_index", col)):
        if idx is not None:
            _check(idx.dtype == torch.int64, f"slice_copy: {name}[{i}] must be an int64 tensor, got {idx.dtype}")
            _check(idx.dim() == 1, f"slice_copy: {name}[{i}] must be 1-D, got shape {tuple(idx.shape)}")
            _check(idx.device == src.device, f"slice_copy: {name}[{i}] is on {idx.device} but src[{i}] is on {src.device}; move the index to the tensor's device")
    if row is not None:
        shape[0] = row.shape[0]
    if src.dim() == 1:
        _check(col is None or col.shape[0] == 1, f"slice_copy: col_index[{i}] must be None (or of length 1) for the 1-D src[{i}]")
        _check(block == 1, f"slice_copy: block[{i}] must be 1 for the 1-D src[{i}]")
        return shape
    trailing = 1
    for d in src.shape[2:]:
        trailing *= d
    _check(block % trailing == 0 and src.shape[1] % (block // trailing) == 0,
           f"slice_copy: block[{i}] = {block} does not fit src[{i}] of shape {tuple(src.shape)}")
    t = block // trailing
    if col is not None:
        shape[1] = col.shape[0] * t
    return shape


def _check_slice_lists(src, row_index, col_index, block, fill):
    n = len(src)
    for name, v in (("row_index", row_index), ("col_index", col_index), ("block", block), ("fill", fill)):
        _check(len(v) == n, f"slice_copy: {name} has {len(v)} entries but src has {n}")
    for i, t in enumerate(src):
        _check(t.device == src[0].device, f"slice_copy: all tensors must be on one device; src[0] is on {src[0].device} but src[{i}] is on {t.device}")


@torch.library.register_fake("svdgrow::slice_copy")
def _slice_copy_fake(src, row_index, col_index, block, fill):
    _check_slice_lists(src, row_index, col_index, block, fill)
    return [s.new_empty(_slice_dst_shape(i, s, r, c, b)) for i, (s, r, c, b) in enumerate(zip(src, row_index, col_index, block))]


@torch.library.register_fake("svdgrow::slice_copy_")
def _slice_copy__fake(src, dst, row_index, col_index, block, fill):
    _check_slice_lists(src, row_index, col_index, block, fill)
    _check(len(dst) == len(src), f"slice_copy_: dst has {len(dst)} entries but src has {len(src)}")
    for i, (s, d, r, c, b) in enumerate(zip(src, dst, row_index, col_index, block)):
        shape = _slice_dst_shape(i, s, r, c, b)
        _check(list(d.shape) == shape, f"slice_copy_: dst[{i}] must have shape {tuple(shape)}, got {tuple(d.shape)}")
    return None
