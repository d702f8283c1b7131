// batched_svd on the CPU: per matrix, a float64 Gram matrix on the short side, a symmetric
// eigen-solver and one product for the long-side vectors; the trailing block whose vectors the
// Gram route cannot make orthogonal (small or zero singular values) is solved again one-sided,
// with its null space completed to a jointly orthonormal set. The algorithm, its accuracy, and
// why the matrices run one after another: docs/design.md, "Kernels: batched_svd on the CPU".
//
// niter and oversample belong to the CUDA kernel's range finder and are not used here; seed
// seeds the completion of null-space vectors.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "common.h"

// MKL's thread count for the calling thread only (mkl_service.h maps mkl_set_num_threads_local
// to this C entry point; the lower-case symbol is the Fortran one, taking a pointer). A weak
// reference: it resolves to torch's MKL where torch was built with it (the pip wheels export it
// from libtorch_cpu), and is null where not. Used for speed only (SequentialMklScope).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace svdgrow {
namespace {

using at::Tensor;

constexpr double kEps64 = std::numeric_limits<double>::epsilon();

// One matrix's factors.
struct MatrixSvd {
  Tensor S, U, Vh;
};

// Orthogonality that the long-side vectors must reach before they are written out.
double target_orthogonality(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-7 : 1e-12; }

// The lower triangle of G = A A^T (A: p x q, contiguous, float64), computed in row blocks of
// at least 32 rows so that only the blocks on and below the diagonal are multiplied:
// (nb + 1) / (2 nb) of a full product (5/8 with 4 blocks, 9/16 with 8). eigh reads the lower
// triangle only.
Tensor gram_lower(const Tensor& A) {
  const int64_t p = A.size(0);
  const int64_t nb = std::clamp<int64_t>(p / 32, 1, 8);
  if (nb == 1) return at::mm(A, A.t());
  Tensor G = at::empty({p, p}, A.options());
  std::vector<int64_t> edge(nb + 1);
  for (int64_t b = 0; b <= nb; ++b) edge[b] = p * b / nb;
  for (int64_t bi = 0; bi < nb; ++bi) {
    Tensor Ai = A.narrow(0, edge[bi], edge[bi + 1] - edge[bi]);
    // Row block bi of G, columns 0 .. edge[bi + 1]: one product per row block.
    Tensor Aj = A.narrow(0, 0, edge[bi + 1]);
    Tensor blk = at::mm(Ai, Aj.t());
    G.narrow(0, edge[bi], edge[bi + 1] - edge[bi]).narrow(1, 0, edge[bi + 1]).copy_(blk);
  }
  return G;
}

// Householder QR of Y (q x c) with the signs fixed so that R's diagonal is >= 0, so that
// Q stays close to Y where Y is already close to orthonormal.
// (geqrf + householder_product rather than linalg_qr, whose triu of R opens a parallel region
// even for one small matrix.)
Tensor orthonormalize(const Tensor& Y) {
  auto [H, tau] = at::geqrf(Y);  // R in H's upper triangle
  Tensor sgn = at::sign(H.diagonal());
  sgn.masked_fill_(sgn == 0, 1.0);
  return at::linalg_householder_product(H, tau).mul_(sgn.unsqueeze(0));
}

// One classical Gram-Schmidt pass: Z <- Z - Xg Xg^T Z (Xg with orthonormal columns).
void project_out(const Tensor& Z, const Tensor& Xg) {
  if (Xg.size(1) > 0) Z.sub_(at::mm(Xg, at::mm(Xg.t(), Z)));
}

// The matrix in float64 with its short side first (rows of A64 index the Gram matrix). Where
// max|A| lies outside [2^-256, 2^256] it is divided by the power of two that brings max|A| into
// [0.5, 1): exact, and it keeps the Gram matrix clear of underflow (float64 inputs near 1e-160
// lost digits) and overflow; inside that range neither can happen and the input is used as it
// is. Returns A64 and the scale.
std::pair<Tensor, double> scaled_short_side(const Tensor& input, bool wide, int64_t index) {
  // For a tall matrix, transpose in the input dtype first: ATen's transposing copy is several
  // times slower when it also converts to float64.
  Tensor A64 = wide ? input.to(at::kDouble).contiguous() : input.t().contiguous().to(at::kDouble);
  auto [lo_t, hi_t] = at::aminmax(A64);
  const double lo = lo_t.item<double>(), hi = hi_t.item<double>();
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), "batched_svd: mats[", index,
              "] contains NaN or Inf; its SVD is undefined");
  const double amax = std::max(-lo, hi);
  int ex = 0;
  std::frexp(amax, &ex);
  if (amax == 0 || (ex > -256 && ex <= 256)) return {A64, 1.0};
  const double scale = std::ldexp(1.0, ex);
  // Out of place where A64 is the caller's tensor (a contiguous float64 input).
  return {A64.is_alias_of(input) ? A64.mul(1.0 / scale) : A64.mul_(1.0 / scale), scale};
}

// Number of leading columns of X = A^T W whose orthogonality the Gram route already meets:
// column j is off by about c * eps64 * (sigma_max / sigma_j)^2 (measured: c < 20 for
// p <= 256; we use 4 sqrt(p)).
int64_t accurate_columns(const Tensor& s, int64_t p, at::ScalarType dtype) {
  const double* sp = s.const_data_ptr<double>();
  const int64_t r = s.numel();
  const double smax = *std::max_element(sp, sp + r);
  const double c = 4.0 * std::sqrt(static_cast<double>(p));
  const double target = target_orthogonality(dtype);
  int64_t good = 0;
  while (good < r && sp[good] > 0 && c * kEps64 * (smax / sp[good]) * (smax / sp[good]) <= target) {
    ++good;
  }
  return good;
}

// An orthonormal basis Q (q x nb) of a space orthogonal to Xg that holds the range of Bb
// (q x nb) up to `floor`: the left singular vectors of Bb (projected off Xg) whose singular
// values exceed `floor`, completed by seeded Gaussian vectors; then projected off Xg and
// orthonormalised, twice ("twice is enough"). Completing column by column (each one checked
// on its own) is not enough: columns can be long one by one yet jointly dependent, and QR then
// fills the gap with a direction inside span(Xg).
Tensor block_basis(const Tensor& Bb, const Tensor& Xg, double floor, uint64_t seed) {
  const int64_t q = Bb.size(0), nb = Bb.size(1);
  Tensor Y = Bb.clone();
  project_out(Y, Xg);
  project_out(Y, Xg);
  Tensor Q = at::empty({q, nb}, Bb.options());
  int64_t strong = 0;
  // ||Y||_F bounds every singular value: a block of pure rounding noise (the usual case for a
  // rank-deficient matrix) needs no SVD.
  if (Y.norm().item<double>() > floor) {
    auto [Uy, Sy, Vyh] = at::linalg_svd(Y, /*full_matrices=*/false);
    const double* sy = Sy.const_data_ptr<double>();
    while (strong < nb && sy[strong] > floor) ++strong;
    Q.narrow(1, 0, strong).copy_(Uy.narrow(1, 0, strong));
  }
  if (strong < nb) {
    auto gen = at::detail::createCPUGenerator(seed);
    Q.narrow(1, strong, nb - strong).copy_(at::randn({q, nb - strong}, gen, Bb.options()));
  }
  for (int pass = 0; pass < 2; ++pass) {
    project_out(Q, Xg);
    Q = orthonormalize(Q);
  }
  return Q;
}

// Solves columns good..r-1 again, one-sided. The block B_b = A^T W_b runs over all p - good
// trailing eigenvectors, even with top-k (the eigenvectors of tiny eigenvalues mix across
// position r): B_b = Q R with Q from block_basis, then R^T = U_r S_r V_r^T (small dense SVD),
// so that W_b R^T Q^T = (W_b U_r) S_r (Q V_r)^T. Writes Wr, X and s in place.
void resolve_trailing_block(const Tensor& A64, const Tensor& Wd, const Tensor& Wr, const Tensor& X,
                            const Tensor& s, int64_t good, uint64_t seed) {
  const int64_t p = Wd.size(0), r = s.numel();
  const int64_t nb = p - good, nr = r - good;
  const double smax = s.max().item<double>();
  Tensor Xg = X.narrow(1, 0, good);
  Tensor Wb = Wd.narrow(1, good, nb);
  Tensor Bb = nb == nr ? X.narrow(1, good, nb).clone() : at::mm(Wb.t(), A64).t();  // q x nb
  // Below p * eps64 * sigma_max a direction of B_b is rounding noise of the Gram route.
  Tensor Q = block_basis(Bb, Xg, static_cast<double>(p) * kEps64 * smax, seed);
  Tensor R = at::mm(Q.t(), Bb);  // nb x nb, Bb ~= Q R
  auto [Ur, Sr, Vrh] = at::linalg_svd(R.t(), /*full_matrices=*/false);
  Wr.narrow(1, good, nr).copy_(at::mm(Wb, Ur.narrow(1, 0, nr)));
  X.narrow(1, good, nr).copy_(at::mm(Q, Vrh.narrow(0, 0, nr).t()));
  s.narrow(0, good, nr).copy_(Sr.narrow(0, 0, nr));
}

// SVD of one matrix; r = number of triplets kept.
MatrixSvd svd_one(const Tensor& input, int64_t r, uint64_t seed, int64_t index) {
  const at::ScalarType dtype = input.scalar_type();
  const bool wide = input.size(0) <= input.size(1);
  const int64_t p = std::min(input.size(0), input.size(1));
  auto [A64, scale] = scaled_short_side(input, wide, index);
  Tensor G = gram_lower(A64);                                // p x p, lower triangle
  Tensor Wd = std::get<1>(at::linalg_eigh(G, "L")).flip(1);  // p x p, descending
  Tensor Wr = Wd.narrow(1, 0, r).contiguous();               // p x r
  // X = A64^T Wr (q x r: sigma_j * x_j), computed as (Wr^T A64)^T: BLAS runs this layout
  // about twice as fast, and its rows are already Vh's rows for a wide matrix. sigma_j is the
  // norm of X's column j: accurate to ~eps64 * sigma_max, where sqrt(lambda_j) would only be
  // accurate to ~sqrt(eps64) * sigma_max.
  Tensor X = at::mm(Wr.t(), A64).t();
  Tensor s = X.norm(2, {0});  // r
  const int64_t good = accurate_columns(s, p, dtype);
  if (good > 0) X.narrow(1, 0, good).div_(s.narrow(0, 0, good).unsqueeze(0));
  if (good < r) resolve_trailing_block(A64, Wd, Wr, X, s, good, seed);
  // Column norms of equal or clustered values, and the re-solved block, can come out of
  // order by a rounding error: keep them descending.
  const double* sp = s.const_data_ptr<double>();
  if (!std::is_sorted(sp, sp + r, std::greater<double>())) {
    Tensor perm = at::argsort(s, /*stable=*/true, /*dim=*/0, /*descending=*/true);
    Wr = Wr.index_select(1, perm);
    X = X.index_select(1, perm);
    s = s.index_select(0, perm);
  }
  MatrixSvd out;
  out.S = s.mul(scale).to(dtype);
  if (wide) {
    out.U = Wr.to(dtype).contiguous();
    out.Vh = X.t().to(dtype).contiguous();
  } else {
    out.U = X.t().to(dtype).t().contiguous();  // X.t() is contiguous: convert, then transpose
    out.Vh = Wr.t().to(dtype).contiguous();
  }
  return out;
}

// Rough cost of one matrix in multiply-adds: Gram, eigen-solver, long-side product.
double svd_cost(const Tensor& a, int64_t r) {
  const double p = static_cast<double>(std::min(a.size(0), a.size(1)));
  const double q = static_cast<double>(std::max(a.size(0), a.size(1)));
  return 0.6 * p * p * q + 6.0 * p * p * p + static_cast<double>(r) * p * q;
}

// Below this cost (multiply-adds, about a millisecond on one core) a matrix's LAPACK / BLAS
// calls run on the calling thread: waking the pool for each of its dozen small calls costs
// more than it saves, and far more on a loaded machine.
constexpr double kSequentialCost = 4e6;

// While alive, MKL runs on the calling thread alone (then the previous count is restored).
// Without MKL_Set_Num_Threads_Local (torch without MKL) it does nothing.
class SequentialMklScope {
 public:
  explicit SequentialMklScope(bool active)
      : active_(active && MKL_Set_Num_Threads_Local != nullptr),
        previous_(active_ ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialMklScope() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialMklScope(const SequentialMklScope&) = delete;
  SequentialMklScope& operator=(const SequentialMklScope&) = delete;

 private:
  bool active_;
  int previous_;
};

BatchedSvdOutput batched_svd_cpu(at::TensorList mats, std::optional<int64_t> k, int64_t niter,
                                 int64_t oversample, int64_t seed) {
  check_batched_svd_args(mats, k, niter, oversample);
  const int64_t nmat = static_cast<int64_t>(mats.size());
  for (int64_t i = 0; i < nmat; ++i) {
    TORCH_CHECK(mats[i].device().is_cpu(), "batched_svd (CPU kernel): mats[", i, "] is on ",
                mats[i].device(), "; all matrices must be on the CPU");
  }
  std::vector<Tensor> S(nmat), U(nmat), Vh(nmat);
  // One matrix after another, never inside at::parallel_for: MKL's LAPACK called from inside
  // an OpenMP region can deadlock (dgeqrf waits for MKL thread-team tasks that the region's
  // other threads never pick up), even with its per-thread count set to 1. Parallelism comes
  // from inside each call (the intra-op pool), for matrices large enough to use it.
  for (int64_t i = 0; i < nmat; ++i) {
    const int64_t r = k.has_value() ? *k : std::min(mats[i].size(0), mats[i].size(1));
    const uint64_t key = static_cast<uint64_t>(seed) * 1000003ULL + static_cast<uint64_t>(i);
    const SequentialMklScope sequential(svd_cost(mats[i], r) < kSequentialCost);
    MatrixSvd f = svd_one(mats[i].detach(), r, key, i);
    S[i] = std::move(f.S);
    U[i] = std::move(f.U);
    Vh[i] = std::move(f.Vh);
  }
  return {std::move(S), std::move(U), std::move(Vh)};
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) { m.impl("batched_svd", TORCH_FN(batched_svd_cpu)); }

}  // namespace svdgrow
