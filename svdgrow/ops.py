"""Python entry points to the svdgrow kernels (``torch.ops.svdgrow.*``).

Three operators, each with a CPU kernel (``csrc/cpu``), a fake (meta) implementation registered
here so that ``torch.compile`` and shape propagation see through them, and an autograd
registration that refuses to differentiate them; the first two also have a CUDA kernel where
built (``csrc/cuda``):

* :func:`batched_svd`: singular values and vectors of many matrices of different shapes in one
  call.
* :func:`slice_copy`: keep, reorder and add rows / channels of many tensors (weights, biases,
  optimizer state) in one pass.
* :func:`pivoted_cholesky`: the greedy pivots of many PSD matrices (which channels a prune
  keeps) in one call, CPU only (a GPU runs ``svdgrow.surgery.pivots``' batched tensor version,
  which never waits for the host).

Their contracts (the ``[R, C, B]`` layout, accuracy, aliasing, threads): ``docs/design.md``,
section "Kernels".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import svdgrow._C  # noqa: F401  (loads the library that defines torch.ops.svdgrow.*)

__all__ = ["batched_svd", "make_index", "pivoted_cholesky", "slice_copy"]

_EMPTY_MATS = "batched_svd: mats is an empty list; pass at least one 2-D matrix"


def batched_svd(
    mats: Sequence[Tensor],
    k: int | None = None,
    niter: int = 2,
    oversample: int = 8,
    seed: int = 0,
    randomized: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Thin SVD of many matrices of different shapes in one call.

    For every ``A = mats[i]`` of shape ``(m, n)`` returns ``S[i]``, ``U[i]`` and ``Vh[i]`` with
    ``A ~= U[i] @ diag(S[i]) @ Vh[i]``, singular values descending, ``U[i]`` with orthonormal
    columns and ``Vh[i]`` with orthonormal rows, also for rank-deficient matrices. The accuracy
    contract and the algorithms: ``docs/design.md``, "Kernels: batched_svd". Not
    differentiable: a backward pass through the outputs raises.

    Args:
        mats (Sequence[Tensor[m_i, n_i]]): float32 or float64 matrices on one device.
        k (int, optional): Keep the top ``k`` triplets, ``0 < k <= min(m_i, n_i)``; None: all.
            Exact (the full decomposition, truncated) unless ``randomized``.
        niter (int): Power iterations of the CUDA kernel's randomized range finder.
        oversample (int): Extra columns of that range finder.
        seed (int): Seed of the random vectors (range finder, null-space completion).
        randomized (bool): On CUDA, with ``k``, use the randomized range finder where
            ``k + oversample < min(m_i, n_i)``: faster, but sigma and the top-k subspace meet
            the accuracy above only where the spectrum decays past ``k + oversample`` (like
            ``torch.svd_lowrank``; on a flat spectrum sigma are lower bounds). The CPU kernel
            is always exact.

    Returns:
        ``(S, U, Vh)``: lists with ``S[i] (Tensor[r])``, ``U[i] (Tensor[m_i, r])`` and
        ``Vh[i] (Tensor[r, n_i])`` in the input's dtype and device; ``r = min(m_i, n_i)`` or
        ``k``.

    Raises:
        ValueError: On an empty list.
        RuntimeError: On a matrix that is not 2-D, not float32/float64, empty, or holds NaN or
            Inf; on matrices on different devices or ``k`` out of range. The message names the
            matrix index.
    """
    mats = list(mats)
    if not mats:
        raise ValueError(_EMPTY_MATS)
    if k is not None and not randomized:  # oversampling to min(m, n) is the exact path
        dims = (min(a.shape) for a in mats if isinstance(a, Tensor) and a.dim() == 2)
        oversample = max(max(dims, default=0), oversample)
    S, U, Vh = torch.ops.svdgrow.batched_svd.default(mats, k, niter, oversample, seed)
    return S, U, Vh


def make_index(
    kept: Tensor | Sequence[int],
    n_new: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Builds a ``slice_copy`` index: the kept source slices, then ``n_new`` new ones.

    Args:
        kept (Tensor[K] or Sequence[int]): Source rows / channels to keep, in their new order.
        n_new (int): Number of new slices appended after the kept ones (marked ``-1``).
        device (torch.device or str, optional): Device of the result; default: ``kept``'s.

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
    """One entry per tensor: ``None`` (or an int for ``block``) applies to all."""
    if value is None:
        return [None] * n
    if isinstance(value, int) and name == "block":
        return [value] * n
    if isinstance(value, (Tensor, int)):
        raise ValueError(
            f"slice_copy: {name} must be a sequence with one entry per tensor, "
            f"got a {type(value).__name__}"
        )
    value = list(value)
    if len(value) != n:
        raise ValueError(
            f"slice_copy: {name} has {len(value)} entries but src has {n}; pass one per tensor"
        )
    return value


def _check_tensors(name: str, values: list, optional: bool) -> None:
    """A TypeError naming the entry, where the op's own parser would give a generic one."""
    for i, v in enumerate(values):
        if not (isinstance(v, Tensor) or (optional and v is None)):
            what = "a Tensor or None" if optional else "a Tensor"
            raise TypeError(f"slice_copy: {name}[{i}] must be {what}, got {type(v).__name__}")


def slice_copy(
    src: Sequence[Tensor],
    row_index: Sequence[Tensor | None] | None,
    col_index: Sequence[Tensor | None] | None,
    block: int | Sequence[int],
    fill: Sequence[Tensor | None] | None = None,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Keeps, reorders and adds rows and input channels of many tensors in one kernel call.

    Each ``src[i]`` is viewed as ``[R, C, B]`` (``R = size(0)``, ``B = block[i]``); destination
    row ``j`` is source row ``row_index[i][j]``, destination channel ``c`` is source channel
    ``col_index[i][c]``, ``-1`` marks a new slice taken from ``fill[i]`` (or zero), ``None``
    keeps that dimension. The layout per layer kind, and the rules for ``out`` (all-or-nothing,
    aliasing): ``docs/design.md``, "Kernels: slice_copy". Build indices with :func:`make_index`.

    Args:
        src (Sequence[Tensor]): Tensors to resize: any shapes and floating dtypes, one device.
        row_index (Sequence[Tensor[R'] or None], optional): int64 row map per tensor; None: all.
        col_index (Sequence[Tensor[C'] or None], optional): int64 channel map; None (or length
            1) for 1-D tensors.
        block (int or Sequence[int]): Block size ``B`` per tensor; an int applies to all.
        fill (Sequence[Tensor or None], optional): Values of the new slices, destination shape.
        out (Sequence[Tensor], optional): Contiguous destinations (``slice_copy_``), distinct
            memory; they may overlap the inputs.

    Returns:
        list[Tensor]: The resized tensors, one per ``src`` (``out``'s tensors when given).

    Raises:
        TypeError: If an entry of ``src`` or ``out`` is not a tensor.
        ValueError: If a per-tensor list has the wrong length.
        RuntimeError: On tensors on several devices, bad indices (not int64 1-D, out of range,
            a slice kept twice), a block that does not fit, a wrong fill or ``out``, or two
            ``out`` entries that share memory; the message names the argument and the index.
            Nothing is written when it raises.
    """
    src = list(src)
    _check_tensors("src", src, optional=False)
    n = len(src)
    if n == 0:
        return []
    rows = _per_tensor("row_index", row_index, n)
    cols = _per_tensor("col_index", col_index, n)
    blocks = [int(b) for b in _per_tensor("block", block, n)]
    fills = _per_tensor("fill", fill, n)
    for name, values in (("row_index", rows), ("col_index", cols), ("fill", fills)):
        _check_tensors(name, values, optional=True)
    if out is None:
        return list(torch.ops.svdgrow.slice_copy.default(src, rows, cols, blocks, fills))
    outs = _per_tensor("out", out, n)
    _check_tensors("out", outs, optional=False)
    torch.ops.svdgrow.slice_copy_.default(src, outs, rows, cols, blocks, fills)
    return outs


def pivoted_cholesky(grams: Sequence[Tensor], r: Sequence[int], block: int = 64) -> list[Tensor]:
    """The first ``r[i]`` pivots of a greedy pivoted Cholesky of each PSD matrix, in one call.

    For ``grams[i] = A^T A`` these are the columns that column-pivoted QR (Gram-Schmidt) of
    ``A`` would choose: each pivot is the column with the largest residual after projecting out
    the ones chosen before (the first of equal ones). The kernel is the blocked algorithm of
    :func:`svdgrow.surgery.pivots.pivoted_cholesky` (``block`` pivots per panel, then one BLAS
    update of the rest) in float64, without its per-pivot Python steps; matrices run in
    parallel. Once a matrix's residual is exhausted (rank below ``r[i]``) the remaining pivots
    follow the rounding, as there. ``docs/design.md``, "Kernels: pivoted_cholesky".

    Args:
        grams (Sequence[Tensor[n_i, n_i]]): symmetric PSD float32/float64 matrices, on the CPU.
        r (Sequence[int]): pivots wanted per matrix, ``0 <= r[i] <= n_i``.
        block (int): pivots per panel.

    Returns:
        list[Tensor[r_i]] (int64): the pivots of each matrix in the order chosen.

    Raises:
        ValueError: when ``r`` does not have one entry per matrix, or the matrices are not on
            the CPU.
        RuntimeError: on a matrix that is not square, not float32/float64, or not on the
            device of the first; on ``r[i]`` out of range. The message names the index.
    """
    grams, r = list(grams), [int(x) for x in r]
    if len(r) != len(grams):
        raise ValueError(
            f"pivoted_cholesky: grams has {len(grams)} entries but r has {len(r)}; pass one "
            "pivot count per matrix"
        )
    if not grams:
        return []
    if grams[0].device.type != "cpu":
        raise ValueError(
            f"pivoted_cholesky: runs on the CPU, got grams on {grams[0].device}; move them "
            "with .cpu(), or call svdgrow.surgery.pivoted_cholesky_batched (a batched GPU "
            "version)"
        )
    return list(torch.ops.svdgrow.pivoted_cholesky.default(grams, r, block))


# ---------------------------------------------------------------------------------------------
# Autograd: neither op is differentiable. Without a registration autograd would attach its
# "not implemented" node, whose backward only warns and lets the gradient silently stop.
# ---------------------------------------------------------------------------------------------


def _refuse_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"svdgrow::{op} is not differentiable; call it on detached tensors "
            "(or under torch.no_grad()) and keep its outputs out of the loss"
        )

    return backward


def _no_context(ctx, inputs, output) -> None:
    pass


for _op in ("batched_svd", "slice_copy", "pivoted_cholesky"):
    torch.library.register_autograd(
        f"svdgrow::{_op}", _refuse_backward(_op), setup_context=_no_context
    )


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, with the kernels' argument checks and messages
# (csrc/common.h).
# ---------------------------------------------------------------------------------------------


def _check(cond, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


@torch.library.register_fake("svdgrow::batched_svd")
def _batched_svd_fake(mats, k=None, niter=2, oversample=8, seed=0):
    _check(len(mats) > 0, _EMPTY_MATS)
    device = mats[0].device
    S, U, Vh = [], [], []
    for i, a in enumerate(mats):
        _check(
            a.dim() == 2,
            f"batched_svd: mats[{i}] must be a 2-D matrix, got a {a.dim()}-D tensor of shape "
            f"{tuple(a.shape)}",
        )
        _check(
            a.dtype in (torch.float32, torch.float64),
            f"batched_svd: mats[{i}] must be float32 or float64, got {a.dtype}",
        )
        _check(
            a.device == device,
            f"batched_svd: all mats must be on one device; mats[0] is on {device} but "
            f"mats[{i}] is on {a.device}",
        )
        m, n = a.shape
        p = torch.sym_min(m, n)
        if k is not None:
            msg = (
                "batched_svd: k must satisfy 0 < k <= min(m, n) for every matrix, got "
                f"k = {k} but mats[{i}] has shape {tuple(a.shape)}"
            )
            torch._check(0 < k, lambda msg=msg: msg)
            torch._check(k <= p, lambda msg=msg: msg)
        r = p if k is None else k
        S.append(a.new_empty((r,)))
        U.append(a.new_empty((m, r)))
        Vh.append(a.new_empty((r, n)))
    return S, U, Vh


def _check_index_arg(name: str, i: int, idx, src) -> None:
    _check(
        idx.dtype == torch.int64,
        f"slice_copy: {name}[{i}] must be an int64 tensor, got {idx.dtype}",
    )
    _check(idx.dim() == 1, f"slice_copy: {name}[{i}] must be 1-D, got shape {tuple(idx.shape)}")
    _check(
        idx.device == src.device,
        f"slice_copy: {name}[{i}] is on {idx.device} but src[{i}] is on {src.device}; move "
        "the index to the tensor's device",
    )


def _slice_dst_shape(i, src, row, col, block):
    _check(src.dim() >= 1, f"slice_copy: src[{i}] must have at least one dimension")
    shape = list(src.shape)
    for name, idx in (("row_index", row), ("col_index", col)):
        if idx is not None:
            _check_index_arg(name, i, idx, src)
    if row is not None:
        shape[0] = row.shape[0]
    if src.dim() == 1:
        _check(
            col is None or col.shape[0] == 1,
            f"slice_copy: col_index[{i}] must be None (or of length 1) for the 1-D src[{i}]",
        )
        _check(block == 1, f"slice_copy: block[{i}] must be 1 for the 1-D src[{i}]")
        return shape
    trailing = 1
    for d in src.shape[2:]:
        trailing *= d
    _check(
        block % trailing == 0 and src.shape[1] % (block // trailing) == 0,
        f"slice_copy: block[{i}] = {block} does not fit src[{i}] of shape {tuple(src.shape)}",
    )
    if col is not None:
        shape[1] = col.shape[0] * (block // trailing)
    return shape


def _check_slice_lists(src, row_index, col_index, block, fill):
    n = len(src)
    lists = (("row_index", row_index), ("col_index", col_index), ("block", block), ("fill", fill))
    for name, v in lists:
        _check(len(v) == n, f"slice_copy: {name} has {len(v)} entries but src has {n}")
    for i, t in enumerate(src):
        _check(
            t.device == src[0].device,
            f"slice_copy: all tensors must be on one device; src[0] is on {src[0].device} but "
            f"src[{i}] is on {t.device}",
        )


@torch.library.register_fake("svdgrow::slice_copy")
def _slice_copy_fake(src, row_index, col_index, block, fill):
    _check_slice_lists(src, row_index, col_index, block, fill)
    args = zip(src, row_index, col_index, block, strict=True)
    return [s.new_empty(_slice_dst_shape(i, s, r, c, b)) for i, (s, r, c, b) in enumerate(args)]


@torch.library.register_fake("svdgrow::slice_copy_")
def _slice_copy__fake(src, dst, row_index, col_index, block, fill):
    _check_slice_lists(src, row_index, col_index, block, fill)
    _check(len(dst) == len(src), f"slice_copy_: dst has {len(dst)} entries but src has {len(src)}")
    for i, (s, d, r, c, b) in enumerate(zip(src, dst, row_index, col_index, block, strict=True)):
        shape = _slice_dst_shape(i, s, r, c, b)
        _check(
            list(d.shape) == shape,
            f"slice_copy_: dst[{i}] must have shape {tuple(shape)}, got {tuple(d.shape)}",
        )
    return None


@torch.library.register_fake("svdgrow::pivoted_cholesky")
def _pivoted_cholesky_fake(grams, r, block=64):
    _check(
        len(grams) == len(r), f"pivoted_cholesky: grams has {len(grams)} entries but r has {len(r)}"
    )
    _check(block >= 1, f"pivoted_cholesky: block must be >= 1, got {block}")
    out = []
    for i, (g, k) in enumerate(zip(grams, r, strict=True)):
        _check(
            g.dim() == 2 and g.shape[0] == g.shape[1],
            f"pivoted_cholesky: grams[{i}] must be a square matrix, got shape {tuple(g.shape)}",
        )
        _check(
            0 <= k <= g.shape[0],
            f"pivoted_cholesky: asked for {k} pivots of grams[{i}], which has {g.shape[0]} columns",
        )
        out.append(g.new_empty((k,), dtype=torch.int64))
    return out
