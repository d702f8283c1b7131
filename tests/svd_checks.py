"""Shared references and checks for the svdgrow kernels (tests/test_ops.py).

SVD outputs have sign and order freedom, so the checks compare singular values,
reconstructions ``U diag(S) Vh``, orthonormality and projectors ``U U^T``, never raw ``U`` or
``V``, against float64 ``torch.linalg``. ``ref_slice_copy`` is plain indexing on the
``[R, C, B]`` view (docs/design.md, "Kernels: slice_copy").
"""

from __future__ import annotations

import math

import torch

# Tolerances per input dtype (docs/design.md, "Kernels: batched_svd", accuracy contract):
# sig_rel: relative sigma error, for sigma >= 1e-3 sigma_max; sig_abs: absolute sigma error /
# sigma_max, every sigma; orth: max |U^T U - I| and |Vh Vh^T - I|; rec: ||U S Vh - A||_F / ||A||_F.
TOL = {
    torch.float32: dict(sig_rel=1e-4, sig_abs=2e-6, orth=5e-5, rec=2e-5),
    torch.float64: dict(sig_rel=1e-10, sig_abs=1e-12, orth=1e-10, rec=1e-10),
}


# ---------------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------------


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 (rows, cols) matrix with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q


def spectrum_matrix(m, n, sigma, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A (m, n) matrix with the singular values ``sigma`` (at most min(m, n)), random vectors."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    r = sigma.numel()
    return ((orthonormal(m, r, gen) * sigma) @ orthonormal(n, r, gen).T).to(dtype)


MATRIX_KINDS = ["gauss", "lowrank", "repeated", "zero_rows", "graded"]


def make_matrix(m: int, n: int, kind: str, scale: float, seed: int) -> torch.Tensor:
    """A float64 (m, n) test matrix of the given kind, times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    if kind == "gauss":
        a = torch.randn(m, n, dtype=torch.float64, generator=gen)
    elif kind == "lowrank":
        r = max(1, p // 3)
        left = torch.randn(m, r, dtype=torch.float64, generator=gen)
        a = left @ torch.randn(r, n, dtype=torch.float64, generator=gen)
    elif kind == "repeated":
        s = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.5] * p, dtype=torch.float64)[:p]
        a = spectrum_matrix(m, n, s, gen)
    elif kind == "zero_rows":  # a layer after zero-filled growth
        a = torch.randn(m, n, dtype=torch.float64, generator=gen)
        a[m // 2 :] = 0
    elif kind == "graded":  # singular values from 1 down to 1e-8
        a = spectrum_matrix(m, n, torch.logspace(0, -8, p, dtype=torch.float64), gen)
    elif kind == "constant":  # rank one, every entry equal
        a = torch.ones(m, n, dtype=torch.float64)
    elif kind == "duplicated_rows":  # rank <= 2: two distinct rows, repeated
        rows = torch.randn(2, n, dtype=torch.float64, generator=gen)
        a = rows[torch.arange(m) % 2]
    elif kind == "zero":
        a = torch.zeros(m, n, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return a * scale


def non_contiguous(a: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in a non-contiguous layout (0: column-major, 1: a strided slice)."""
    if how == 0:
        return a.T.contiguous().T
    wide = torch.zeros(a.shape[0], 2 * a.shape[1], dtype=a.dtype, device=a.device)
    wide[:, ::2] = a
    return wide[:, ::2]


# ---------------------------------------------------------------------------------------------
# SVD checks
# ---------------------------------------------------------------------------------------------


def projector(u: torch.Tensor, k: int) -> torch.Tensor:
    uk = u[:, :k]
    return uk @ uk.T


def _power_of_two_scale(a64: torch.Tensor) -> float:
    """2^-e with max|a| * 2^-e in [0.5, 1): an exact rescaling (1 for a zero matrix)."""
    amax = float(a64.abs().max())
    return math.ldexp(1.0, -math.frexp(amax)[1]) if amax > 0 else 1.0


def check_svd(a, s, u, vh, k=None, what="", **tol_overrides) -> None:
    """Checks one ``(S, U, Vh)`` of ``a`` against float64 ``torch.linalg.svd``.

    Shapes, dtypes, devices; finite, non-negative, descending sigma; sigma errors (absolute
    for all, relative for sigma >= 1e-3 sigma_max); orthonormal U and Vh; reconstruction
    (full) or the best rank-k error (top-k); every well separated leading subspace. Matrices
    are rescaled by a power of two first (exact), so tiny and huge scales are checked alike.
    """
    m, n = a.shape
    r = min(m, n) if k is None else k
    tol = {**TOL[a.dtype], **tol_overrides}
    assert s.shape == (r,) and u.shape == (m, r) and vh.shape == (r, n), what
    assert s.dtype == u.dtype == vh.dtype == a.dtype, what
    assert s.device == u.device == vh.device == a.device, what
    assert torch.isfinite(s).all() and torch.isfinite(u).all() and torch.isfinite(vh).all(), what
    a64 = a.detach().double().cpu()
    scale = _power_of_two_scale(a64)
    a64 = a64 * scale
    s64, u64, vh64 = s.double().cpu() * scale, u.double().cpu(), vh.double().cpu()
    ur, sr, vhr = torch.linalg.svd(a64, full_matrices=False)
    smax = float(sr[0])
    assert torch.all(s64[:-1] >= s64[1:]), f"{what}: singular values must be descending"
    assert torch.all(s64 >= 0), what
    err = (s64 - sr[:r]).abs()
    assert float(err.max()) <= tol["sig_abs"] * smax + 1e-300, (
        f"{what}: sigma abs error {float(err.max()) / max(smax, 1e-300):.3g} * sigma_max"
    )
    big = sr[:r] >= 1e-3 * smax
    if smax > 0 and bool(big.any()):
        rel = float((err[big] / sr[:r][big]).max())
        assert rel <= tol["sig_rel"], f"{what}: sigma relative error {rel:.3g}"
    eye = torch.eye(r, dtype=torch.float64)
    ou = float((u64.T @ u64 - eye).abs().max())
    ov = float((vh64 @ vh64.T - eye).abs().max())
    assert ou <= tol["orth"], f"{what}: U columns are not orthonormal ({ou:.3g})"
    assert ov <= tol["orth"], f"{what}: Vh rows are not orthonormal ({ov:.3g})"
    rec = float(((u64 * s64) @ vh64 - a64).norm())
    norm = float(a64.norm())
    if k is None:
        assert rec <= tol["rec"] * norm + 1e-300, f"{what}: U S Vh != A ({rec / norm:.3g})"
    else:
        best = float(sr[k:].pow(2).sum().sqrt())
        assert rec <= best * (1 + 1e-6) + 10 * tol["rec"] * norm + 1e-300, what
    _check_leading_subspaces(u64, vh64, ur, sr, vhr, r, what)


def _check_leading_subspaces(u64, vh64, ur, sr, vhr, r, what) -> None:
    """Every leading left subspace that is separated (0.9 gap) and above 1e-3 sigma_max, and
    the top-r right subspace of a top-k result, match the reference to 1e-3."""
    smax = float(sr[0])
    if smax == 0:
        return  # a zero matrix has no leading subspace
    for j in range(1, min(r, sr.numel() - 1) + 1):
        if j < sr.numel() and sr[j - 1] >= 1e-3 * smax and sr[j] <= 0.9 * sr[j - 1]:
            d = float(torch.linalg.norm(projector(ur, j) - projector(u64, j)))
            assert d <= 1e-3, f"{what}: top-{j} left subspace off by {d:.3g}"
    if r < sr.numel() and sr[r] <= 0.9 * sr[r - 1] and sr[r - 1] >= 1e-3 * smax:
        d = float(torch.linalg.norm(projector(vhr.T, r) - projector(vh64.T, r)))
        assert d <= 1e-3, f"{what}: top-{r} right subspace off by {d:.3g}"


def check_projectors(a: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, k: int) -> None:
    """Top-k left and right subspaces vs the reference where sigma_{k+1} <= 0.9 sigma_k."""
    a64 = a.detach().double().cpu()
    ur, sr, vhr = torch.linalg.svd(a64, full_matrices=False)
    if k < sr.numel() and not sr[k] <= 0.9 * sr[k - 1]:
        return  # no gap: the top-k subspace is not well defined
    if sr[k - 1] <= 1e-3 * sr[0]:
        return
    u64, v64 = u.double().cpu()[:, :k], vh.double().cpu()[:k].T
    pu = u64 @ u64.T - ur[:, :k] @ ur[:, :k].T
    pv = v64 @ v64.T - vhr[:k].T @ vhr[:k]
    assert float(pu.norm()) <= 1e-3, f"left projector error {float(pu.norm()):.3g}"
    assert float(pv.norm()) <= 1e-3, f"right projector error {float(pv.norm()):.3g}"


# ---------------------------------------------------------------------------------------------
# slice_copy reference
# ---------------------------------------------------------------------------------------------


def ref_slice_copy(src, row, col, block, fill):
    """Plain indexing on the [R, C, B] view; -1 takes fill (or zero)."""
    R = src.shape[0]
    C = src.numel() // (R * block)
    v = src.reshape(R, C, block)
    rows = torch.arange(R, device=src.device) if row is None else row
    cols = torch.arange(C, device=src.device) if col is None else col
    Rn, Cn = rows.numel(), cols.numel()
    shape = list(src.shape)
    shape[0] = Rn
    if src.dim() >= 2:
        shape[1] = src.shape[1] // C * Cn
    picked = v.index_select(0, rows.clamp_min(0)).index_select(1, cols.clamp_min(0))
    keep = (rows >= 0)[:, None, None] & (cols >= 0)[None, :, None]
    new = torch.zeros_like(picked) if fill is None else fill.reshape(Rn, Cn, block)
    return torch.where(keep, picked, new).reshape(shape)
