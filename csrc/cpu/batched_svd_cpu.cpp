// batched_svd on the CPU: a float64 Gram matrix on the short side of each matrix, a
// symmetric eigen-solver, and one product to get the long-side singular vectors.
//
// For A (m x n) with p = min(m, n) <= q = max(m, n):
//   G = A A^T (m <= n) or A^T A (m > n), p x p, in float64;
//   G = W diag(lambda) W^T, the top r eigenvectors W (descending lambda) are the short-side
//   singular vectors; B = A^T W (or A W) holds sigma_j * (long-side vector j), so sigma_j is
//   the norm of B's column j (accurate to ~eps64 * sigma_max, where sqrt(lambda_j) would only
//   be accurate to ~sqrt(eps64) * sigma_max) and the long-side vectors are X = B / sigma.
// When a sigma is small relative to sigma_max, its X column has lost orthogonality (the Gram
// matrix squares the condition number), or is noise (rank-deficient A): that trailing block
// is solved again one-sided (Gram-Schmidt against the accurate columns, Householder QR with
// R's diagonal made positive, a small dense SVD of R), so that U and Vh stay orthonormal and
// U diag(S) Vh stays A; see svd_one.
//
// The CPU kernel is exact (up to the Gram's rounding): niter and oversample are accepted for
// the CUDA kernel's randomized range finder and are not used here; seed seeds the random
// completion of null-space vectors.
//
// Matrices run in parallel, one per thread, from a queue sorted by cost (largest first); a
// matrix that costs more than a thread's fair share runs alone first with multi-threaded BLAS.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace svdgrow {
namespace {

using at::Tensor;

constexpr double kEps64 = std::numeric_limits<double>::epsilon();

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
Tensor orthonormalize(const Tensor& Y) {
  auto [Q, R] = at::linalg_qr(Y, "reduced");
  Tensor sgn = at::sign(R.diagonal());
  sgn.masked_fill_(sgn == 0, 1.0);
  return Q.mul_(sgn.unsqueeze(0));
}

// One matrix's factors.
struct MatrixSvd {
  Tensor S, U, Vh;
};

// SVD of one matrix; r = number of triplets kept.
//
// Accuracy of the Gram route: X's column j loses orthogonality to the columns before it by
// about c * eps64 * (sigma_max / sigma_j)^2 (measured: c < 20 for p <= 256; we use
// 4 sqrt(p)). The leading columns that meet the output dtype's target are kept as they are
// ("good"). The trailing block B_b = A^T W_b (all p - good trailing eigenvectors, even with
// top-k) is solved again, one-sided: orthogonalised
// against the good columns (classical Gram-Schmidt twice), B_b = Q R (Householder, with
// null-space columns of Q restarted from seeded random vectors), then R^T = U_r S_r V_r^T
// (small dense SVD), so that W_b R^T Q^T = (W_b U_r) S_r (Q V_r)^T. That keeps U and Vh
// orthonormal to working precision, sigma accurate to ~eps64 * sigma_max, and U S Vh = A to
// ~eps64 * ||A||, also for rank-deficient matrices.
MatrixSvd svd_one(const Tensor& input, int64_t r, uint64_t seed, int64_t index) {
  const at::ScalarType dtype = input.scalar_type();
  const int64_t m = input.size(0), n = input.size(1);
  const bool wide = m <= n;
  const int64_t p = wide ? m : n;
  const int64_t q = wide ? n : m;
  // Short side first: rows of A64 index the Gram matrix.
  // (For a tall matrix, transpose in the input dtype first: ATen's transposing copy is several
  // times slower when it also converts to float64.)
  Tensor A64 = wide ? input.to(at::kDouble).contiguous() : input.t().contiguous().to(at::kDouble);
  Tensor G = gram_lower(A64);  // p x p, lower triangle
  // A NaN or Inf anywhere in A reaches every entry of its row of G, and the diagonal.
  TORCH_CHECK(
      at::isfinite(G.diagonal()).all().item<bool>(), "batched_svd: mats[", index,
      "] contains NaN or Inf (or float64 values too large to square); its SVD is undefined");
  Tensor W = std::get<1>(at::linalg_eigh(G, "L"));  // eigenvalues ascending
  Tensor Wd = W.flip(1);                            // p x p, descending
  Tensor Wr = Wd.narrow(1, 0, r).contiguous();      // p x r
  // X = A64^T Wr (q x r: sigma_j * x_j), computed as (Wr^T A64)^T: BLAS runs this layout
  // about twice as fast, and its rows are already Vh's rows for a wide matrix.
  Tensor X = at::mm(Wr.t(), A64).t();
  Tensor s = X.norm(2, {0});  // r
  const double* sp = s.const_data_ptr<double>();
  const double smax = *std::max_element(sp, sp + r);
  const double target = target_orthogonality(dtype);
  const double c = 4.0 * std::sqrt(static_cast<double>(p));
  int64_t good = 0;
  while (good < r && sp[good] > 0 && c * kEps64 * (smax / sp[good]) * (smax / sp[good]) <= target)
    ++good;

  if (good > 0) X.narrow(1, 0, good).div_(s.narrow(0, 0, good).unsqueeze(0));
  if (good < r) {
    // The block runs over all trailing eigenvectors, not just those up to r: with top-k, the
    // eigenvectors of tiny eigenvalues mix across position r as well.
    const int64_t nb = p - good, nr = r - good;
    Tensor Xg = X.narrow(1, 0, good);
    auto project_out = [&](Tensor& Z) {
      for (int pass = 0; pass < 2 && good > 0; ++pass) Z.sub_(at::mm(Xg, at::mm(Xg.t(), Z)));
    };
    Tensor Wb = Wd.narrow(1, good, nb);
    Tensor Bb = nb == nr ? X.narrow(1, good, nb).clone() : at::mm(Wb.t(), A64).t();  // q x nb
    project_out(Bb);
    Tensor Q = orthonormalize(Bb);
    // Q spans Bb, but where Bb is (numerically) rank-deficient Householder completes Q with
    // arbitrary directions that need not be orthogonal to Xg: project, restart the columns
    // that lay in span(Xg) from random vectors, and orthonormalise again.
    if (good > 0) {
      auto gen = at::detail::createCPUGenerator(seed);
      for (int attempt = 0; attempt < 4; ++attempt) {
        project_out(Q);
        Tensor norms = Q.norm(2, {0});
        const double* np = norms.const_data_ptr<double>();
        bool restarted = false;
        for (int64_t j = 0; j < nb; ++j) {
          if (!(np[j] > 0.1)) {
            Q.select(1, j).copy_(at::randn({q}, gen, Q.options()));
            restarted = true;
          }
        }
        if (restarted) project_out(Q);
        Q = orthonormalize(Q);
        if (!restarted) break;
      }
    }
    Tensor R = at::mm(Q.t(), Bb);  // nb x nb, Bb ~= Q R
    auto [Ur, Sr, Vrh] = at::linalg_svd(R.t(), /*full_matrices=*/false);
    Wr.narrow(1, good, nr).copy_(at::mm(Wb, Ur.narrow(1, 0, nr)));
    X.narrow(1, good, nr).copy_(at::mm(Q, Vrh.narrow(0, 0, nr).t()));
    s.narrow(0, good, nr).copy_(Sr.narrow(0, 0, nr));
  }
  // Column norms of equal or clustered values, and the re-solved block, can come out of
  // order by a rounding error: keep them descending.
  const double* sp2 = s.const_data_ptr<double>();
  if (!std::is_sorted(sp2, sp2 + r, std::greater<double>())) {
    Tensor perm = at::argsort(s, /*stable=*/true, /*dim=*/0, /*descending=*/true);
    Wr = Wr.index_select(1, perm);
    X = X.index_select(1, perm);
    s = s.index_select(0, perm);
  }
  MatrixSvd out;
  out.S = s.to(dtype);
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

BatchedSvdOutput batched_svd_cpu(at::TensorList mats, std::optional<int64_t> k, int64_t niter,
                                 int64_t oversample, int64_t seed) {
  check_batched_svd_args(mats, k, niter, oversample);
  for (size_t i = 0; i < mats.size(); ++i) {
    TORCH_CHECK(mats[i].device().is_cpu(), "batched_svd (CPU kernel): mats[", i, "] is on ",
                mats[i].device(), "; all matrices must be on the CPU");
  }
  const int64_t nmat = static_cast<int64_t>(mats.size());
  std::vector<Tensor> inputs(nmat);
  std::vector<int64_t> rank(nmat);
  std::vector<double> cost(nmat);
  double total = 0;
  for (int64_t i = 0; i < nmat; ++i) {
    inputs[i] = mats[i].detach();
    rank[i] = k.has_value() ? *k : std::min(mats[i].size(0), mats[i].size(1));
    cost[i] = svd_cost(mats[i], rank[i]);
    total += cost[i];
  }
  std::vector<int64_t> order(nmat);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });

  std::vector<MatrixSvd> res(nmat);
  auto run = [&](int64_t i) {
    res[i] = svd_one(inputs[i], rank[i],
                     static_cast<uint64_t>(seed) * 1000003ULL + static_cast<uint64_t>(i), i);
  };
  const int64_t nthreads = at::get_num_threads();
  // Matrices larger than a thread's share of the work go first, alone, with threaded BLAS.
  size_t first_queued = 0;
  if (nthreads > 1 && !at::in_parallel_region()) {
    while (first_queued < order.size() &&
           cost[order[first_queued]] > total / static_cast<double>(nthreads)) {
      total -= cost[order[first_queued]];
      run(order[first_queued]);
      ++first_queued;
    }
  }
  const int64_t nq = nmat - static_cast<int64_t>(first_queued);
  if (nq > 0) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(nthreads, nq), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t j = next.fetch_add(1); j < nq; j = next.fetch_add(1))
          run(order[first_queued + j]);
      }
    });
  }
  std::vector<Tensor> S(nmat), U(nmat), Vh(nmat);
  for (int64_t i = 0; i < nmat; ++i) {
    S[i] = std::move(res[i].S);
    U[i] = std::move(res[i].U);
    Vh[i] = std::move(res[i].Vh);
  }
  return {std::move(S), std::move(U), std::move(Vh)};
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) { m.impl("batched_svd", TORCH_FN(batched_svd_cpu)); }

}  // namespace svdgrow
