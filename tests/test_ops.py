"""Tests of the svdgrow operators (``svdgrow.ops``) against float64 torch references.

SVD outputs have sign and order freedom, so the checks compare singular values,
reconstructions ``U diag(S) Vh``, orthonormality and projectors ``U U^T`` -- never raw ``U``
or ``V``. ``slice_copy`` is compared bit for bit with a pure-torch reference (index_select +
fill). CUDA cases carry the ``needs_cuda`` mark and show as skipped where no GPU is.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdgrow  # noqa: F401  (loads the extension: torch.ops.svdgrow.*)
from svdgrow import ops

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda)]
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Tolerances per input dtype: relative sigma error (on sigma >= 1e-3 sigma_max), absolute
# sigma error / sigma_max (all sigma), orthonormality (max |U^T U - I|), reconstruction
# (||U S Vh - A||_F / ||A||_F).
TOL = {
    torch.float32: dict(srel=1e-4, sabs=2e-6, orth=2e-5, rec=2e-5),
    torch.float64: dict(srel=1e-10, sabs=1e-12, orth=1e-10, rec=1e-10),
}


# ---------------------------------------------------------------------------------------
# Matrix generators
# ---------------------------------------------------------------------------------------


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q


def make_matrix(m: int, n: int, kind: str, scale: float, seed: int) -> torch.Tensor:
    """A float64 (m, n) test matrix of the given kind."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    if kind == "gauss":
        a = torch.randn(m, n, dtype=torch.float64, generator=gen)
    elif kind == "lowrank":
        r = max(1, p // 3)
        a = torch.randn(m, r, dtype=torch.float64, generator=gen) @ torch.randn(r, n, dtype=torch.float64, generator=gen)
    elif kind == "repeated":
        s = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.5] * p, dtype=torch.float64)[:p]
        a = (_orthonormal(m, p, gen) * s) @ _orthonormal(n, p, gen).T
    elif kind == "zero_rows":  # a layer after zero-filled growth
        a = torch.randn(m, n, dtype=torch.float64, generator=gen)
        a[m // 2 :] = 0
    elif kind == "graded":  # singular values from 1 down to 1e-8
        s = torch.logspace(0, -8, p, dtype=torch.float64)
        a = (_orthonormal(m, p, gen) * s) @ _orthonormal(n, p, gen).T
    elif kind == "zero":
        a = torch.zeros(m, n, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return a * scale


def non_contiguous(a: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in a non-contiguous layout (column-major, or a strided slice)."""
    if how == 0:
        return a.T.contiguous().T
    wide = torch.zeros(a.shape[0], 2 * a.shape[1], dtype=a.dtype, device=a.device)
    wide[:, ::2] = a
    return wide[:, ::2]


matrix_specs = st.tuples(
    st.sampled_from([(1, 1), (1, 17), (17, 1), (5, 5), (3, 40), (40, 3), (16, 48), (48, 16), (64, 9)])
    | st.tuples(st.integers(1, 48), st.integers(1, 48)),
    st.sampled_from(["gauss", "lowrank", "repeated", "zero_rows", "graded"]),
    st.sampled_from([1.0, 1e-6, 1e6]),
    st.integers(0, 2**31 - 1),
    st.sampled_from([None, 0, 1]),  # contiguous / column-major / strided
)


# ---------------------------------------------------------------------------------------
# SVD checks
# ---------------------------------------------------------------------------------------


def check_svd(a: torch.Tensor, s: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, k: int | None = None) -> None:
    """Checks one (S, U, Vh) against a float64 reference of ``a``."""
    m, n = a.shape
    p = min(m, n)
    r = p if k is None else k
    assert s.shape == (r,) and u.shape == (m, r) and vh.shape == (r, n)
    assert s.dtype == u.dtype == vh.dtype == a.dtype
    assert s.device == u.device == vh.device == a.device
    tol = TOL[a.dtype]
    a64 = a.detach().double().cpu()
    s64, u64, vh64 = s.double().cpu(), u.double().cpu(), vh.double().cpu()
    sr = torch.linalg.svdvals(a64)
    smax = float(sr[0])
    assert torch.all(s64[:-1] >= s64[1:]), "singular values must be descending"
    assert torch.all(s64 >= 0)
    # singular values
    err = (s64 - sr[:r]).abs()
    assert float(err.max()) <= tol["sabs"] * smax + 1e-300, f"sigma abs error {float(err.max()) / max(smax, 1e-300):.3g} * sigma_max"
    big = sr[:r] >= 1e-3 * smax
    if smax > 0 and bool(big.any()):
        rel = (err[big] / sr[:r][big]).max()
        assert float(rel) <= tol["srel"], f"sigma relative error {float(rel):.3g}"
    # orthonormality
    eye = torch.eye(r, dtype=torch.float64)
    assert float((u64.T @ u64 - eye).abs().max()) <= tol["orth"], "U columns are not orthonormal"
    assert float((vh64 @ vh64.T - eye).abs().max()) <= tol["orth"], "Vh rows are not orthonormal"
    # reconstruction (full) or best rank-k error (top-k)
    rec = (u64 * s64) @ vh64
    norm = float(a64.norm())
    if k is None:
        assert float((rec - a64).norm()) <= tol["rec"] * norm + 1e-300, "U S Vh != A"
    else:
        best = float(sr[k:].pow(2).sum().sqrt())
        assert float((rec - a64).norm()) <= best * (1 + 1e-6) + 10 * tol["rec"] * norm + 1e-300


def check_projectors(a: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, k: int) -> None:
    """Top-k left/right subspaces vs the reference where sigma_{k+1} <= 0.9 sigma_k."""
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


# ---------------------------------------------------------------------------------------
# batched_svd
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(specs=st.lists(matrix_specs, min_size=1, max_size=4), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batched_svd_full(device, specs, dtype):
    mats = []
    for (m, n), kind, scale, seed, layout in specs:
        a = make_matrix(m, n, kind, scale, seed).to(device=device, dtype=dtype)
        mats.append(a if layout is None else non_contiguous(a, layout))
    before = [a.clone() for a in mats]
    S, U, Vh = ops.batched_svd(mats)
    assert len(S) == len(U) == len(Vh) == len(mats)
    for a, b, s, u, vh in zip(mats, before, S, U, Vh):
        assert torch.equal(a, b), "batched_svd modified its input"
        check_svd(a, s, u, vh)


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    specs=st.lists(matrix_specs, min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    frac=st.floats(0.0, 1.0),
)
def test_batched_svd_topk(device, specs, dtype, frac):
    mats = []
    for (m, n), kind, scale, seed, layout in specs:
        a = make_matrix(m, n, kind, scale, seed).to(device=device, dtype=dtype)
        mats.append(a if layout is None else non_contiguous(a, layout))
    pmin = min(min(a.shape) for a in mats)
    k = max(1, min(pmin, int(round(frac * pmin))))
    S, U, Vh = ops.batched_svd(mats, k=k)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh, k=k)
        check_projectors(a, u, vh, k)


def _spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    return (_orthonormal(m, p, gen) * s) @ _orthonormal(n, p, gen).T


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_topk_subspace_with_gap(device):
    # sigma_{k+1} = 0.9 sigma_k exactly at the boundary, slowly decaying on both sides.
    k = 12
    mats = []
    for i, (m, n) in enumerate([(64, 576), (300, 40), (128, 128)]):
        p = min(m, n)
        s = torch.cat([torch.linspace(10, 5, k), torch.linspace(4.5, 0.1, p - k)]).double()
        mats.append(_spectrum_matrix(m, n, s, seed=i).float().to(device))
    S, U, Vh = ops.batched_svd(mats, k=k)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh, k=k)
        check_projectors(a, u, vh, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_layer_shapes(device, dtype):
    """Layer-like shapes (conv weights as out x in*9, a head), full and top-k."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(128, 9), (128, 1152), (64, 576), (10, 3136), (300, 20)]
    mats = [(torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[1])).to(device, dtype) for s in shapes]
    S, U, Vh = ops.batched_svd(mats)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh)
    S, U, Vh = ops.batched_svd(mats, k=3)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh, k=3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_special_matrices(device):
    mats = [
        torch.zeros(7, 5),                       # all zero
        torch.eye(6),                            # all sigma equal
        torch.ones(4, 9),                        # rank one
        torch.full((1, 1), -2.0),                # 1 x 1, negative
        torch.randn(1, 30),                      # a row
        torch.randn(30, 1),                      # a column
    ]
    mats = [a.to(device) for a in mats]
    S, U, Vh = ops.batched_svd(mats)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh)
    assert float(S[3][0]) == pytest.approx(2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_deterministic(device):
    mats = [make_matrix(20, 30, "zero_rows", 1.0, 3).float().to(device), torch.randn(8, 3, device=device)]
    first = ops.batched_svd(mats, seed=5)
    second = ops.batched_svd(mats, seed=5)
    for xs, ys in zip(first, second):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------
# slice_copy
# ---------------------------------------------------------------------------------------


def ref_slice_copy(src, row, col, block, fill):
    """Pure-torch reference: index_select on the [R, C, B] view, then fill where -1."""
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


def _random_index(draw_perm: torch.Tensor, n_keep: int, n_new: int, shuffle_gen: torch.Generator) -> torch.Tensor:
    idx = ops.make_index(draw_perm[:n_keep], n_new)
    return idx[torch.randperm(idx.numel(), generator=shuffle_gen)]


@st.composite
def slice_case(draw):
    """One tensor of a random layer kind with random row/col indices and fill."""
    kind = draw(st.sampled_from(["conv", "linear", "bias", "flatten"]))
    O = draw(st.integers(1, 12))
    I = draw(st.integers(1, 10))
    kh, kw, hw = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 9]))
    if kind == "conv":
        shape, block, C = (O, I, kh, kw), kh * kw, I
    elif kind == "linear":
        shape, block, C = (O, I), 1, I
    elif kind == "bias":
        shape, block, C = (O,), 1, 1
    else:
        shape, block, C = (O, I * hw), hw, I
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    row = col = None
    if draw(st.booleans()):
        n_keep = draw(st.integers(0 if O > 1 else 1, O))
        n_new = draw(st.integers(0 if n_keep else 1, 4))
        row = _random_index(torch.randperm(O, generator=gen), n_keep, n_new, gen)
    if kind != "bias" and draw(st.booleans()):
        n_keep = draw(st.integers(0 if C > 1 else 1, C))
        n_new = draw(st.integers(0 if n_keep else 1, 4))
        col = _random_index(torch.randperm(C, generator=gen), n_keep, n_new, gen)
    return dict(shape=shape, block=block, row=row, col=col, fill=draw(st.booleans()), seed=seed,
                noncontig=draw(st.booleans()))


def _materialise(case, device, dtype):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    if case["noncontig"] and len(shape) >= 2:
        src = torch.randn(tuple(reversed(shape)), generator=gen).permute(*reversed(range(len(shape))))
    else:
        src = torch.randn(shape, generator=gen)
    src = src.to(device=device, dtype=dtype)
    row = None if case["row"] is None else case["row"].to(device)
    col = None if case["col"] is None else case["col"].to(device)
    fill = None
    if case["fill"]:
        dst_shape = ref_slice_copy(src, row, col, case["block"], None).shape
        fill = (torch.randn(dst_shape, generator=gen) + 100).to(device=device, dtype=dtype)
    return src, row, col, fill


SLICE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(cases=st.lists(slice_case(), min_size=1, max_size=6), dtype=st.sampled_from(SLICE_DTYPES))
def test_slice_copy_matches_reference(device, cases, dtype):
    tensors = [_materialise(c, device, dtype) for c in cases]
    src = [t[0] for t in tensors]
    rows = [t[1] for t in tensors]
    cols = [t[2] for t in tensors]
    fills = [t[3] for t in tensors]
    blocks = [c["block"] for c in cases]
    out = ops.slice_copy(src, rows, cols, blocks, fills)
    for s, r, c, b, f, o in zip(src, rows, cols, blocks, fills, out):
        ref = ref_slice_copy(s, r, c, b, f)
        assert o.shape == ref.shape and o.dtype == s.dtype and o.device == s.device
        assert o.is_contiguous()
        assert torch.equal(o, ref)


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(cases=st.lists(slice_case(), min_size=1, max_size=6), dtype=st.sampled_from(SLICE_DTYPES))
def test_slice_copy_inplace_into_capacity(device, cases, dtype):
    """slice_copy_ into views of one preallocated buffer; the rest of the buffer is untouched."""
    tensors = [_materialise(c, device, dtype) for c in cases]
    src = [t[0] for t in tensors]
    rows, cols, fills = [t[1] for t in tensors], [t[2] for t in tensors], [t[3] for t in tensors]
    blocks = [c["block"] for c in cases]
    refs = [ref_slice_copy(*args) for args in zip(src, rows, cols, blocks, fills)]
    sizes = [r.numel() for r in refs]
    buf = torch.full((sum(sizes) + 7,), -7.0, device=device, dtype=dtype)
    dst, off = [], 0
    for r, size in zip(refs, sizes):
        dst.append(buf[off : off + size].view(r.shape))
        off += size
    res = ops.slice_copy(src, rows, cols, blocks, fills, out=dst)
    for o, d, r in zip(res, dst, refs):
        assert o is d
        assert torch.equal(d, r)
    assert torch.all(buf[off:] == -7.0)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_inplace_overlapping_source(device):
    """Shrinking a conv weight inside its own storage: dst overlaps src."""
    buf = torch.randn(8 * 6 * 3 * 3, device=device)
    src = buf.view(8, 6, 3, 3)
    row = torch.tensor([7, 0, 3, -1, 5], device=device)
    col = torch.tensor([5, -1, 1, 2], device=device)
    ref = ref_slice_copy(src.clone(), row, col, 9, None)
    dst = buf[: ref.numel()].view(ref.shape)
    torch.ops.svdgrow.slice_copy_.default([src], [dst], [row], [col], [9], [None])
    assert torch.equal(dst, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_groups_mixed_dtypes(device):
    a = torch.randn(4, 3, 3, 3, device=device)
    b = torch.randn(4, device=device, dtype=torch.float64)
    c = torch.randn(5, 4, device=device, dtype=torch.bfloat16)
    row = ops.make_index(torch.tensor([2, 0]), 1).to(device)
    col = ops.make_index([3, 1], 2, device=device)
    out = ops.slice_copy([a, b, c], [row, row, None], [None, None, col], [9, 1, 1])
    assert torch.equal(out[0], ref_slice_copy(a, row, None, 9, None))
    assert torch.equal(out[1], ref_slice_copy(b, row, None, 1, None))
    assert torch.equal(out[2], ref_slice_copy(c, None, col, 1, None))
    assert [o.dtype for o in out] == [torch.float32, torch.float64, torch.bfloat16]


def test_make_index():
    idx = ops.make_index(torch.tensor([4, 1]), 3)
    assert idx.dtype == torch.int64 and idx.tolist() == [4, 1, -1, -1, -1]
    assert ops.make_index([0], 0).tolist() == [0]
    with pytest.raises(ValueError, match="n_new"):
        ops.make_index([0], -1)


# ---------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------


def test_opcheck_batched_svd():
    mats = [torch.randn(6, 4), torch.randn(3, 8, dtype=torch.float32), torch.randn(5, 5)]
    torch.library.opcheck(torch.ops.svdgrow.batched_svd.default, (mats,))
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.svdgrow.batched_svd.default, (mats, 2, 2, 8, 1), test_utils=quick)
    torch.library.opcheck(torch.ops.svdgrow.batched_svd.default, ([torch.randn(7, 3, dtype=torch.float64)],), test_utils=quick)


def _slice_sample():
    src = [torch.randn(4, 3, 2, 2), torch.randn(4), torch.randn(5, 12)]
    rows = [torch.tensor([3, -1, 0]), torch.tensor([3, -1, 0]), None]
    cols = [torch.tensor([2, 0, -1, -1]), None, torch.tensor([1, -1])]
    blocks = [4, 1, 4]
    fills = [torch.randn(3, 4, 2, 2), None, None]
    return src, rows, cols, blocks, fills


def test_opcheck_slice_copy():
    torch.library.opcheck(torch.ops.svdgrow.slice_copy.default, _slice_sample())


def test_opcheck_slice_copy_():
    src, rows, cols, blocks, fills = _slice_sample()
    dst = [torch.empty(3, 4, 2, 2), torch.empty(3), torch.empty(5, 8)]
    torch.library.opcheck(torch.ops.svdgrow.slice_copy_.default, (src, dst, rows, cols, blocks, fills))


def test_fake_shapes_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        S, U, Vh = ops.batched_svd([torch.empty(6, 4), torch.empty(3, 8)], k=2)
        assert [tuple(t.shape) for t in S + U + Vh] == [(2,), (2,), (6, 2), (3, 2), (2, 4), (2, 8)]
        out = ops.slice_copy(*_slice_sample())
        assert [tuple(t.shape) for t in out] == [(3, 4, 2, 2), (3,), (5, 8)]


# ---------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_bad_input(device):
    good = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"mats is an empty list"):
        ops.batched_svd([])
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a 2-D matrix"):
        ops.batched_svd([good, torch.randn(3, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a 2-D matrix"):
        ops.batched_svd([good, torch.randn(2, 3, 4, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        ops.batched_svd([torch.ones(3, 3, dtype=torch.int64, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        ops.batched_svd([good.half()])
    with pytest.raises(RuntimeError, match=r"mats\[1\] is an empty matrix"):
        ops.batched_svd([good, torch.randn(0, 3, device=device)])
    with pytest.raises(RuntimeError, match=r"k must satisfy .*mats\[1\]"):
        ops.batched_svd([good, torch.randn(2, 9, device=device)], k=3)
    with pytest.raises(RuntimeError, match=r"k must satisfy"):
        ops.batched_svd([good], k=0)


def test_batched_svd_nan_input():
    bad = torch.randn(5, 7)
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"mats\[1\] contains NaN or Inf"):
        ops.batched_svd([torch.randn(3, 3), bad])
    with pytest.raises(RuntimeError, match=r"mats\[0\] contains NaN or Inf"):
        ops.batched_svd([torch.full((4, 2), float("inf"))])


def test_batched_svd_mixed_devices():
    with pytest.raises(RuntimeError, match=r"one device"):
        ops.batched_svd([torch.randn(3, 3), torch.randn(3, 3, device="meta")])


@pytest.mark.needs_cuda
def test_batched_svd_mixed_cpu_cuda():
    with pytest.raises(RuntimeError, match=r"device"):
        ops.batched_svd([torch.randn(3, 3), torch.randn(3, 3, device="cuda")])


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_bad_input(device):
    w = torch.randn(4, 3, 3, 3, device=device)
    op = torch.ops.svdgrow.slice_copy.default
    idx = lambda *v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"row_index\[0\] has value 4 .*outside \[-1, 4\)"):
        op([w], [idx(0, 4)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"col_index\[0\] has value -2"):
        op([w], [None], [idx(-2)], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[1\] repeats source rows 2"):
        op([w, w], [None, idx(2, 1, 2)], [None, None], [9, 9], [None, None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] must be an int64 tensor"):
        op([w], [idx(0, 1).int()], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] must be 1-D"):
        op([w], [idx(0, 1).reshape(1, 2)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"block\[0\] = 4 does not fit src\[0\]"):
        op([w], [None], [None], [4], [None])
    with pytest.raises(RuntimeError, match=r"fill\[0\] must have the destination shape"):
        op([w], [idx(0, -1)], [None], [9], [torch.zeros(3, 3, 3, 3, device=device)])
    with pytest.raises(RuntimeError, match=r"row_index has 2 entries but src has 1"):
        op([w], [None, None], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"src\[0\] must be float32, float64, float16 or bfloat16"):
        op([torch.ones(3, dtype=torch.int32, device=device)], [None], [None], [1], [None])
    with pytest.raises(RuntimeError, match=r"col_index\[0\] must be None"):
        op([torch.randn(4, device=device)], [None], [idx(0, 0 - 1)], [1], [None])
    with pytest.raises(ValueError, match=r"block has 2 entries"):
        ops.slice_copy([w], None, None, [9, 9])
    dst = torch.empty(3, 3, 3, 4, device=device)[..., :3]  # right shape, not contiguous
    with pytest.raises(RuntimeError, match=r"dst\[0\] must be contiguous"):
        torch.ops.svdgrow.slice_copy_.default([w], [dst], [idx(0, 1, -1)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"dst\[0\] must have shape"):
        torch.ops.svdgrow.slice_copy_.default([w], [torch.empty(2, 3, 3, 3, device=device)], [idx(0, 1, -1)], [None], [9], [None])


def test_slice_copy_index_on_other_device():
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"row_index\[0\] is on meta"):
        torch.ops.svdgrow.slice_copy.default([w], [torch.zeros(2, dtype=torch.int64, device="meta")], [None], [1], [None])
