"""Tests of the svdgrow operators (``svdgrow.ops``) on every device, against float64 references.

One file for both kernels: tests take a ``device`` parameter (``cpu``, and ``cuda`` marked
``needs_cuda``, skipped and reported where no GPU is); tests of CUDA-only behaviour (the
randomized range finder, CUDA graphs, CPU-vs-CUDA agreement) carry ``needs_cuda`` themselves.
References and tolerances: tests/svd_checks.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from svd_checks import (
    MATRIX_KINDS,
    TOL,
    check_projectors,
    check_svd,
    make_matrix,
    non_contiguous,
    projector,
    ref_slice_copy,
    spectrum_matrix,
)
from svdgrow import ops

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda),
]
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
svd_op = torch.ops.svdgrow.batched_svd.default
slice_op = torch.ops.svdgrow.slice_copy.default
slice_op_ = torch.ops.svdgrow.slice_copy_.default


def _other_device(device: str) -> str:
    """A device that is not ``device``, for the one-device checks."""
    return "meta" if device == "cpu" else "cpu"


# ---------------------------------------------------------------------------------------------
# batched_svd: property tests
# ---------------------------------------------------------------------------------------------

matrix_specs = st.tuples(
    st.sampled_from(
        [(1, 1), (1, 17), (17, 1), (5, 5), (3, 40), (40, 3), (16, 48), (48, 16), (64, 9)]
    )
    | st.tuples(st.integers(1, 48), st.integers(1, 48)),
    st.sampled_from(MATRIX_KINDS),
    st.sampled_from([1.0, 1e-6, 1e6]),
    st.integers(0, 2**31 - 1),
    st.sampled_from([None, 0, 1]),  # contiguous / column-major / strided
)


def _materialise_specs(specs, device, dtype):
    mats = []
    for (m, n), kind, scale, seed, layout in specs:
        a = make_matrix(m, n, kind, scale, seed).to(device=device, dtype=dtype)
        mats.append(a if layout is None else non_contiguous(a, layout))
    return mats


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    specs=st.lists(matrix_specs, min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_batched_svd_full(device, specs, dtype):
    mats = _materialise_specs(specs, device, dtype)
    before = [a.clone() for a in mats]
    S, U, Vh = ops.batched_svd(mats)
    assert len(S) == len(U) == len(Vh) == len(mats)
    for a, b, s, u, vh in zip(mats, before, S, U, Vh, strict=True):
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
    mats = _materialise_specs(specs, device, dtype)
    pmin = min(min(a.shape) for a in mats)
    k = max(1, min(pmin, int(round(frac * pmin))))
    S, U, Vh = ops.batched_svd(mats, k=k)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, k=k)
        check_projectors(a, u, vh, k)


# Issue 9, item 2: U and Vh orthonormal for rank-deficient, zero, duplicated-sigma and
# tiny / huge inputs, thin and top-k. The @example cases are the reported failures.
DEFICIENT_KINDS = ["constant", "zero_rows", "zero", "lowrank", "repeated", "duplicated_rows"]
SCALES = {
    torch.float32: [1.0, 1e-30, 1e30],
    torch.float64: [1.0, 1e-160, 1e-300, 1e150, 1e300],
}


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(40, 40), (244, 8), (8, 244), (1, 1), (64, 3), (30, 20)])
    | st.tuples(st.integers(1, 64), st.integers(1, 64)),
    kind=st.sampled_from(DEFICIENT_KINDS + ["gauss"]),
    scale_i=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    frac=st.sampled_from([None, 0.25, 0.75, 1.0]),
)
@example(shape=(40, 40), kind="constant", scale_i=0, seed=0, dtype=torch.float64, frac=None)
@example(shape=(244, 8), kind="constant", scale_i=0, seed=0, dtype=torch.float32, frac=0.75)
@example(shape=(30, 20), kind="gauss", scale_i=1, seed=0, dtype=torch.float64, frac=None)
def test_batched_svd_orthonormal_rank_deficient_and_scaled(
    device, shape, kind, scale_i, seed, dtype, frac
):
    m, n = shape
    scale = SCALES[dtype][scale_i % len(SCALES[dtype])]
    a = make_matrix(m, n, kind, scale, seed).to(device=device, dtype=dtype)
    k = None if frac is None else max(1, round(frac * min(m, n)))
    S, U, Vh = ops.batched_svd([a], k=k)
    check_svd(a, S[0], U[0], Vh[0], k=k, what=f"{kind} {m}x{n} * {scale:g}, k={k}")


_MANY_SMALL_SVDS = """
import sys, torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
mats = [torch.ones(40, 263), torch.ones(40, 263)]
for i in range(80):
    m, n = int(torch.randint(2, 64, (1,), generator=gen)), int(torch.randint(2, 300, (1,), generator=gen))
    a = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
    a[: m // 3] = 0
    mats.append(a.double() if i % 2 else a)
S, U, Vh = torch.ops.svdgrow.batched_svd.default(mats, None, 2, 8, 0)
print("done", len(S))
"""


def test_batched_svd_two_threads_does_not_hang():
    """Issue 9, item 1: on 2 threads the op hung in MKL's QR inside at::parallel_for."""
    lib = sys.modules["svdgrow._C"].__file__  # the kernels under test (loaded by svdgrow.ops)
    cmd = [sys.executable, "-c", _MANY_SMALL_SVDS, lib]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("batched_svd on 2 threads did not finish in 60 s (deadlock)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["done", "82"]


# ---------------------------------------------------------------------------------------------
# batched_svd: fixed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_topk_subspace_with_gap(device):
    # sigma_{k+1} = 0.9 sigma_k exactly at the boundary, slowly decaying on both sides.
    k = 12
    mats = []
    for i, (m, n) in enumerate([(64, 576), (300, 40), (128, 128)]):
        p = min(m, n)
        s = torch.cat([torch.linspace(10, 5, k), torch.linspace(4.5, 0.1, p - k)]).double()
        gen = torch.Generator().manual_seed(i)
        mats.append(spectrum_matrix(m, n, s, gen, torch.float32).to(device))
    S, U, Vh = ops.batched_svd(mats, k=k)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, k=k)
        check_projectors(a, u, vh, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_layer_shapes(device, dtype):
    """Layer-like shapes (conv weights as out x in*9, a head), full and top-k."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(128, 9), (128, 1152), (64, 576), (10, 3136), (300, 20)]
    mats = [
        (torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[1])).to(device, dtype)
        for s in shapes
    ]
    S, U, Vh = ops.batched_svd(mats)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh)
    S, U, Vh = ops.batched_svd(mats, k=3)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, k=3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_special_matrices(device):
    mats = [
        torch.zeros(7, 5),  # all zero
        torch.eye(6),  # all sigma equal
        torch.ones(4, 9),  # rank one
        torch.full((1, 1), -2.0),  # 1 x 1, negative
        torch.randn(1, 30),  # a row
        torch.randn(30, 1),  # a column
    ]
    mats = [a.to(device) for a in mats]
    S, U, Vh = ops.batched_svd(mats)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh)
    assert float(S[3][0]) == pytest.approx(2.0)


def _awkward_matrices(gen, dtype, device):
    """(name, matrix) pairs: random, 1 x n, n x 1, rank-deficient, repeated sigmas, scales."""

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    base = rnd(40, 25)
    wide = rnd(30, 60)
    one_nonzero = torch.zeros(6, 9, dtype=torch.float64)
    one_nonzero[2, 4] = 3.0
    repeated = [3, 3, 3, 2, 2, 1, 1, 1, 0.5, 0.5] + [0.1] * 10
    mats = [
        ("random 20x30", rnd(20, 30)),
        ("random 30x20", rnd(30, 20)),
        ("square 33x33", rnd(33, 33)),
        ("1 x 17", rnd(1, 17)),
        ("17 x 1", rnd(17, 1)),
        ("1 x 1", rnd(1, 1)),
        ("rank 5 of 25x40", rnd(25, 5) @ rnd(5, 40)),
        ("rank 3 of 50x12", rnd(50, 3) @ rnd(3, 12)),
        ("repeated sigmas", spectrum_matrix(30, 50, repeated, gen)),
        ("graded 1..1e-8", spectrum_matrix(40, 60, torch.logspace(0, -8, 40), gen)),
        ("scale 1e-6", 1e-6 * rnd(16, 24)),
        ("scale 1e6", 1e6 * rnd(24, 16)),
        ("zeros 5x7", torch.zeros(5, 7, dtype=torch.float64)),
        ("one nonzero", one_nonzero),
    ]
    out = [(name, a.to(dtype).to(device)) for name, a in mats]
    # Non-contiguous inputs: a transposed view and a strided slice.
    out.append(("transposed view", base.to(dtype).to(device).t()))
    out.append(("strided slice", wide.to(dtype).to(device)[::2, ::3]))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_awkward_shapes_in_one_call(device, dtype):
    gen = torch.Generator().manual_seed(1)
    cases = _awkward_matrices(gen, dtype, device)
    S, U, Vh = svd_op([a for _, a in cases], None, 2, 8, 0)
    assert len(S) == len(U) == len(Vh) == len(cases)
    for (name, a), s, u, vh in zip(cases, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, what=name)
    # Exact zeros stay exact.
    zi = [name for name, _ in cases].index("zeros 5x7")
    assert (S[zi] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_mnist_resnet_shapes(device):
    gen = torch.Generator().manual_seed(2)
    shapes = [(128, 9), (256, 1152), (256, 2304), (128, 2304), (10, 12544)]
    mats = [torch.randn(*s, generator=gen).to(device) / math.sqrt(s[1]) for s in shapes]
    # and trained-like ones: a decaying spectrum
    mats += [
        spectrum_matrix(m, n, 0.9 ** torch.arange(min(m, n)), gen, torch.float32).to(device)
        for m, n in shapes
    ]
    S, U, Vh = svd_op(mats, None, 2, 8, 0)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, what=f"{tuple(a.shape)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_topk_randomized(device, dtype):
    """k well below min(m, n): on CUDA the randomized path, mixed with an exact problem."""
    gen = torch.Generator().manual_seed(3)
    k = 10
    tail = torch.cat([torch.linspace(10, 6, k), 0.3 * 0.97 ** torch.arange(246)])
    mats = [
        spectrum_matrix(200, 300, 0.7 ** torch.arange(200), gen, dtype),
        spectrum_matrix(300, 120, 0.8 ** torch.arange(120), gen, dtype),
        spectrum_matrix(256, 2304, tail, gen, dtype),
        spectrum_matrix(10, 12544, torch.linspace(5, 1, 10), gen, dtype),  # k == min(m, n)
        torch.randn(12, 40, generator=gen, dtype=dtype),  # k + 8 >= 12: exact
    ]
    mats = [a.to(device) for a in mats]
    S, U, Vh = svd_op(mats, k, 2, 8, 0)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        # Ritz values converge like (sigma_{l+1} / sigma_j) ** (4 niter + 2): 1e-9 is out of
        # reach for the 0.8 ** i spectrum, 1e-4 (the float32 bound) is not.
        loose = {} if dtype == torch.float32 else dict(sig_rel=1e-7, sig_abs=1e-7)
        check_svd(a, s, u, vh, k=k, what=f"{tuple(a.shape)} k={k}", **loose)


@pytest.mark.needs_cuda
def test_batched_svd_topk_hard_gap_needs_more_iterations():
    """CUDA range finder: sigma_{k+1} = 0.89 sigma_k and a slow tail; niter=10 meets 1e-3."""
    gen = torch.Generator().manual_seed(4)
    k = 10
    sigma = torch.cat([torch.linspace(10, 5, k), 0.89 * 5 * 0.95 ** torch.arange(54)])
    a = spectrum_matrix(64, 500, sigma, gen, torch.float32).to("cuda")
    S, U, Vh = svd_op([a], k, 10, 8, 0)
    check_svd(a, S[0], U[0], Vh[0], k=k, what="hard gap, niter=10")
    # Even with the default niter the vectors are orthonormal and sigma is a lower bound.
    S2, U2, Vh2 = svd_op([a], k, 2, 8, 0)
    eye = torch.eye(k, device="cuda")
    assert (U2[0].T @ U2[0] - eye).abs().max() < TOL[torch.float32]["orth"]
    assert (Vh2[0] @ Vh2[0].T - eye).abs().max() < TOL[torch.float32]["orth"]
    assert (S2[0] <= sigma[:k].to("cuda") * (1 + 1e-5)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_topk_rank_deficient(device):
    """Rank 6 < k = 10: null directions completed to an orthonormal set."""
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    a = (left @ torch.randn(6, 250, generator=gen, dtype=torch.float64)).float().to(device)
    S, U, Vh = svd_op([a], 10, 2, 8, 0)
    check_svd(a, S[0], U[0], Vh[0], k=10, what="rank 6, k=10")
    assert S[0][6:].max() <= 1e-5 * S[0][0]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [None, 8])
def test_batched_svd_matches_cpu_op(k):
    gen = torch.Generator().manual_seed(6)
    shapes = [(128, 9), (64, 300), (300, 64), (10, 500), (1, 40)]
    mats = [
        spectrum_matrix(m, n, 0.6 ** torch.arange(min(m, n)), gen, torch.float32) for m, n in shapes
    ]
    if k is not None:
        mats = [a for a in mats if min(a.shape) >= k]
    S_c, U_c, _ = svd_op(mats, k, 2, 8, 0)
    S_g, U_g, Vh_g = svd_op([a.to("cuda") for a in mats], k, 2, 8, 0)
    for a, sc, uc, sg, ug in zip(mats, S_c, U_c, S_g, U_g, strict=True):
        assert sg.device.type == "cuda" and sc.device.type == "cpu"
        torch.testing.assert_close(
            sg.cpu().double(), sc.double(), rtol=1e-4, atol=1e-6 * float(sc[0])
        )
        j = min(sc.numel(), 5)  # spectrum 0.6**i: every leading subspace is well separated
        d = torch.linalg.norm(projector(uc.double(), j) - projector(ug.cpu().double(), j))
        assert d <= 1e-3, f"{tuple(a.shape)}: CPU and CUDA top-{j} subspaces differ by {d:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_deterministic(device):
    mats = [
        make_matrix(20, 30, "zero_rows", 1.0, 3).float().to(device),
        torch.randn(8, 3, device=device),
    ]
    first = ops.batched_svd(mats, seed=5)
    second = ops.batched_svd(mats, seed=5)
    for xs, ys in zip(first, second, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_deterministic_and_seeded(device):
    gen = torch.Generator().manual_seed(7)
    mats = [
        torch.randn(100, 300, generator=gen).to(device),
        torch.randn(50, 20, generator=gen).to(device),
    ]
    r1 = svd_op(mats, 5, 2, 8, 123)
    r2 = svd_op(mats, 5, 2, 8, 123)
    for l1, l2 in zip(r1, r2, strict=True):
        for x, y in zip(l1, l2, strict=True):
            assert torch.equal(x, y)
    # Another seed: (on CUDA another sketch) the same accuracy.
    S3, U3, Vh3 = svd_op(mats, 5, 2, 8, 99)
    for a, s, u in zip(mats, S3, U3, strict=True):
        assert (u.T @ u - torch.eye(5, device=device)).abs().max() < TOL[torch.float32]["orth"]
        assert (s <= torch.linalg.svdvals(a.double()).float()[:5] * (1 + 1e-5)).all()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [None, 6])
def test_batched_svd_cuda_graph_capture(k):
    """No host synchronisation inside the op: it captures, and replays on new data."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(128, 9), (64, 300), (300, 64), (10, 500), (40, 40)]
    static = [torch.randn(*s, generator=gen).to("cuda") for s in shapes]
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
        new = [torch.randn(*s, generator=gen).to("cuda") for s in shapes]
        for st_, nw in zip(static, new, strict=True):
            st_.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        S_e, U_e, Vh_e = svd_op(new, k, 2, 8, 0)
        for i in range(len(shapes)):
            assert torch.equal(S[i], S_e[i]), f"replay {trial}: S[{i}] differs from an eager call"
            assert torch.equal(U[i], U_e[i]), f"replay {trial}: U[{i}] differs from an eager call"
            assert torch.equal(Vh[i], Vh_e[i]), (
                f"replay {trial}: Vh[{i}] differs from an eager call"
            )
            if k is None:
                check_svd(new[i], S[i], U[i], Vh[i], what=f"graph replay {shapes[i]}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [None, 3])
def test_batched_svd_cuda_records_no_host_sync(k):
    """``torch.cuda.set_sync_debug_mode("error")`` around the call: any host synchronisation
    (a ``.item()``, a blocking copy, a NaN check read on the host) raises."""
    gen = torch.Generator().manual_seed(12)
    mats = [torch.randn(*s, generator=gen).to("cuda") for s in [(16, 48), (64, 9), (33, 33)]]
    ops.batched_svd(mats, k)  # warm-up: module load and handle creation may synchronise
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S, U, Vh = ops.batched_svd(mats, k)
    finally:
        torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        if k is None:
            check_svd(a, s, u, vh, what=f"no-sync call {tuple(a.shape)}")
        else:
            assert s.shape == (k,), tuple(a.shape)
            want = torch.linalg.svdvals(a.double())[:k].float()
            assert torch.allclose(s, want, rtol=1e-3, atol=0), tuple(a.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_wrapper(device):
    gen = torch.Generator().manual_seed(9)
    a = spectrum_matrix(30, 70, 0.5 ** torch.arange(30), gen, torch.float32).to(device)
    S, U, Vh = ops.batched_svd([a, a.t()], k=4)
    for m, s, u, vh in zip([a, a.t()], S, U, Vh, strict=True):
        check_svd(m, s, u, vh, k=4, what="wrapper")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_topk_flat_spectrum(device, dtype):
    """Issue 13: top-k of flat spectra (Gaussian matrices, sigma_{k+1} ~ sigma_k) meets the
    documented accuracy by default (the exact path, truncated). With ``randomized=True`` the
    CUDA range finder promises less there: orthonormal vectors and sigma that do not exceed
    the true ones."""
    gen = torch.Generator().manual_seed(13)
    k = 16
    mats = [torch.randn(*s, generator=gen, dtype=dtype).to(device) for s in
            [(128, 1152), (256, 256), (300, 90), (64, 576)]]  # fmt: skip
    S, U, Vh = ops.batched_svd(mats, k)
    for a, s, u, vh in zip(mats, S, U, Vh, strict=True):
        check_svd(a, s, u, vh, k=k, what=f"flat {tuple(a.shape)}")
    S2, U2, Vh2 = ops.batched_svd(mats, k, randomized=True)
    eye = torch.eye(k, dtype=dtype, device=device)
    for a, s, u, vh in zip(mats, S2, U2, Vh2, strict=True):
        assert (u.T @ u - eye).abs().max() < TOL[dtype]["orth"], tuple(a.shape)
        assert (vh @ vh.T - eye).abs().max() < TOL[dtype]["orth"], tuple(a.shape)
        true = torch.linalg.svdvals(a.double().cpu())[:k]
        assert (s.double().cpu() <= true * (1 + 1e-5)).all(), tuple(a.shape)


def test_batched_svd_wrapper_asks_for_the_exact_path_unless_randomized(monkeypatch):
    """The wrapper reaches the exact path by oversampling to min(m, n) (``l == s``)."""
    seen = []
    real = torch.ops.svdgrow.batched_svd.default

    def spy(mats, k, niter, oversample, seed):
        seen.append(oversample)
        return real(mats, k, niter, oversample, seed)

    monkeypatch.setattr(torch.ops.svdgrow.batched_svd, "default", spy)
    mats = [torch.randn(40, 70), torch.randn(90, 30)]
    ops.batched_svd(mats, 4)
    ops.batched_svd(mats, 4, randomized=True)
    ops.batched_svd(mats)
    assert seen == [40, 8, 8]


# ---------------------------------------------------------------------------------------------
# batched_svd: bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_bad_input(device):
    good = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"mats is an empty list"):
        ops.batched_svd([])
    with pytest.raises((RuntimeError, NotImplementedError)):
        svd_op([], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a 2-D matrix"):
        ops.batched_svd([good, torch.randn(3, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a 2-D matrix"):
        ops.batched_svd([good, torch.randn(2, 3, 4, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        ops.batched_svd([torch.ones(3, 3, dtype=torch.int64, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be float32 or float64"):
        ops.batched_svd([good, torch.ones(3, 4, dtype=torch.int64, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        ops.batched_svd([good.half()])
    with pytest.raises(RuntimeError, match=r"mats\[1\] is an empty matrix"):
        ops.batched_svd([good, torch.randn(0, 3, device=device)])
    with pytest.raises(RuntimeError, match=r"empty matrix"):
        svd_op([torch.zeros(0, 4, device=device)], None, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"k must satisfy .*mats\[1\]"):
        ops.batched_svd([good, torch.randn(2, 9, device=device)], k=3)
    with pytest.raises(RuntimeError, match=r"mats\[1\] has shape"):
        svd_op([good, torch.randn(3, 40, device=device)], 4, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"k must satisfy"):
        ops.batched_svd([good], k=0)
    with pytest.raises(RuntimeError, match=r"0 < k <= min\(m, n\)"):
        svd_op([good], 0, 2, 8, 0)
    with pytest.raises(RuntimeError, match=r"niter must be >= 0"):
        svd_op([good], 2, -1, 8, 0)
    with pytest.raises(RuntimeError, match=r"oversample must be >= 0"):
        svd_op([good], 2, 2, -1, 0)
    with pytest.raises(RuntimeError, match=r"one device"):
        ops.batched_svd([good, torch.randn(3, 4, device=_other_device(device))])


def test_batched_svd_nan_input():
    bad = torch.randn(5, 7)
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"mats\[1\] contains NaN or Inf"):
        ops.batched_svd([torch.randn(3, 3), bad])
    with pytest.raises(RuntimeError, match=r"mats\[0\] contains NaN or Inf"):
        ops.batched_svd([torch.full((4, 2), float("inf"))])


@pytest.mark.needs_cuda
def test_batched_svd_mixed_cpu_cuda():
    with pytest.raises(RuntimeError, match=r"device"):
        ops.batched_svd([torch.randn(3, 3), torch.randn(3, 3, device="cuda")])


# ---------------------------------------------------------------------------------------------
# slice_copy: property tests against plain indexing
# ---------------------------------------------------------------------------------------------


def _random_index(perm: torch.Tensor, n_keep: int, n_new: int, gen: torch.Generator):
    idx = ops.make_index(perm[:n_keep], n_new)
    return idx[torch.randperm(idx.numel(), generator=gen)]


@st.composite
def slice_case(draw):
    """One tensor of a random layer kind with random row/col indices and fill."""
    kind = draw(st.sampled_from(["conv", "linear", "bias", "flatten"]))
    O = draw(st.integers(1, 12))  # noqa: E741
    I = draw(st.integers(1, 10))  # noqa: E741
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
    return dict(
        shape=shape,
        block=block,
        row=row,
        col=col,
        fill=draw(st.booleans()),
        seed=seed,
        noncontig=draw(st.booleans()),
    )


def _materialise(case, device, dtype):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    if case["noncontig"] and len(shape) >= 2:
        src = torch.randn(tuple(reversed(shape)), generator=gen)
        src = src.permute(*reversed(range(len(shape))))
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
    src, rows, cols, fills = (list(x) for x in zip(*tensors, strict=True))
    blocks = [c["block"] for c in cases]
    out = ops.slice_copy(src, rows, cols, blocks, fills)
    for s, r, c, b, f, o in zip(src, rows, cols, blocks, fills, out, strict=True):
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
    src, rows, cols, fills = (list(x) for x in zip(*tensors, strict=True))
    blocks = [c["block"] for c in cases]
    refs = [ref_slice_copy(*args) for args in zip(src, rows, cols, blocks, fills, strict=True)]
    sizes = [r.numel() for r in refs]
    buf = torch.full((sum(sizes) + 7,), -7.0, device=device, dtype=dtype)
    dst, off = [], 0
    for r, size in zip(refs, sizes, strict=True):
        dst.append(buf[off : off + size].view(r.shape))
        off += size
    res = ops.slice_copy(src, rows, cols, blocks, fills, out=dst)
    for o, d, r in zip(res, dst, refs, strict=True):
        assert o is d
        assert torch.equal(d, r)
    assert torch.all(buf[off:] == -7.0)


# ---------------------------------------------------------------------------------------------
# slice_copy: layer-like cases in one call
# ---------------------------------------------------------------------------------------------


def _index(kept, n_new, device):
    return ops.make_index(torch.as_tensor(kept, dtype=torch.int64), n_new, device=device)


def slice_cases(gen, device):
    """(src, row_index, col_index, block, fill) for weights, biases and optimizer state."""

    def rnd(*s, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(dtype).to(device)

    conv = rnd(12, 8, 3, 3)
    conv_rows = _index([3, 0, 7, 11, 5], 2, device)  # prune to 5, grow by 2
    conv_cols = _index([1, 2, 4, 6, 7], 1, device)
    fill_conv = rnd(7, 6, 3, 3)
    lin_flat = rnd(5, 6 * 16, dtype=torch.float64)  # Linear after Flatten, h*w = 16
    lin_cols = _index([5, 0, 2], 3, device)
    bias = rnd(12, dtype=torch.float16)
    bn_var = rnd(12, dtype=torch.bfloat16).abs()
    bn_fill = torch.ones(7, dtype=torch.bfloat16, device=device)
    plain = rnd(7, 12)
    plain_view = rnd(12, 7).t()  # non-contiguous
    plain_rows = _index([6, 5, 4, 3, 2, 1, 0], 0, device)
    plain_cols = _index([11, 10, 0, -1, 3], 0, device)
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


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_matches_reference_mixed_dtypes_one_call(device):
    gen = torch.Generator().manual_seed(10)
    cases = slice_cases(gen, device)
    out = slice_op(*[list(x) for x in zip(*cases, strict=True)])
    assert len(out) == len(cases)
    for i, ((src, row, col, block, fill), got) in enumerate(zip(cases, out, strict=True)):
        want = ref_slice_copy(src, row, col, block, fill)
        assert got.shape == want.shape and got.dtype == src.dtype, i
        assert got.device == src.device, i
        assert got.is_contiguous()
        assert torch.equal(got, want), f"case {i}"


@pytest.mark.needs_cuda
def test_slice_copy_matches_cpu_op():
    gen = torch.Generator().manual_seed(11)
    cases = slice_cases(gen, "cuda")

    def cpu(t):
        return None if t is None else t.cpu()

    cpu_cases = [(s.cpu(), cpu(r), cpu(c), b, cpu(f)) for s, r, c, b, f in cases]
    got = slice_op(*[list(x) for x in zip(*cases, strict=True)])
    want = slice_op(*[list(x) for x in zip(*cpu_cases, strict=True)])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g.cpu(), w), f"case {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_inplace_into_views_of_one_buffer(device):
    gen = torch.Generator().manual_seed(12)
    cases = [c for c in slice_cases(gen, device) if c[0].dtype == torch.float32]
    wants = [ref_slice_copy(*c) for c in cases]
    total = sum(w.numel() for w in wants)
    buf = torch.full((total + 5,), float("nan"), device=device)
    dsts, off = [], 3
    for w in wants:
        dsts.append(buf[off : off + w.numel()].view(w.shape))
        off += w.numel()
    src, row, col, block, fill = (list(x) for x in zip(*cases, strict=True))
    assert slice_op_(src, dsts, row, col, block, fill) is None
    for i, (d, w) in enumerate(zip(dsts, wants, strict=True)):
        assert torch.equal(d, w), f"case {i}"
    assert buf[:3].isnan().all() and buf[off:].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_inplace_overlapping_source(device):
    """Shrinking inside the source's own storage: dst overlaps src, read from a copy."""
    buf = torch.randn(8 * 6 * 3 * 3, device=device)
    src = buf.view(8, 6, 3, 3)
    row = torch.tensor([7, 0, 3, -1, 5], device=device)
    col = torch.tensor([5, -1, 1, 2], device=device)
    ref = ref_slice_copy(src.clone(), row, col, 9, None)
    dst = buf[: ref.numel()].view(ref.shape)
    slice_op_([src], [dst], [row], [col], [9], [None])
    assert torch.equal(dst, ref)
    # Rows only, a 2-D tensor.
    storage = torch.randn(10 * 6, device=device)
    src = storage.view(10, 6)
    rows = _index([9, 3, 0, 5], 1, device)
    want = ref_slice_copy(src.clone(), rows, None, 1, None)
    dst = storage[: 5 * 6].view(5, 6)
    slice_op_([src], [dst], [rows], [None], [1], [None])
    assert torch.equal(dst, want)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_mixed_dtypes(device):
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
    gen = torch.Generator().manual_seed(14)
    cases = slice_cases(gen, device)
    src, row, col, block, fill = (list(x) for x in zip(*cases, strict=True))
    out = ops.slice_copy(src, row, col, block, fill)
    for i, (case, got) in enumerate(zip(cases, out, strict=True)):
        assert torch.equal(got, ref_slice_copy(*case)), f"case {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_large_tensor_grid_stride(device):
    gen = torch.Generator().manual_seed(15)
    src = torch.randn(512, 256, 3, 3, generator=gen).to(device)
    rows = _index(torch.randperm(512, generator=gen)[:400], 100, device)
    cols = _index(torch.randperm(256, generator=gen)[:200], 56, device)
    (got,) = slice_op([src], [rows], [cols], [9], [None])
    assert torch.equal(got, ref_slice_copy(src, rows, cols, 9, None))


# ---------------------------------------------------------------------------------------------
# slice_copy: all-or-nothing, caller's indices, aliasing (issue 9, item 3)
# ---------------------------------------------------------------------------------------------


def _idx(device, *v):
    return torch.tensor(v, dtype=torch.int64, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_failing_call_writes_nothing(device):
    """Mixed dtypes (the wrapper once ran one kernel call per dtype): an error in a later
    tensor names the caller's index and leaves every out untouched."""
    a = torch.randn(4, 3, device=device)
    b = torch.randn(5, 2, device=device, dtype=torch.float64)
    out = [torch.full((2, 3), 7.0, device=device), torch.full((2, 2), 7.0, device=device).double()]
    with pytest.raises(RuntimeError, match=r"row_index\[1\] has value 9"):
        ops.slice_copy([a, b], [_idx(device, 0, 1), _idx(device, 0, 9)], None, 1, out=out)
    assert (out[0] == 7).all() and (out[1] == 7).all()
    bad_out = [out[0], torch.full((3, 2), 7.0, device=device).double()]
    with pytest.raises(RuntimeError, match=r"dst\[1\] must have shape"):
        ops.slice_copy([a, b], [_idx(device, 0, 1), _idx(device, 0, 1)], None, 1, out=bad_out)
    assert (out[0] == 7).all()
    with pytest.raises(RuntimeError, match=r"col_index\[1\] has value 5"):
        ops.slice_copy([a, b], None, [None, _idx(device, 5)], 1)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_out_aliasing_other_inputs(device):
    """out[0] is src[1] (and fill[1]'s storage): the later tensor still reads the old values."""
    a = torch.randn(4, 3, device=device)
    b = torch.randn(4, 3, device=device)
    buf = torch.randn(2 * 4 * 3, device=device)
    fill1 = buf[:12].view(4, 3)
    a0, b0, fill0 = a.clone(), b.clone(), fill1.clone()
    rows = _idx(device, 3, -1, 1, 0)
    out1 = torch.empty(4, 3, device=device)
    ops.slice_copy([a, b], [rows, rows], None, 1, [None, fill1], out=[b, out1])
    assert torch.equal(b, ref_slice_copy(a0, rows, None, 1, None))
    assert torch.equal(out1, ref_slice_copy(b0, rows, None, 1, fill0))
    # A destination that overlaps another tensor's fill.
    src = [torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)]
    fills = [None, buf[12:].view(4, 3)]
    want = [
        ref_slice_copy(s, rows, None, 1, f.clone() if f is not None else None)
        for s, f in zip(src, fills, strict=True)
    ]
    dst = [buf[6:18].view(4, 3), torch.empty(4, 3, device=device)]
    ops.slice_copy(src, [rows, rows], None, 1, fills, out=dst)
    assert torch.equal(dst[0], want[0]) and torch.equal(dst[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_refuses_shared_destinations(device):
    a, b = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    out = torch.full((4, 3), 7.0, device=device)
    with pytest.raises(RuntimeError, match=r"dst\[0\] and dst\[1\] share memory"):
        ops.slice_copy([a, b], None, None, 1, out=[out, out])
    assert (out == 7).all()
    buf = torch.zeros(20, device=device)
    with pytest.raises(RuntimeError, match=r"dst\[0\] and dst\[1\] share memory"):
        ops.slice_copy([a, b], None, None, 1, out=[buf[:12].view(4, 3), buf[8:].view(4, 3)])


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_none_entries_raise_type_error(device):
    a = torch.randn(4, 3, device=device)
    with pytest.raises(TypeError, match=r"src\[1\] must be a Tensor, got NoneType"):
        ops.slice_copy([a, None], None, None, 1)
    with pytest.raises(TypeError, match=r"out\[0\] must be a Tensor, got NoneType"):
        ops.slice_copy([a], None, None, 1, out=[None])
    with pytest.raises(TypeError, match=r"row_index\[0\] must be a Tensor or None, got list"):
        ops.slice_copy([a], [[0, 1]], None, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_refuse_backward(device):
    """Neither op is differentiable: backward raises (autograd's fallback only warned)."""
    a = torch.randn(5, 4, device=device, requires_grad=True)
    S, U, Vh = ops.batched_svd([a])
    with pytest.raises(RuntimeError, match=r"svdgrow::batched_svd is not differentiable"):
        (S[0].sum() + U[0].sum()).backward()
    (w,) = ops.slice_copy([a], [_idx(device, 1, -1)], None, 1)
    with pytest.raises(RuntimeError, match=r"svdgrow::slice_copy is not differentiable"):
        w.sum().backward()
    with torch.no_grad():
        S, _, _ = ops.batched_svd([a])
    assert not S[0].requires_grad
    S, _, _ = ops.batched_svd([a.detach()])
    assert not S[0].requires_grad


def test_make_index():
    idx = ops.make_index(torch.tensor([4, 1]), 3)
    assert idx.dtype == torch.int64 and idx.tolist() == [4, 1, -1, -1, -1]
    assert ops.make_index([0], 0).tolist() == [0]
    with pytest.raises(ValueError, match="n_new"):
        ops.make_index([0], -1)


# ---------------------------------------------------------------------------------------------
# slice_copy: bad input, clear errors naming the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_bad_input(device):
    w = torch.randn(4, 3, 3, 3, device=device)

    def idx(*v):
        return torch.tensor(v, dtype=torch.int64, device=device)

    with pytest.raises(
        RuntimeError, match=r"row_index\[0\] has value 4 at position 1, outside \[-1, 4\)"
    ):
        slice_op([w], [idx(0, 4)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"col_index\[0\] has value -2"):
        slice_op([w], [None], [idx(-2)], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[1\] repeats source rows 2"):
        slice_op([w, w], [None, idx(2, 1, 2)], [None, None], [9, 9], [None, None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] must be an int64 tensor"):
        slice_op([w], [idx(0, 1).int()], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"row_index\[0\] must be 1-D"):
        slice_op([w], [idx(0, 1).reshape(1, 2)], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"block\[0\] = 4 does not fit src\[0\]"):
        slice_op([w], [None], [None], [4], [None])
    with pytest.raises(RuntimeError, match=r"fill\[0\] must have the destination shape"):
        slice_op([w], [idx(0, -1)], [None], [9], [torch.zeros(3, 3, 3, 3, device=device)])
    with pytest.raises(RuntimeError, match=r"fill\[0\] has dtype"):
        fill64 = torch.zeros(2, 3, 3, 3, device=device, dtype=torch.float64)
        slice_op([w], [idx(0, -1)], [None], [9], [fill64])
    with pytest.raises(RuntimeError, match=r"row_index has 2 entries but src has 1"):
        slice_op([w], [None, None], [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"src\[0\] must be float32, float64, float16 or bf"):
        slice_op([torch.ones(3, dtype=torch.int32, device=device)], [None], [None], [1], [None])
    with pytest.raises(RuntimeError, match=r"col_index\[0\] must be None"):
        slice_op([torch.randn(4, device=device)], [None], [idx(0, -1)], [1], [None])
    with pytest.raises(ValueError, match=r"block has 2 entries"):
        ops.slice_copy([w], None, None, [9, 9])
    other = _other_device(device)
    with pytest.raises(RuntimeError, match=r"one device"):
        slice_op([w, torch.randn(3, device=other)], [None, None], [None, None], [9, 1], [None] * 2)
    with pytest.raises(RuntimeError, match=rf"row_index\[0\] is on {other}"):
        slice_op([w], [torch.zeros(2, dtype=torch.int64, device=other)], [None], [9], [None])


@pytest.mark.parametrize("device", DEVICES)
def test_slice_copy_bad_destination(device):
    w = torch.randn(4, 3, 3, 3, device=device)
    rows = [torch.tensor([0, 1, -1], device=device)]
    dst = torch.empty(3, 3, 3, 4, device=device)[..., :3]  # right shape, not contiguous
    with pytest.raises(RuntimeError, match=r"dst\[0\] must be contiguous"):
        slice_op_([w], [dst], rows, [None], [9], [None])
    dst = torch.empty(3, 3, 3, 3, device=device).permute(0, 3, 1, 2)
    with pytest.raises(RuntimeError, match=r"dst\[0\] must be contiguous"):
        slice_op_([w], [dst], rows, [None], [9], [None])
    with pytest.raises(RuntimeError, match=r"dst\[0\] must have shape"):
        slice_op_([w], [torch.empty(2, 3, 3, 3, device=device)], rows, [None], [9], [None])
    # Nothing was written by a failing call: a destination keeps its contents.
    dst = torch.full((3, 3, 3, 3), 7.0, device=device)
    with pytest.raises(RuntimeError):
        slice_op_([w], [dst], [torch.tensor([0, 6, -1], device=device)], [None], [9], [None])
    assert (dst == 7).all()


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_batched_svd(device):
    mats = [torch.randn(6, 4), torch.randn(3, 8, dtype=torch.float32), torch.randn(5, 5)]
    mats = [a.to(device) for a in mats]
    torch.library.opcheck(svd_op, (mats,))
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(svd_op, (mats, 2, 2, 8, 1), test_utils=quick)
    one = [torch.randn(7, 3, dtype=torch.float64, device=device)]
    torch.library.opcheck(svd_op, (one,), test_utils=quick)


def _slice_sample(device="cpu"):
    src = [torch.randn(4, 3, 2, 2), torch.randn(4), torch.randn(5, 12)]
    rows = [torch.tensor([3, -1, 0]), torch.tensor([3, -1, 0]), None]
    cols = [torch.tensor([2, 0, -1, -1]), None, torch.tensor([1, -1])]
    blocks = [4, 1, 4]
    fills = [torch.randn(3, 4, 2, 2), None, None]

    def to(ts):
        return [None if t is None else t.to(device) for t in ts]

    return to(src), to(rows), to(cols), blocks, to(fills)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_slice_copy(device):
    torch.library.opcheck(slice_op, _slice_sample(device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_slice_copy_(device):
    src, rows, cols, blocks, fills = _slice_sample(device)
    dst = [torch.empty(3, 4, 2, 2), torch.empty(3), torch.empty(5, 8)]
    torch.library.opcheck(slice_op_, (src, [d.to(device) for d in dst], rows, cols, blocks, fills))


def test_fake_shapes_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        S, U, Vh = ops.batched_svd([torch.empty(6, 4), torch.empty(3, 8)], k=2)
        shapes = [tuple(t.shape) for t in S + U + Vh]
        assert shapes == [(2,), (2,), (6, 2), (3, 2), (2, 4), (2, 8)]
        out = ops.slice_copy(*_slice_sample())
        assert [tuple(t.shape) for t in out] == [(3, 4, 2, 2), (3,), (5, 8)]


# ---------------------------------------------------------------------------------------------
# pivoted_cholesky (CPU kernel against the reference in svdgrow.surgery.pivots)
# ---------------------------------------------------------------------------------------------


def _greedy_qr_pivots(A: torch.Tensor, r: int) -> list[int]:
    """Column-pivoted Gram-Schmidt of A, one column at a time: the definition of the pivots."""
    A = A.clone()
    out = []
    for _ in range(r):
        norms = (A * A).sum(0)
        norms[out] = -1.0
        j = int(torch.argmax(norms))
        out.append(j)
        q = A[:, j] / norms[j].sqrt()
        A = A - q[:, None] * (q @ A)[None, :]
    return out


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 150),
    frac=st.floats(0.0, 1.0),
    block=st.sampled_from([1, 3, 64]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_pivoted_cholesky_matches_reference(n, frac, block, seed, dtype):
    """Full-rank matrices with distinct column norms: the kernel's pivots are exactly those of
    the one-column-at-a-time definition and of the Python blocked version, for any block."""
    from svdgrow.surgery.pivots import pivoted_cholesky as reference

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n + 5, n, generator=g, dtype=torch.float64)
    A = A * torch.linspace(1.0, 3.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    r = round(frac * n)
    (piv,) = ops.pivoted_cholesky([(A.T @ A).to(dtype)], [r], block=block)
    assert piv.dtype == torch.int64 and piv.shape == (r,)
    if dtype == torch.float64:
        assert piv.tolist() == _greedy_qr_pivots(A, r)
    assert piv.tolist() == reference((A.T @ A).to(dtype), r, block=block).tolist()


def test_pivoted_cholesky_many_sizes_in_one_call_and_rank_deficient():
    """Many matrices in one call (run in parallel) each give their own pivots; a rank-k matrix
    picks k independent columns first, then distinct ones to reach r."""
    from svdgrow.surgery.pivots import pivoted_cholesky as reference

    g = torch.Generator().manual_seed(3)
    grams, rs = [], []
    for n in (5, 40, 130, 7, 1, 300):
        A = torch.randn(n + 3, n, generator=g, dtype=torch.float64)
        grams.append(A.T @ A)
        rs.append(max(0, n - 2))
    out = ops.pivoted_cholesky(grams, rs)
    for G, r, piv in zip(grams, rs, out, strict=True):
        assert piv.tolist() == reference(G, r).tolist()
    A = torch.randn(4, 30, generator=g, dtype=torch.float64)  # rank 4
    (piv,) = ops.pivoted_cholesky([A.T @ A], [10])
    assert len(set(piv.tolist())) == 10
    assert torch.linalg.matrix_rank(A[:, piv[:4]]) == 4


def test_pivoted_cholesky_bad_input():
    G = torch.eye(4)
    with pytest.raises(ValueError, match="grams has 1 entries but r has 2"):
        ops.pivoted_cholesky([G], [1, 2])
    with pytest.raises(RuntimeError, match=r"asked for 5 pivots of grams\[0\]"):
        ops.pivoted_cholesky([G], [5])
    with pytest.raises(RuntimeError, match=r"grams\[1\] must be a square matrix"):
        ops.pivoted_cholesky([G, torch.zeros(3, 4)], [1, 1])
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.pivoted_cholesky([torch.eye(3, dtype=torch.int64)], [1])
    with pytest.raises(RuntimeError, match="block must be >= 1"):
        ops.pivoted_cholesky([G], [1], block=0)
    assert ops.pivoted_cholesky([], []) == []
    with pytest.raises(ValueError, match="runs on the CPU, got grams on meta"):
        ops.pivoted_cholesky([torch.eye(3, device="meta")], [1])


def test_opcheck_pivoted_cholesky():
    A = torch.randn(9, 6, dtype=torch.float64)
    grams = [A.T @ A, torch.eye(3)]
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.svdgrow.pivoted_cholesky.default, (grams, [4, 2]),
                          test_utils=quick)  # fmt: skip
