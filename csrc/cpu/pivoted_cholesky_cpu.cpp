// pivoted_cholesky on the CPU: the greedy pivots of many PSD Gram matrices in one call.
//
// Which channels a prune keeps (docs/design.md, "Kernels: pivoted_cholesky"). The algorithm is
// the blocked one of svdgrow/surgery/pivots.py (pivoted_cholesky), whose per-pivot steps are a
// dozen small tensor ops each when run from Python: here a panel of `block` pivots is chosen
// with plain loops over the panel's columns (O(rows * block) per pivot), then the Schur
// complement of the rows not chosen yet is updated with one BLAS product. Matrices of 256 rows
// or more run one after the other (their GEMMs use every thread); the smaller ones go to
// at::parallel_for, where the GEMM inside a worker runs single-threaded.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace svdgrow {
namespace {

using at::Tensor;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// From this many rows on, a matrix's panel updates are large enough for a multi-threaded GEMM.
constexpr int64_t kLargeMatrix = 256;

// The first `r` greedy pivots of one PSD matrix (its float64 copy), in the order chosen.
std::vector<int64_t> pivots_one(const Tensor& gram, int64_t r, int64_t block) {
  Tensor S = gram.to(at::kDouble).contiguous().clone();  // Schur complement on `rows`
  int64_t m = S.size(0);
  std::vector<int64_t> rows(m);
  std::vector<double> residual(m);
  double scale = 0.0;
  {
    const double* s = S.data_ptr<double>();
    for (int64_t i = 0; i < m; ++i) {
      rows[i] = i;
      residual[i] = s[i * m + i];
      scale = std::max(scale, std::abs(residual[i]));
    }
  }
  const double tiny = 1e-14 * scale;
  std::vector<int64_t> order;
  order.reserve(r);
  while (static_cast<int64_t>(order.size()) < r) {
    const int64_t kb = std::min<int64_t>(block, r - static_cast<int64_t>(order.size()));
    Tensor panel = at::zeros({m, kb}, S.options());
    double* P = panel.data_ptr<double>();
    const double* s = S.data_ptr<double>();
    for (int64_t k = 0; k < kb; ++k) {
      int64_t j = 0;  // argmax, first of ties (as torch.argmax)
      for (int64_t i = 1; i < m; ++i) {
        if (residual[i] > residual[j]) j = i;
      }
      order.push_back(rows[j]);
      const double dj = residual[j];
      if (dj > tiny) {
        const double inv = 1.0 / std::sqrt(dj);
        const double* pj = P + j * kb;
        const double* sj = s + j * m;
        for (int64_t i = 0; i < m; ++i) {
          const double* pi = P + i * kb;
          double dot = 0.0;
          for (int64_t q = 0; q < k; ++q) dot += pi[q] * pj[q];
          const double v = (sj[i] - dot) * inv;
          P[i * kb + k] = v;
          residual[i] -= v * v;
        }
      }
      residual[j] = kNegInf;
    }
    if (static_cast<int64_t>(order.size()) >= r) break;
    std::vector<int64_t> left;
    left.reserve(m);
    for (int64_t i = 0; i < m; ++i) {
      if (std::isfinite(residual[i])) left.push_back(i);
    }
    Tensor idx = at::tensor(left, at::TensorOptions().dtype(at::kLong));
    Tensor Pl = panel.index_select(0, idx);
    S = at::addmm(S.index_select(0, idx).index_select(1, idx), Pl, Pl.t(), 1.0, -1.0).contiguous();
    std::vector<double> res2(left.size());
    std::vector<int64_t> rows2(left.size());
    for (size_t t = 0; t < left.size(); ++t) {
      res2[t] = residual[left[t]];
      rows2[t] = rows[left[t]];
    }
    residual.swap(res2);
    rows.swap(rows2);
    m = static_cast<int64_t>(left.size());
  }
  return order;
}

std::vector<Tensor> pivoted_cholesky_cpu(at::TensorList grams, at::IntArrayRef r, int64_t block) {
  check_pivoted_cholesky_args(grams, r, block);
  const int64_t n = static_cast<int64_t>(grams.size());
  std::vector<Tensor> inputs(grams.begin(), grams.end());
  std::vector<std::vector<int64_t>> orders(n);
  // Large matrices one after the other, so that their Schur updates use every thread; the
  // small ones (a DenseNet's many groups) side by side, each single-threaded.
  std::vector<int64_t> small;
  for (int64_t i = 0; i < n; ++i) {
    if (inputs[i].size(0) >= kLargeMatrix) {
      orders[i] = pivots_one(inputs[i], r[i], block);
    } else {
      small.push_back(i);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      orders[small[k]] = pivots_one(inputs[small[k]], r[small[k]], block);
    }
  });
  std::vector<Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(at::tensor(orders[i], at::TensorOptions().dtype(at::kLong)));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) { m.impl("pivoted_cholesky", TORCH_FN(pivoted_cholesky_cpu)); }

}  // namespace svdgrow
