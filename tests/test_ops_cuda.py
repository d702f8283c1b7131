"""CUDA kernels (csrc/cuda): batched_svd and slice_copy against float64 CPU references.

Every test needs a GPU (``needs_cuda``) and shows as skipped on a machine without one. SVD
outputs are compared through singular values, reconstructions, orthonormality and projectors,
never raw vectors (sign and order freedom).

Accuracy asked of the CUDA batched_svd (float32 input, vs float64 ``torch.linalg.svd``):
singular values within 1e-4 relative for every sigma >= 1e-3 sigma_max, and the top-k left
subspace within 1e-3 (Frobenius norm of the projector difference) when
sigma_{k+1} <= 0.9 sigma_k. On the randomized path (k given, k + oversample < min(m, n)) that
holds when the spectrum decays past the sketch, as the range finder's error shrinks like
(sigma_{k+oversample+1} / sigma_k) ** (2 * niter + 1); a bare 0.9 gap needs more power
iterations (see test_batched_svd_topk_hard_gap_needs_more_iterations).
"""

import math

import pytest
import torch

import svdgrow  # noqa: F401  (loads the extension: torch.ops.svdgrow.*)
from svdgrow import ops

DEV = "cuda"
svd_op = torch.ops.svdgrow.batched_svd.default
slice_op = torch.ops.svdgrow.slice_copy.default
slice_op_ = torch.ops.svdgrow.slice_copy_.default

# Tolerances per input dtype: sigma relative (for sigma >= 1e-3 sigma_max), sigma absolute /
# sigma_max (all sigma), orthonormality (max |U^T U - I|), relative reconstruction. The same
# as tests/test_ops.py; float64 inputs get the kernel's refinement pass.
TOL = {
    torch.float32: dict(sig=1e-4, sig_abs=2e-6, orth=5e-5, rec=2e-5),
    torch.float64: dict(sig=1e-10, sig_abs=1e-12, orth=1e-10, rec=1e-10),
}


# ------------------------------------------------------------------------------------------------
# helpers


def spectrum_matrix(m, n, sigma, gen, dtype=torch.float64):
    """A (m x n) with the given singular values (len(sigma) <= min(m, n)) and random vectors."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    r = sigma.numel()
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return ((U * sigma) @ V.T).to(dtype)


def projector(U, k):
    Uk = U[:, :k]
    return Uk @ Uk.T


def check_svd(A, S, U, Vh, k=None, what="", **tol_overrides):
    """Checks one CUDA result against float64 torch.linalg.svd of the same (upcast) input."""
    m, n = A.shape
    r = min(m, n) if k is None else k
    tol = {**TOL[A.dtype], **tol_overrides}
    assert S.shape == (r,) and U.shape == (m, r) and Vh.shape == (r, n), what
    assert S.dtype == U.dtype == Vh.dtype == A.dtype, what
    assert S.device == U.device == Vh.device == A.device, what
    assert torch.isfinite(S).all() and torch.isfinite(U).all() and torch.isfinite(Vh).all(), what

    Ad = A.detach().double().cpu()
    Ur, Sr, _ = torch.linalg.svd(Ad, full_matrices=False)
    S, U, Vh = S.double().cpu(), U.double().cpu(), Vh.double().cpu()
    smax = float(Sr[0])

    assert (S[:-1] >= S[1:]).all(), f"{what}: singular values not descending: {S}"
    big = Sr[:r] >= 1e-3 * smax
    if smax > 0 and big.any():
        rel = ((S[:r] - Sr[:r]).abs() / Sr[:r])[big].max().item()
        assert rel <= tol["sig"], f"{what}: sigma relative error {rel:.3g}"
    err = (S[:r] - Sr[:r]).abs().max().item()
    assert err <= tol["sig_abs"] * smax, f"{what}: sigma absolute error {err:.3g} (sigma_max {smax:.3g})"

    eye = torch.eye(r, dtype=torch.float64)
    ou = (U.T @ U - eye).abs().max().item()
    ov = (Vh @ Vh.T - eye).abs().max().item()
    assert ou <= tol["orth"] and ov <= tol["orth"], f"{what}: orthonormality U {ou:.3g}, Vh {ov:.3g}"

    if k is None and smax > 0:
        rec = torch.linalg.norm(Ad - (U * S) @ Vh) / torch.linalg.norm(Ad)
        assert rec <= tol["rec"], f"{what}: reconstruction error {rec:.3g}"

    # Every leading subspace that is well separated (and above the noise floor) must match.
    for j in range(1, min(r, Sr.numel() - 1) + 1):
        if j < Sr.numel() and Sr[j - 1] >= 1e-3 * smax and Sr[j] <= 0.9 * Sr[j - 1]:
            d = torch.linalg.norm(projector(Ur, j) - projector(U, j)).item()
            assert d <= 1e-3, f"{what}: top-{j} left subspace off by {d:.3g}"
    if r == min(m, n):
        return
    # The top-r right subspace too, when separated.
    if Sr[r] <= 0.9 * Sr[r - 1] and Sr[r - 1] >= 1e-3 * smax:
        _, _, Vhr = torch.linalg.svd(Ad, full_matrices=False)
        d = torch.linalg.norm(projector(Vhr.T, r) - projector(Vh.T, r)).item()
        assert d <= 1e-3, f"{what}: top-{r} right subspace off by {d:.3g}"


def awkward_matrices(gen, dtype):
    """(name, matrix) pairs: random, 1 x n, n x 1, rank-deficient, repeated sigmas, scales."""
    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    base = rnd(40, 25)
    wide = rnd(30, 60)
    mats = [
        ("random 20x30", rnd(20, 30)),
        ("random 30x20", rnd(30, 20)),
        ("square 33x33", rnd(33, 33)),
        ("1 x 17", rnd(1, 17)),
        ("17 x 1", rnd(17, 1)),
        ("1 x 1", rnd(1, 1)),
        ("rank 5 of 25x40", rnd(25, 5) @ rnd(5, 40)),
        ("rank 3 of 50x12", rnd(50, 3) @ rnd(3, 12)),
        ("repeated sigmas", spectrum_matrix(30, 50, [3, 3, 3, 2, 2, 1, 1, 1, 0.5, 0.5] + [0.1] * 10, gen)),
        ("graded 1..1e-8", spectrum_matrix(40, 60, torch.logspace(0, -8, 40), gen)),
        ("scale 1e-6", 1e-6 * rnd(16, 24)),
        ("scale 1e6", 1e6 * rnd(24, 16)),
        ("zeros 5x7", torch.zeros(5, 7, dtype=torch.float64)),
        ("one nonzero", torch.zeros(6, 9, dtype=torch.float64).index_put_((torch.tensor([2]), torch.tensor([4])), torch.tensor([3.0], dtype=torch.float64))),
    ]
    out = [(name, a.to(dtype).to(DEV)) for name, a in mats]
    # Non-contiguous inputs: a transposed view and a strided slice.
    out.append(("transposed view", base.to(dtype).to(DEV).t()))
    out.append(("strided slice", wide.to(dtype).to(DEV)[::2, ::3]))
    return out


# ------------------------------------------------------------------------------------------------
# batched_svd


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_awkward_shapes_in_one_call(dtype):
    gen = torch.Generator().manual_seed(1)
    cases = awkward_matrices(gen, dtype)
    S, U, Vh = svd_op([a for _, a in cases], None, 2, 8, 0)
    assert len(S) == len(U) == len(Vh) == len(cases)
    for (name, a), s, u, vh in zip(cases, S, U, Vh):
        check_svd(a, s, u, vh, what=name)
    # Exact zeros stay exact.
    zi = [name for name, _ in cases].index("zeros 5x7")
    assert (S[zi] == 0).all()


@pytest.mark.needs_cuda
def test_batched_svd_mnist_resnet_shapes():
    gen = torch.Generator().manual_seed(2)
    shapes = [(128, 9), (256, 1152), (256, 2304), (128, 2304), (10, 12544)]
    mats = [torch.randn(*s, generator=gen).to(DEV) / math.sqrt(s[1]) for s in shapes]
    # and trained-like ones: a decaying spectrum
    mats += [spectrum_matrix(m, n, 0.9 ** torch.arange(min(m, n)), gen, torch.float32).to(DEV) for m, n in shapes]
    S, U, Vh = svd_op(mats, None, 2, 8, 0)
    for a, s, u, vh in zip(mats, S, U, Vh):
        check_svd(a, s, u, vh, what=f"{tuple(a.shape)}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_topk_randomized(dtype):
    """k well below min(m, n): the randomized path, mixed with an exact problem (l == s)."""
    gen = torch.Generator().manual_seed(3)
    k = 10
    mats = [
        spectrum_matrix(200, 300, 0.7 ** torch.arange(200), gen, dtype),
        spectrum_matrix(300, 120, 0.8 ** torch.arange(120), gen, dtype),
        spectrum_matrix(256, 2304, torch.cat([torch.linspace(10, 6, k), 0.3 * 0.97 ** torch.arange(246)]), gen, dtype),
        spectrum_matrix(10, 12544, torch.linspace(5, 1, 10), gen, dtype),  # k == min(m, n)
        torch.randn(12, 40, generator=gen, dtype=dtype),                   # k + 8 >= 12: exact
    ]
    mats = [a.to(DEV) for a in mats]
    S, U, Vh = svd_op(mats, k, 2, 8, 0)
    for a, s, u, vh in zip(mats, S, U, Vh):
        # Ritz values converge like (sigma_{l+1} / sigma_j) ** (4 niter + 2): 1e-9 is out of
        # reach for the 0.8 ** i spectrum, 1e-4 (the float32 bound) is not.
        loose = {} if dtype == torch.float32 else dict(sig=1e-7, sig_abs=1e-7)
        check_svd(a, s, u, vh, k=k, what=f"{tuple(a.shape)} k={k}", **loose)


@pytest.mark.needs_cuda
def test_batched_svd_topk_hard_gap_needs_more_iterations():
    """sigma_{k+1} = 0.89 sigma_k and a slowly decaying tail: niter=10 meets the 1e-3 bound."""
    gen = torch.Generator().manual_seed(4)
    k = 10
    sigma = torch.cat([torch.linspace(10, 5, k), 0.89 * 5 * 0.95 ** torch.arange(54)])
    a = spectrum_matrix(64, 500, sigma, gen, torch.float32).to(DEV)
    S, U, Vh = svd_op([a], k, 10, 8, 0)
    check_svd(a, S[0], U[0], Vh[0], k=k, what="hard gap, niter=10")
    # Even with the default niter the vectors are orthonormal and sigma is a lower bound.
    S2, U2, Vh2 = svd_op([a], k, 2, 8, 0)
    eye = torch.eye(k, device=DEV)
    assert (U2[0].T @ U2[0] - eye).abs().max() < 5e-5
    assert (Vh2[0] @ Vh2[0].T - eye).abs().max() < 5e-5
    assert (S2[0] <= sigma[:k].to(DEV) * (1 + 1e-5)).all()


@pytest.mark.needs_cuda
def test_batched_svd_topk_rank_deficient():
    """Rank 6 < k = 10 < l: null directions completed to an orthonormal set."""
    gen = torch.Generator().manual_seed(5)
    a = (torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 250, generator=gen, dtype=torch.float64)).float().to(DEV)
    S, U, Vh = svd_op([a], 10, 2, 8, 0)
    check_svd(a, S[0], U[0], Vh[0], k=10, what="rank 6, k=10")
    assert S[0][6:].max() <= 1e-5 * S[0][0]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [None, 8])
def test_batched_svd_matches_cpu_op(k):
    gen = torch.Generator().manual_seed(6)
    shapes = [(128, 9), (64, 300), (300, 64), (10, 500), (1, 40)]
    mats = [spectrum_matrix(m, n, 0.6 ** torch.arange(min(m, n)), gen, torch.float32) for m, n in shapes]
    if k is not None:
        mats = [a for a in mats if min(a.shape) >= k]
    S_c, U_c, _ = svd_op(mats, k, 2, 8, 0)
    S_g, U_g, Vh_g = svd_op([a.to(DEV) for a in mats], k, 2, 8, 0)
    for a, sc, uc, sg, ug in zip(mats, S_c, U_c, S_g, U_g):
        assert sg.device.type == "cuda" and sc.device.type == "cpu"
        torch.testing.assert_close(sg.cpu().double(), sc.double(), rtol=1e-4, atol=1e-6 * float(sc[0]))
        r = sc.numel()
        j = min(r, 5)  # spectrum 0.6**i: every leading subspace is well separated
        d = torch.linalg.norm(projector(uc.double(), j) - projector(ug.cpu().double(), j))
        assert d <= 1e-3, f"{tuple(a.shape)}: CPU and CUDA top-{j} subspaces differ by {d:.3g}"


@pytest.mark.needs_cuda
def test_batched_svd_deterministic_and_seeded():
    gen = torch.Generator().manual_seed(7)
    mats = [torch.randn(100, 300, generator=gen).to(DEV), torch.randn(50, 20, generator=gen).to(DEV)]
    r1 = svd_op(mats, 5, 2, 8, 123)
    r2 = svd_op(mats, 5, 2, 8, 123)
    for l1, l2 in zip(r1, r2):
        for x, y in zip(l1, l2):
            assert torch.equal(x, y)
    # Another seed: another sketch, the same accuracy.
    S3, U3, Vh3 = svd_op(mats, 5, 2, 8, 99)
    for a, s, u, vh in zip(mats, S3, U3, Vh3):
        assert (u.T @ u - torch.eye(5, device=DEV)).abs().max() < 5e-5
        assert (s <= torch.linalg.svdvals(a.double()).float()[:5] * (1 + 1e-5)).all()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [None, 6])
def test_batched_svd_cuda_graph_capture(k):
    """No host synchronisation inside the op: it captures, and replays on new data."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(128, 9), (64, 300), (300, 64), (10, 500), (40, 40)]
    static = [torch.randn(*s, generator=gen).to(DEV) for s in shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            svd_op(static, k, 2, 8, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S, U, Vh = svd_op(static, k, 2, 8, 0)

    for trial in range(2):
        new = [torch.randn(*s, generator=gen).to(DEV) for s in shapes]
        for st, nw in zip(static, new):
            st.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        S_e, U_e, Vh_e = svd_op(new, k, 2, 8, 0)
        for i in range(len(shapes)):
            assert torch.equal(S[i], S_e[i]), f"replay {trial}: S[{i}] differs from an eager call"
            assert torch.equal(U[i], U_e[i]), f"replay {trial}: U[{i}] differs from an eager call"
            assert torch.equal(Vh[i], Vh_e[i]), f"replay {trial}: Vh[{i}] differs from an eager call"
            if k is None:
                check_svd(new[i], S[i], U[i], Vh[i], what=f"graph replay {shapes[i]}")


@pytest.mark.needs_cuda
def test_batched_svd_bad_inputs():
    a = torch.randn(5, 7, device=DEV)
    with pytest.raises((RuntimeError, NotImplementedError)):
        svd_op([], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a 2-D matrix"):
        svd_op([a, torch.randn(5, device=DEV)], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be float32 or float64"):
        svd_op([a, torch.ones(3, 4, dtype=torch.int64, device=DEV)], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        svd_op([a.half()], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"one device"):
        svd_op([a, torch.randn(3, 4)], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"0 < k <= min\(m, n\)"):
        svd_op([a], 0, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"mats\[1\] has shape"):
        svd_op([a, torch.randn(3, 40, device=DEV)], 4, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"niter must be >= 0"):
        svd_op([a], 2, -1, 8, 0)
    with pytest.raises(RuntimeError, match=r"oversample must be >= 0"):
        svd_op([a], 2, 2, -1, 0)
    with pytest.raises(RuntimeError, match=r"empty matrix"):
        svd_op([torch.zeros(0, 4, device=DEV)], None, 2, 8, 0)


@pytest.mark.needs_cuda
def test_batched_svd_wrapper_on_cuda():
    gen = torch.Generator().manual_seed(9)
    a = spectrum_matrix(30, 70, 0.5 ** torch.arange(30), gen, torch.float32).to(DEV)
    S, U, Vh = ops.batched_svd([a, a.t()], k=4)
    for m, s, u, vh in zip([a, a.t()], S, U, Vh):
        check_svd(m, s, u, vh, k=4, what="wrapper")


# ------------------------------------------------------------------------------------------------
# slice_copy


def ref_slice_copy(src, row, col, block, fill):
    """Python reference: src viewed as [R, C, B]; -1 takes fill (or zero)."""
    R = src.shape[0]
    C = src.numel() // (R * block)
    s3 = src.reshape(R, C, block)
    rows = row if row is not None else torch.arange(R, device=src.device)
    cols = col if col is not None else torch.arange(C, device=src.device)
    Rn, Cn = rows.numel(), cols.numel()
    shape = list(src.shape)
    shape[0] = Rn
    if src.dim() >= 2:
        shape[1] = src.shape[1] // C * Cn
    out = fill.reshape(Rn, Cn, block).clone() if fill is not None else torch.zeros(Rn, Cn, block, dtype=src.dtype, device=src.device)
    take = (rows >= 0)[:, None] & (cols >= 0)[None, :]
    picked = s3[rows.clamp(min=0)][:, cols.clamp(min=0)]
    out[take] = picked[take]
    return out.reshape(shape)


def index(kept, n_new, device=None):
    return ops.make_index(torch.as_tensor(kept, dtype=torch.int64), n_new, device=device or DEV)


def slice_cases(gen, device=None):
    """(src, row_index, col_index, block, fill) for weights, biases and optimizer state."""
    device = device or DEV
    def rnd(*s, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(dtype).to(device)

    conv = rnd(12, 8, 3, 3)
    conv_rows = index([3, 0, 7, 11, 5], 2, device)           # prune to 5, grow by 2
    conv_cols = index([1, 2, 4, 6, 7], 1, device)
    fill_conv = rnd(7, 6, 3, 3)
    lin_flat = rnd(5, 6 * 16, dtype=torch.float64)          # Linear after Flatten, h*w = 16
    lin_cols = index([5, 0, 2], 3, device)
    bias = rnd(12, dtype=torch.float16)
    bn_var = rnd(12, dtype=torch.bfloat16).abs()
    bn_fill = torch.ones(7, dtype=torch.bfloat16, device=device)
    plain = rnd(7, 12)
    plain_view = rnd(12, 7).t()                                # non-contiguous
    plain_rows = index([6, 5, 4, 3, 2, 1, 0], 0, device)
    plain_cols = index([11, 10, 0, -1, 3], 0, device)
    momentum = rnd(12, 8, 3, 3, dtype=torch.float16)
    return [
        (conv, conv_rows, conv_cols, 9, fill_conv),
        (conv.clone(), conv_rows, None, 9, None),
        (lin_flat, None, lin_cols, 16, None),
        (bias, conv_rows, None, 1, None),
        (bn_var, conv_rows, None, 1, bn_fill),
        (plain, plain_rows, plain_cols, 1, None),
        (plain_view, None, plain_cols, 1, None),
        (momentum, conv_rows, conv_cols, 9, None),
    ]


@pytest.mark.needs_cuda
def test_slice_copy_matches_reference_mixed_dtypes_one_call():
    gen = torch.Generator().manual_seed(10)
    cases = slice_cases(gen)
    out = slice_op(*[list(x) for x in zip(*cases)])
    assert len(out) == len(cases)
    for i, ((src, row, col, block, fill), got) in enumerate(zip(cases, out)):
        want = ref_slice_copy(src, row, col, block, fill)
        assert got.shape == want.shape and got.dtype == src.dtype and got.device == src.device, i
        assert got.is_contiguous()
        assert torch.equal(got, want), f"case {i}"


@pytest.mark.needs_cuda
def test_slice_copy_matches_cpu_op():
    gen = torch.Generator().manual_seed(11)
    cases = slice_cases(gen)
    cpu_cases = [
        (s.cpu(), None if r is None else r.cpu(), None if c is None else c.cpu(), b, None if f is None else f.cpu())
        for s, r, c, b, f in cases
    ]
    got = slice_op(*[list(x) for x in zip(*cases)])
    want = slice_op(*[list(x) for x in zip(*cpu_cases)])
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g.cpu(), w), f"case {i}"


@pytest.mark.needs_cuda
def test_slice_copy_inplace_into_views_of_one_buffer():
    gen = torch.Generator().manual_seed(12)
    cases = [c for c in slice_cases(gen) if c[0].dtype == torch.float32]
    wants = [ref_slice_copy(*c) for c in cases]
    total = sum(w.numel() for w in wants)
    buf = torch.full((total + 5,), float("nan"), device=DEV)
    dsts, off = [], 3
    for w in wants:
        dsts.append(buf[off:off + w.numel()].view(w.shape))
        off += w.numel()
    src, row, col, block, fill = (list(x) for x in zip(*cases))
    assert slice_op_(src, dsts, row, col, block, fill) is None
    for i, (d, w) in enumerate(zip(dsts, wants)):
        assert torch.equal(d, w), f"case {i}"
    assert buf[:3].isnan().all() and buf[off:].isnan().all()


@pytest.mark.needs_cuda
def test_slice_copy_inplace_overlapping_source():
    """Shrinking rows within the same storage: the source is read from a copy."""
    gen = torch.Generator().manual_seed(13)
    storage = torch.randn(10 * 6, generator=gen).to(DEV)
    src = storage.view(10, 6)
    rows = index([9, 3, 0, 5], 1)
    want = ref_slice_copy(src.clone(), rows, None, 1, None)
    dst = storage[: 5 * 6].view(5, 6)
    slice_op_([src], [dst], [rows], [None], [1], [None])
    assert torch.equal(dst, want)


@pytest.mark.needs_cuda
def test_slice_copy_wrapper_groups_by_dtype():
    gen = torch.Generator().manual_seed(14)
    cases = slice_cases(gen)
    src, row, col, block, fill = (list(x) for x in zip(*cases))
    out = ops.slice_copy(src, row, col, block, fill)
    for i, (c, got) in enumerate(zip(cases, out)):
        assert torch.equal(got, ref_slice_copy(*c)), f"case {i}"


@pytest.mark.needs_cuda
def test_slice_copy_large_tensor_grid_stride():
    gen = torch.Generator().manual_seed(15)
    src = torch.randn(512, 256, 3, 3, generator=gen).to(DEV)
    rows = index(torch.randperm(512, generator=gen)[:400], 100)
    cols = index(torch.randperm(256, generator=gen)[:200], 56)
    (got,) = slice_op([src], [rows], [cols], [9], [None])
    assert torch.equal(got, ref_slice_copy(src, rows, cols, 9, None))


@pytest.mark.needs_cuda
def test_slice_copy_bad_inputs():
    w = torch.randn(6, 4, 3, 3, device=DEV)
    ok_rows = index([0, 1], 1)
    with pytest.raises(RuntimeError, match=r"row_index\[0\] has value 6 at position 1, outside \[-1, 6\)"):
        slice_op([w], [index([0, 6], 0)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"col_index\[0\] has value -2"):
        slice_op([w], [None], [torch.tensor([0, -2], device=DEV)], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] repeats source rows 2"):
        slice_op([w], [index([2, 1, 2], 0)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] must be an int64 tensor"):
        slice_op([w], [torch.tensor([0, 1], dtype=torch.int32, device=DEV)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] is on cpu"):
        slice_op([w], [index([0, 1], 0, device="cpu")], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"block\[0\] = 5 does not fit"):
        slice_op([w], [ok_rows], [None], [5], [None])
    with pytest.raises(RuntimeError, match=r"fill\[0\] must have the destination shape"):
        slice_op([w], [ok_rows], [None], [9], [torch.zeros(2, 4, 3, 3, device=DEV)])
    with pytest.raises(RuntimeError, match=r"fill\[0\] has dtype"):
        slice_op([w], [ok_rows], [None], [9], [torch.zeros(3, 4, 3, 3, device=DEV, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"dst\[0\] must have shape"):
        slice_op_([w], [torch.empty(2, 4, 3, 3, device=DEV)], [ok_rows], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"dst\[0\] must be contiguous"):
        slice_op_([w], [torch.empty(3, 3, 3, 4, device=DEV).permute(0, 3, 1, 2)], [ok_rows], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"one device"):
        slice_op([w, torch.randn(3)], [None, None], [None, None], [9, 1], [None, None])
    with pytest.raises(RuntimeError, match=r"must be float32, float64, float16 or bfloat16"):
        slice_op([torch.ones(3, 2, dtype=torch.int64, device=DEV)], [None], [None], [1], [None])
    # Nothing was written by a failing call: a destination keeps its contents.
    dst = torch.full((3, 4, 3, 3), 7.0, device=DEV)
    with pytest.raises(RuntimeError):
        slice_op_([w], [dst], [index([0, 6], 1)], [None], [9], [None])
    assert (dst == 7).all()
