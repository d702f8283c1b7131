"""The small numerical pieces of stage 4: greedy pivoted Cholesky (which channels a prune keeps)
and orthogonal new rows (what a grow adds). See docs/design.md, "Stage 4: surgery"."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._utils import all_finite

__all__ = [
    "complement",
    "grow_rows",
    "grown_row_scale",
    "pivoted_cholesky",
    "pivoted_cholesky_batched",
    "solve_spd",
]


def pivoted_cholesky(G: Tensor, r: int, block: int = 64) -> Tensor:
    """The ``r`` pivots of a greedy pivoted Cholesky of a PSD Gram matrix ``G = A^T A``: the
    columns that column-pivoted QR (Gram-Schmidt) of ``A`` would choose.

    Blocked: ``block`` pivots at a time are chosen with the columns of that panel alone, then
    the Schur complement of the rows not chosen yet is updated in one matrix product and the
    chosen rows leave it; each step's column costs ``O(n * block)`` instead of ``O(n * t)``.
    The pivots are those of the one-column-at-a-time algorithm (up to rounding in near ties).
    The reference version of the ``svdgrow.ops.pivoted_cholesky`` kernel, which
    :func:`pivoted_cholesky_batched` runs on the CPU.

    Args:
        G (Tensor[n, n]): symmetric positive semi-definite.
        r: how many pivots (``r <= n``).
        block: pivots per panel.

    Returns:
        Tensor[r] (int64): the pivots in the order chosen.
    """
    n = G.shape[0]
    if r > n:
        raise ValueError(f"pivoted selection: asked for {r} columns out of {n}")
    S = G.double()  # the Schur complement on the rows not chosen yet (``rows`` of G)
    rows = torch.arange(n, device=G.device)
    residual = S.diagonal().clone()
    tiny = 1e-14 * float(residual.abs().max()) if n else 0.0
    order: list[int] = []
    while len(order) < r:
        panel = S.new_zeros(S.shape[0], min(block, r - len(order)))
        for k in range(panel.shape[1]):
            j = int(torch.argmax(residual))
            order.append(int(rows[j]))
            dj = residual[j]
            if float(dj) > tiny:
                col = S[j] - panel[:, :k] @ panel[j, :k] if k else S[j].clone()
                panel[:, k] = col * torch.rsqrt(dj)
                residual.sub_(panel[:, k] * panel[:, k])
            residual[j] = float("-inf")
        if len(order) < r:
            left = torch.isfinite(residual).nonzero().flatten()
            P = panel[left]
            S = torch.addmm(S[left][:, left], P, P.T, alpha=-1)
            residual, rows = residual[left], rows[left]
    return torch.tensor(order, dtype=torch.long, device=G.device)


def pivoted_cholesky_batched(grams: list[Tensor], rs: list[int]) -> list[Tensor]:
    """:func:`pivoted_cholesky` of several Gram matrices at once.

    On the CPU one ``svdgrow.ops.pivoted_cholesky`` kernel call for all (the blocked algorithm
    without per-pivot Python steps, matrices in parallel); on a GPU one padded batch
    (:func:`_pivoted_cholesky_padded`): every step is a handful of batched ops for all groups,
    with no host synchronisation.

    Args:
        grams: PSD matrices ``Tensor[n_i, n_i]``, on one device.
        rs: pivots wanted per matrix, ``r_i <= n_i``.

    Returns:
        one ``Tensor[r_i]`` (int64) of pivots per matrix, in the order chosen.
    """
    if not grams:
        return []
    if not bool(all_finite(grams)):
        raise FloatingPointError(
            "the features a prune is fitted on hold NaN/inf (the model's activations overflow "
            "on this batch); nothing was changed"
        )
    for g, r in zip(grams, rs, strict=True):
        if r > g.shape[0]:
            raise ValueError(f"pivoted selection: asked for {r} columns out of {g.shape[0]}")
    if grams[0].device.type != "cpu":
        return _pivoted_cholesky_padded(grams, rs)
    return ops.pivoted_cholesky(grams, rs)


def _pivoted_cholesky_padded(grams: list[Tensor], rs: list[int]) -> list[Tensor]:
    """:func:`pivoted_cholesky` of every matrix as one zero-padded batch ``[b, N, N]``.

    Padded positions start with residual ``-inf``, so they are never chosen; a matrix whose
    residual is exhausted (rank below ``r_i``) gets zero Cholesky columns, as in the one-matrix
    version. Each step chooses one pivot per matrix with batched gathers; the pivots past
    ``r_i`` are cut off at the end.

    Args:
        grams: PSD matrices ``Tensor[n_i, n_i]``, on one device.
        rs: pivots wanted per matrix, ``r_i <= n_i``.

    Returns:
        one ``Tensor[r_i]`` (int64) of pivots per matrix, in the order chosen.
    """
    b = len(grams)
    N = max(g.shape[0] for g in grams)
    R = max(rs)
    dev = grams[0].device
    Gp = torch.zeros(b, N, N, dtype=torch.float64, device=dev)
    residual = torch.full((b, N), float("-inf"), dtype=torch.float64, device=dev)
    for i, g in enumerate(grams):
        n = g.shape[0]
        if rs[i] > n:
            raise ValueError(f"pivoted selection: asked for {rs[i]} columns out of {n}")
        Gp[i, :n, :n] = g.double()
        residual[i, :n] = g.diagonal().double()
    finite = torch.where(torch.isfinite(residual), residual.abs(), torch.zeros_like(residual))
    tiny = 1e-14 * finite.amax(1, keepdim=True)
    L = torch.zeros(b, N, R, dtype=torch.float64, device=dev)
    order = torch.zeros(b, R, dtype=torch.long, device=dev)
    for t in range(R):
        j = torch.argmax(residual, dim=1)  # [b]
        order[:, t] = j
        dj = residual.gather(1, j[:, None])  # [b, 1]
        col = Gp.gather(2, j[:, None, None].expand(b, N, 1)).squeeze(2)  # [b, N]
        if t:
            Lj = L.gather(1, j[:, None, None].expand(b, 1, R))[:, :, :t]  # [b, 1, t]
            col = col - (L[:, :, :t] @ Lj.transpose(1, 2)).squeeze(2)
        ok = (dj > tiny) & torch.isfinite(dj)
        safe = torch.where(ok, dj, torch.ones_like(dj))
        step = torch.where(ok, col / safe.sqrt(), torch.zeros_like(col))
        L[:, :, t] = step
        residual = residual - step * step
        residual.scatter_(1, j[:, None], float("-inf"))
    return [order[i, : rs[i]].clone() for i in range(b)]


def solve_spd(A: Tensor, B: Tensor) -> Tensor:
    """``A^-1 B`` for a symmetric positive definite ``A`` (a ridge-regularised Gram matrix):
    a Cholesky solve, half the work of LU; LU where rounding made ``A`` indefinite.

    Args:
        A (Tensor[n, n]): symmetric positive definite.
        B (Tensor[n] or Tensor[n, k]): right-hand side(s).
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return torch.linalg.solve(A, B)
    return torch.cholesky_solve(B[:, None] if B.dim() == 1 else B, L).reshape(B.shape)


def complement(keep: Tensor, n: int) -> Tensor:
    """The indices of ``range(n)`` not in ``keep``, ascending.

    Args:
        keep (Tensor[k], int64): indices in ``[0, n)``.
        n: the range.
    """
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().flatten()


def grow_rows(
    W: Tensor, a: int, generator: torch.Generator | None = None, sv: Tensor | None = None
) -> Tensor:
    """``a`` new rows for a producer matrix, orthogonal to its rows and to each other.

    Args:
        W (Tensor[n, D]): the producer's current rows (``n + a <= D``).
        a: how many rows.
        generator: CPU random generator of the new directions.
        sv: the singular values of ``W`` when already known (else computed here).

    Returns:
        Tensor[a, D] (float64): orthonormal rows with ``W``'s row space projected out, scaled to
        half the smallest nonzero singular value of ``W``.
    """
    n, D = W.shape
    if n + a > D:
        raise ValueError(f"cannot add {a} rows to a {n} x {D} matrix: at most {D - n} fit")
    W = W.detach().double()
    R = torch.randn(a, D, generator=generator, dtype=torch.float64).to(W.device)
    if n:
        Q, _ = torch.linalg.qr(W.T)  # Tensor[D, n], spans the rows of W
        for _ in range(2):
            R = R - (R @ Q) @ Q.T
    Q2, _ = torch.linalg.qr(R.T)  # Tensor[D, a], orthonormal columns
    if n:
        for _ in range(2):
            Q2 = Q2 - Q @ (Q.T @ Q2)
        Q2, _ = torch.linalg.qr(Q2)
    if sv is None:
        sv = torch.linalg.svdvals(W) if n else torch.zeros(0, dtype=torch.float64)
    return grown_row_scale(sv) * Q2.T


def grown_row_scale(sv: Tensor) -> float:
    """The norm of a grown row: half the smallest nonzero singular value ``sv`` of its
    producer (``1e-2`` for a producer with none)."""
    sv = sv.double()
    nonzero = sv[sv > 1e-10 * float(sv.max())] if sv.numel() and float(sv.max()) > 0 else sv[:0]
    return 0.5 * float(nonzero.min()) if nonzero.numel() else 1e-2
