// batched_svd on the CPU: a float64 Gram matrix on the short side of each matrix, a
// symmetric eigen-solver, and one product to get the long-side singular vectors.
//
// For A (m x n) with p = min(m, n) <= q = max(m, n):
//   G = A A^T (m <= n) or A^T A (m > n), p x p, in float64;
//   G = W diag(lambda) W^T (ascending), sigma = sqrt(max(lambda, 0)) taken descending;
//   the short-side vectors are W's columns, the long-side ones X = A^T W / sigma (or A W / sigma).
// When a sigma is tiny relative to sigma_max, its X column has lost orthogonality (the Gram
// matrix squares the condition number), or is noise: those columns are re-orthonormalised
// against the accurate ones (classical Gram-Schmidt twice, then Householder QR with the sign
// of R's diagonal fixed), noise columns being replaced by seeded random vectors first, so
// that U and Vh stay orthonormal and U diag(S) Vh stays A.
//
// The CPU kernel is exact (up to the Gram's rounding): niter and oversample are accepted for
// the CUDA kernel's randomized range finder and are not used here; seed seeds the random
// completion of null-space vectors.
//
// Matrices run in parallel, one per thread, from a queue sorted by cost (largest first); a
// matrix that costs more than a thread's fair share runs alone first with multi-threaded BLAS.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace svdgrow {
namespace {

using at::Tensor;

constexpr double kEps64 = std::numeric_limits<double>::epsilon();

// Orthogonality that the long-side vectors must reach before they are written out.
double target_orthogonality(at::ScalarType dtype) {
  return dtype == at::kFloat ? 1e-7 : 1e-13;
}

// The lower triangle of G = A A^T (A: p x q, contiguous, float64), computed in row blocks so
// that only the blocks on and below the diagonal are multiplied (about 5/8 of a full product
// with 4 blocks). eigh reads the lower triangle only.
Tensor gram_lower(const Tensor& A) {
  const int64_t p = A.size(0);
  const int64_t nb = p >= 256 ? 4 : (p >= 96 ? 2 : 1);
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

// Makes the columns of X (q x r, float64) orthonormal where the Gram route cannot vouch for
// them. `sigma` holds the r singular values (descending); X's column j was computed as
// A^T w_j / sigma_j (or zero where sigma_j is at the noise floor).
void fix_orthogonality(Tensor& X, const std::vector<double>& sigma, int64_t p,
                       at::ScalarType out_dtype, uint64_t seed) {
  const int64_t q = X.size(0), r = X.size(1);
  const double smax = sigma.empty() ? 0.0 : sigma[0];
  const double target = target_orthogonality(out_dtype);
  // Column j's loss of orthogonality is about c * eps64 * (smax / sigma_j)^2.
  const double c = 4.0 * std::sqrt(static_cast<double>(p));
  int64_t good = 0;  // columns [0, good) are accurate
  while (good < r && sigma[good] > 0 && c * kEps64 * (smax / sigma[good]) * (smax / sigma[good]) <= target)
    ++good;
  if (good == r) return;
  const int64_t nbad = r - good;
  Tensor Y = X.narrow(1, good, nbad).clone();
  // Columns whose error would be of order one carry no direction: start them from random.
  std::vector<int64_t> noise;
  for (int64_t j = good; j < r; ++j) {
    if (sigma[j] <= 0 || c * kEps64 * (smax / sigma[j]) * (smax / sigma[j]) > 1e-2) noise.push_back(j - good);
  }
  if (!noise.empty()) {
    auto gen = at::detail::createCPUGenerator(seed);
    Tensor rnd = at::randn({q, static_cast<int64_t>(noise.size())}, gen, X.options());
    for (size_t t = 0; t < noise.size(); ++t) Y.select(1, noise[t]).copy_(rnd.select(1, t));
  }
  Tensor Xg = X.narrow(1, 0, good);
  for (int pass = 0; pass < 2 && good > 0; ++pass) {
    Y.sub_(at::mm(Xg, at::mm(Xg.t(), Y)));
  }
  auto [Q, R] = at::linalg_qr(Y, "reduced");
  Tensor sgn = at::sign(R.diagonal());
  sgn.masked_fill_(sgn == 0, 1.0);
  Q.mul_(sgn.unsqueeze(0));
  if (good > 0) {  // one more pass: QR may have rotated a random column back towards Xg
    Q.sub_(at::mm(Xg, at::mm(Xg.t(), Q)));
    auto [Q2, R2] = at::linalg_qr(Q, "reduced");
    Tensor sgn2 = at::sign(R2.diagonal());
    sgn2.masked_fill_(sgn2 == 0, 1.0);
    Q = Q2.mul_(sgn2.unsqueeze(0));
  }
  X.narrow(1, good, nbad).copy_(Q);
}

struct SvdResult {
  Tensor S, U, Vh;
};

SvdResult svd_one(const Tensor& input, int64_t r, uint64_t seed) {
  const at::ScalarType dtype = input.scalar_type();
  const int64_t m = input.size(0), n = input.size(1);
  const bool wide = m <= n;
  const int64_t p = wide ? m : n;
  // Short side first: rows of A64 index the Gram matrix.
  Tensor A64 = wide ? input.to(at::kDouble).contiguous() : input.t().to(at::kDouble).contiguous();
  Tensor G = gram_lower(A64);  // p x p
  auto [lam, W] = at::linalg_eigh(G, "L");  // ascending
  Tensor lam_top = lam.flip(0).narrow(0, 0, r);
  Tensor W_top = W.flip(1).narrow(1, 0, r).contiguous();  // p x r
  Tensor s = lam_top.clamp_min(0.0).sqrt_();
  std::vector<double> sigma(r);
  {
    const double* sp = s.const_data_ptr<double>();
    std::copy(sp, sp + r, sigma.begin());
  }
  // X = A64^T W_top / sigma: q x r; zero where sigma is zero.
  Tensor X = at::mm(A64.t(), W_top);
  Tensor inv = at::empty({r}, s.options());
  {
    double* ip = inv.mutable_data_ptr<double>();
    for (int64_t j = 0; j < r; ++j) ip[j] = sigma[j] > 0 ? 1.0 / sigma[j] : 0.0;
  }
  X.mul_(inv.unsqueeze(0));
  fix_orthogonality(X, sigma, p, dtype, seed);
  SvdResult out;
  out.S = s.to(dtype);
  if (wide) {
    out.U = W_top.to(dtype).contiguous();
    out.Vh = X.t().to(dtype).contiguous();
  } else {
    out.U = X.to(dtype).contiguous();
    out.Vh = W_top.t().to(dtype).contiguous();
  }
  return out;
}

// Rough cost of one matrix in multiply-adds: Gram, eigen-solver, long-side product.
double svd_cost(const Tensor& a, int64_t r) {
  const double p = static_cast<double>(std::min(a.size(0), a.size(1)));
  const double q = static_cast<double>(std::max(a.size(0), a.size(1)));
  return 0.625 * p * p * q + 6.0 * p * p * p + static_cast<double>(r) * p * q;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> batched_svd_cpu(
    at::TensorList mats, std::optional<int64_t> k, int64_t niter, int64_t oversample, int64_t seed) {
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
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });

  std::vector<SvdResult> res(nmat);
  auto run = [&](int64_t i) {
    res[i] = svd_one(inputs[i], rank[i], static_cast<uint64_t>(seed) * 1000003ULL + static_cast<uint64_t>(i));
  };
  const int64_t nthreads = at::get_num_threads();
  // Matrices larger than a thread's share of the work go first, alone, with threaded BLAS.
  size_t first_queued = 0;
  if (nthreads > 1 && !at::in_parallel_region()) {
    while (first_queued < order.size() && cost[order[first_queued]] > total / static_cast<double>(nthreads)) {
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
        for (int64_t j = next.fetch_add(1); j < nq; j = next.fetch_add(1)) run(order[first_queued + j]);
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

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) {
  m.impl("batched_svd", &batched_svd_cpu);
}

}  // namespace svdgrow
