// batched_svd on CUDA: the SVD of many matrices of different shapes, every stage one kernel
// launch over all of them, no host synchronisation (so a call can be captured in a CUDA graph).
// The algorithm (exact and randomized paths, the float64 refinement) and its accuracy:
// docs/design.md, "Kernels: batched_svd on CUDA".
//
// Stages (one launch each, all problems): scale, pack, [sketch, gemm, orth, niter x
// (gemm, orth, gemm, orth), gemm], gemm (Gram), jacobi, [gemm (U)], gemm (X),
// [gemm (H), jacobi, gemm (X2), gemm (U2)], orth (V), finalize; [] = only where needed.
// The host plans from shapes only (plan_problems: problem table, workspace, GEMM lists), then
// uploads the table in one non-blocking copy from pinned memory and launches (launch_stages).
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_helpers.cuh"

namespace svdgrow {
namespace {

constexpr int kThreads = 256;         // flat kernels, GEMM, orthonormalisation
constexpr int kJacobiThreads = 1024;  // one block per eigenproblem (memory-latency bound)
constexpr int kMaxSweeps = 40;        // Jacobi converges in about 6-12 sweeps in float64
constexpr double kJacobiTol = 1e-14;  // rotate when |g_pq| > tol * sqrt(|g_pp g_qq|)
constexpr int kRotStride = 5;         // per pair: c, s, new g_pp, new g_qq, active

// GEMM tile: 64 x 64 outputs, 16-deep k slices, 256 threads with 4 x 4 outputs each.
constexpr int kBM = 64, kBN = 64, kBK = 16;

struct SvdProblem {
  uint64_t in_ptr;                // mats[i] (float32 or float64, any strides)
  int64_t in_s0, in_s1;           // its strides, in elements
  uint64_t s_ptr, u_ptr, vh_ptr;  // outputs (contiguous, input dtype)
  int32_t m, n;                   // shape of mats[i]
  int32_t s, L;                   // A' is s x L, s = min(m, n)
  int32_t l, r;        // subspace width (l = s on the exact path), singular triplets kept
  int32_t transposed;  // A' = A^T
  int32_t is_double;   // dtype of input and outputs
  int32_t refine;      // second Jacobi pass on X X^T (float64 inputs)
  int32_t pad_;
  // Workspace offsets, in float64 elements. y/p/ut exist on the randomized path only.
  int64_t scale_off, a_off, g_off, wt_off, ws_off, lam_off, rot_off, coef_off;
  int64_t y_off, p_off, ut_off, vt_off;
  int64_t u_off;     // r rows of length s holding U'^T: ws_off (exact) or ut_off (randomized)
  int64_t sig_off;   // r: norms of the rows of W^T B before normalisation (the singular values)
  int64_t perm_off;  // r int64: output position t takes triplet perm[t] (sigma descending)
  // Refinement (float64 only; -1 otherwise): H = X X^T (r x r) = W2 diag W2^T, its Jacobi
  // work (hwt) and sorted eigenvectors (hws), X2 = W2^T X (r x L), U2'^T = W2^T U'^T (r x s).
  int64_t h_off, hwt_off, hws_off, lam2_off, x2_off, u2_off;
  int64_t vfin_off, ufin_off;  // final V'^T rows (vt_off or x2_off), U'^T rows (u_off or u2_off)
};

// C (M x N, row stride c_rs, unit column stride) = A (M x K) B (K x N), arbitrary strides.
struct GemmDesc {
  int64_t begin;  // first tile of this product within the launch
  int64_t a_off, a_rs, a_cs;
  int64_t b_off, b_rs, b_cs;
  int64_t c_off, c_rs;
  int32_t M, N, K, tiles_n;
};

enum OrthTarget : int { kOrthY = 0, kOrthP = 1, kOrthV = 2 };

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ double load_input(const SvdProblem& P, int64_t i, int64_t j) {
  const int64_t off = i * P.in_s0 + j * P.in_s1;
  if (P.is_double) return reinterpret_cast<const double*>(P.in_ptr)[off];
  return static_cast<double>(reinterpret_cast<const float*>(P.in_ptr)[off]);
}

__device__ __forceinline__ void store_output(uint64_t ptr, int is_double, int64_t idx, double v) {
  if (is_double) {
    reinterpret_cast<double*>(ptr)[idx] = v;
  } else {
    reinterpret_cast<float*>(ptr)[idx] = static_cast<float>(v);
  }
}

// Stage: scale. One block per problem: the power of two that brings max|A| into [0.5, 1).
__global__ void __launch_bounds__(kThreads)
    batched_svd_scale_kernel(const SvdProblem* __restrict__ probs, double* __restrict__ ws) {
  __shared__ double sh[kThreads / 32];
  const SvdProblem& P = probs[blockIdx.x];
  const int64_t n = P.n;
  const int64_t total = static_cast<int64_t>(P.m) * n;
  double mx = 0.0;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    mx = fmax(mx, fabs(load_input(P, e / n, e % n)));
  }
  mx = block_max(mx, sh);
  if (threadIdx.x == 0) {
    double scale = 1.0;
    if (mx > 0.0 && isfinite(mx)) {
      int ex = 0;
      frexp(mx, &ex);
      scale = ldexp(1.0, ex);
    }
    ws[P.scale_off] = scale;
  }
}

// Stage: pack. A' (s x L, row-major, float64) = A or A^T, divided by the scale.
// grid (x: grid-stride over the problem, y: problem).
__global__ void __launch_bounds__(kThreads)
    batched_svd_pack_kernel(const SvdProblem* __restrict__ probs, double* __restrict__ ws) {
  const SvdProblem& P = probs[blockIdx.y];
  const int64_t L = P.L;
  const int64_t total = static_cast<int64_t>(P.s) * L;
  const double inv = 1.0 / ws[P.scale_off];
  double* A = ws + P.a_off;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = e / L, b = e % L;
    A[e] = (P.transposed ? load_input(P, b, a) : load_input(P, a, b)) * inv;
  }
}

// Stage: sketch. Omega^T (l x L) with standard normal entries into the P buffer, drawn from a
// counter-based hash of (seed, problem, entry). grid (x: grid-stride, y: randomized problem).
__global__ void __launch_bounds__(kThreads)
    batched_svd_sketch_kernel(const SvdProblem* __restrict__ probs,
                              const int32_t* __restrict__ plist, double* __restrict__ ws,
                              uint64_t seed_key) {
  const int pi = plist[blockIdx.y];
  const SvdProblem& P = probs[pi];
  const uint64_t key = splitmix64(seed_key ^ splitmix64(0x51ce0000ull + static_cast<uint64_t>(pi)));
  const int64_t total = static_cast<int64_t>(P.l) * P.L;
  double* Om = ws + P.p_off;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Om[e] = gaussian_hash(key, static_cast<uint64_t>(e));
  }
}

// Stage: GEMM over a list of products of different shapes; one block per 64 x 64 output tile,
// tiles of all products numbered one after another (GemmDesc::begin).
__global__ void __launch_bounds__(kThreads)
    batched_svd_gemm_kernel(const GemmDesc* __restrict__ descs, int ndesc,
                            double* __restrict__ ws) {
  __shared__ double As[kBK][kBM + 1];
  __shared__ double Bs[kBK][kBN + 1];

  const int64_t tile = blockIdx.x;
  const GemmDesc g = descs[find_segment(descs, ndesc, tile)];
  const int64_t local = tile - g.begin;
  const int64_t row0 = (local / g.tiles_n) * kBM;
  const int64_t col0 = (local % g.tiles_n) * kBN;
  const double* __restrict__ A = ws + g.a_off;
  const double* __restrict__ B = ws + g.b_off;
  double* __restrict__ C = ws + g.c_off;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  double acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;

  const bool a_k_contig = (g.a_cs == 1);
  const bool b_n_contig = (g.b_cs == 1);
  for (int64_t k0 = 0; k0 < g.K; k0 += kBK) {
    for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
      // Consecutive threads walk the unit-stride direction, so global loads coalesce.
      const int mm = a_k_contig ? e / kBK : e % kBM;
      const int kk = a_k_contig ? e % kBK : e / kBM;
      const int64_t gr = row0 + mm, gk = k0 + kk;
      As[kk][mm] = (gr < g.M && gk < g.K) ? A[gr * g.a_rs + gk * g.a_cs] : 0.0;
    }
    for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
      const int nn = b_n_contig ? e % kBN : e / kBK;
      const int kk = b_n_contig ? e / kBN : e % kBK;
      const int64_t gk = k0 + kk, gc = col0 + nn;
      Bs[kk][nn] = (gk < g.K && gc < g.N) ? B[gk * g.b_rs + gc * g.b_cs] : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      double a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gr = row0 + ty + 16 * i;
    if (gr >= g.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gc = col0 + tx + 16 * j;
      if (gc < g.N) C[gr * g.c_rs + gc] = acc[i][j];
    }
  }
}

// One classical Gram-Schmidt pass of row v = X[j] against rows X[0..j). All threads.
__device__ void cgs_pass(const double* __restrict__ X, double* v, int64_t len, int j,
                         double* coef) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int i = warp; i < j; i += nwarps) {
    const double* xi = X + static_cast<int64_t>(i) * len;
    double d = 0.0;
    for (int64_t c = lane; c < len; c += 32) d = fma(xi[c], v[c], d);
    d = warp_sum(d);
    if (lane == 0) coef[i] = d;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < len; c += blockDim.x) {
    double acc = 0.0;
    for (int i = 0; i < j; ++i) acc = fma(coef[i], X[static_cast<int64_t>(i) * len + c], acc);
    v[c] -= acc;
  }
  __syncthreads();
}

__device__ double row_norm(const double* v, int64_t len, double* sh) {
  double t = 0.0;
  for (int64_t c = threadIdx.x; c < len; c += blockDim.x) t = fma(v[c], v[c], t);
  return sqrt(block_sum(t, sh));
}

// Stage: orthonormalise the rows of an nvec x len block (nvec <= len), one block per problem,
// in order, by classical Gram-Schmidt applied twice ("twice is enough"). A row that the second
// pass shrinks by more than 1/sqrt(2), or that is numerically zero, lies in the span of the
// rows before it: it is replaced by a hashed Gaussian row, orthogonalised the same way, so the
// result always has orthonormal rows and stays deterministic.
__global__ void __launch_bounds__(kThreads)
    batched_svd_orth_kernel(const SvdProblem* __restrict__ probs, const int32_t* __restrict__ plist,
                            int target, double* ws, uint64_t key_base) {
  __shared__ double sh[kThreads / 32];
  const int pi = plist[blockIdx.x];
  const SvdProblem& P = probs[pi];
  int64_t off, len;
  int nvec;
  if (target == kOrthY) {
    off = P.y_off, nvec = P.l, len = P.s;
  } else if (target == kOrthP) {
    off = P.p_off, nvec = P.l, len = P.L;
  } else {
    off = P.vfin_off, nvec = P.r, len = P.L;
  }
  double* X = ws + off;
  double* coef = ws + P.coef_off;
  const uint64_t key =
      splitmix64(key_base ^ splitmix64(0x0127000000ull + static_cast<uint64_t>(pi)));

  const bool is_v = (target == kOrthV);
  double* sig = ws + P.sig_off;
  for (int j = 0; j < nvec; ++j) {
    double* v = X + static_cast<int64_t>(j) * len;
    if (is_v) {
      // sigma_j = ||X_j||, not sqrt(lambda_j): the row norm holds tiny singular values far
      // better than the Gram eigenvalue does, and U S Vh then rebuilds A' = W X.
      const double n0 = row_norm(v, len, sh);
      if (threadIdx.x == 0) sig[j] = n0;
    }
    cgs_pass(X, v, len, j, coef);
    const double n1 = row_norm(v, len, sh);
    cgs_pass(X, v, len, j, coef);
    double n2 = row_norm(v, len, sh);
    // n2, n1 are the same in every thread, so this branch is uniform over the block.
    if (!(n2 > 1e-290 && n2 >= 0.7071067811865476 * n1)) {
      for (int64_t c = threadIdx.x; c < len; c += blockDim.x) {
        v[c] = gaussian_hash(key, static_cast<uint64_t>(j) * static_cast<uint64_t>(len) + c);
      }
      __syncthreads();
      cgs_pass(X, v, len, j, coef);
      cgs_pass(X, v, len, j, coef);
      n2 = row_norm(v, len, sh);
    }
    const double inv = (n2 > 0.0) ? 1.0 / n2 : 0.0;
    for (int64_t c = threadIdx.x; c < len; c += blockDim.x) v[c] *= inv;
    __syncthreads();
  }
  if (!is_v) return;
  // The norms follow the eigenvalue order except among ties and rounding-level values: output
  // position t takes triplet perm[t], sigma descending (NaN last, ties by index).
  int64_t* perm = reinterpret_cast<int64_t*>(ws + P.perm_off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int i = warp; i < nvec; i += nwarps) {
    const double ki = isnan(sig[i]) ? -INFINITY : sig[i];
    int cnt = 0;
    for (int j = lane; j < nvec; j += 32) {
      const double kj = isnan(sig[j]) ? -INFINITY : sig[j];
      cnt += (kj > ki || (kj == ki && j < i)) ? 1 : 0;
    }
    cnt = warp_sum_int(cnt);
    if (lane == 0) perm[cnt] = i;
  }
}

// Round-robin (circle method) pairing: nplayers even, round in [0, nplayers - 1), k in
// [0, nplayers / 2). Every pair of players meets exactly once per sweep.
__device__ __forceinline__ void round_robin_pair(int round, int k, int nplayers, int& p, int& q) {
  const int nm1 = nplayers - 1;
  if (k == 0) {
    p = round;
    q = nm1;
  } else {
    p = (round + k) % nm1;
    q = (round - k + nm1) % nm1;
  }
}

// One Jacobi round, part 1 (all threads of the block): the rotation of each of the round's
// npairs disjoint pairs (c, s, new g_pp, new g_qq, active) into rot; sets *any_rotation when
// one is active.
__device__ void jacobi_rotations(const double* G, int l, double* rot, int round, int nplayers,
                                 int npairs, int* any_rotation) {
  for (int k = threadIdx.x; k < npairs; k += blockDim.x) {
    int p, q;
    round_robin_pair(round, k, nplayers, p, q);
    double c = 1.0, s = 0.0, npp = 0.0, nqq = 0.0, active = 0.0;
    if (p < l && q < l) {
      const double app = G[static_cast<int64_t>(p) * l + p];
      const double aqq = G[static_cast<int64_t>(q) * l + q];
      const double apq = G[static_cast<int64_t>(p) * l + q];
      if (fabs(apq) > 1e-300 && fabs(apq) > kJacobiTol * sqrt(fabs(app) * fabs(aqq))) {
        // Golub & Van Loan, sym.schur2: J = [c s; -s c] zeroes G(p, q) in J^T G J.
        const double tau = (aqq - app) / (2.0 * apq);
        const double t = copysign(1.0, tau) / (fabs(tau) + hypot(1.0, tau));
        c = 1.0 / sqrt(1.0 + t * t);
        s = t * c;
        npp = app - t * apq;
        nqq = aqq + t * apq;
        active = 1.0;
        *any_rotation = 1;
      }
    }
    double* rk = rot + static_cast<int64_t>(kRotStride) * k;
    rk[0] = c;
    rk[1] = s;
    rk[2] = npp;
    rk[3] = nqq;
    rk[4] = active;
  }
  __syncthreads();
}

// One Jacobi round, part 2 (all threads of the block): applies the round's rotations,
// G <- J^T G J and Wt <- J^T Wt (so that W <- W J), then writes the rotated pairs exactly
// (zeros off the diagonal, the closed-form diagonal).
__device__ void jacobi_apply(double* G, double* Wt, int l, const double* rot, int round,
                             int nplayers, int npairs) {
  const int64_t pair_work = static_cast<int64_t>(npairs) * l;
  // Rows: G <- J^T G and Wt <- J^T Wt.
  for (int64_t e = threadIdx.x; e < pair_work; e += blockDim.x) {
    const int k = static_cast<int>(e / l);
    const int64_t col = e % l;
    const double* rk = rot + static_cast<int64_t>(kRotStride) * k;
    if (rk[4] == 0.0) continue;
    const double c = rk[0], s = rk[1];
    int p, q;
    round_robin_pair(round, k, nplayers, p, q);
    double* gp = G + static_cast<int64_t>(p) * l + col;
    double* gq = G + static_cast<int64_t>(q) * l + col;
    const double x = *gp, y = *gq;
    *gp = c * x - s * y;
    *gq = s * x + c * y;
    double* wp = Wt + static_cast<int64_t>(p) * l + col;
    double* wq = Wt + static_cast<int64_t>(q) * l + col;
    const double u = *wp, w = *wq;
    *wp = c * u - s * w;
    *wq = s * u + c * w;
  }
  __syncthreads();
  // Columns: G <- G J.
  for (int64_t e = threadIdx.x; e < pair_work; e += blockDim.x) {
    const int k = static_cast<int>(e % npairs);
    const int64_t row = e / npairs;
    const double* rk = rot + static_cast<int64_t>(kRotStride) * k;
    if (rk[4] == 0.0) continue;
    const double c = rk[0], s = rk[1];
    int p, q;
    round_robin_pair(round, k, nplayers, p, q);
    double* gp = G + row * l + p;
    double* gq = G + row * l + q;
    const double x = *gp, y = *gq;
    *gp = c * x - s * y;
    *gq = s * x + c * y;
  }
  __syncthreads();
  // The rotated pair: exact zeros off the diagonal, the closed-form diagonal.
  for (int k = threadIdx.x; k < npairs; k += blockDim.x) {
    const double* rk = rot + static_cast<int64_t>(kRotStride) * k;
    if (rk[4] == 0.0) continue;
    int p, q;
    round_robin_pair(round, k, nplayers, p, q);
    G[static_cast<int64_t>(p) * l + q] = 0.0;
    G[static_cast<int64_t>(q) * l + p] = 0.0;
    G[static_cast<int64_t>(p) * l + p] = rk[2];
    G[static_cast<int64_t>(q) * l + q] = rk[3];
  }
  __syncthreads();
}

// Sorts the eigenvalues (G's diagonal) descending into lam (NaN last, ties by index) and the
// matching eigenvectors (rows of Wt) into the rows of Ws: the rank of eigenvalue i is the
// number of eigenvalues ahead of it. One warp per eigenvalue; all threads of the block.
__device__ void jacobi_sort(const double* G, const double* Wt, int l, double* lam, double* Ws) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int i = warp; i < l; i += nwarps) {
    const double gi = G[static_cast<int64_t>(i) * l + i];
    const double ki = isnan(gi) ? -INFINITY : gi;
    int cnt = 0;
    for (int j = lane; j < l; j += 32) {
      const double gj = G[static_cast<int64_t>(j) * l + j];
      const double kj = isnan(gj) ? -INFINITY : gj;
      cnt += (kj > ki || (kj == ki && j < i)) ? 1 : 0;
    }
    cnt = warp_sum_int(cnt);
    if (lane == 0) lam[cnt] = gi;
    for (int c = lane; c < l; c += 32) {
      Ws[static_cast<int64_t>(cnt) * l + c] = Wt[static_cast<int64_t>(i) * l + c];
    }
  }
}

// Stage: symmetric eigen-solve, one block per problem (plist), by cyclic Jacobi in parallel
// (round-robin) order: each round rotates l/2 disjoint pairs at once (rows, then columns;
// eigenvectors kept as the rows of Wt). A sweep without any rotation ends the iteration;
// kMaxSweeps bounds it. Then eigenvalues sorted descending into lam, and the matching
// eigenvectors into the rows of Ws. Pass 0: G (l x l). Pass 1 (refinement): H (r x r).
// The matrix lives in global memory (256 x 256 float64 does not fit in shared memory).
__global__ void __launch_bounds__(kJacobiThreads)
    batched_svd_jacobi_kernel(const SvdProblem* __restrict__ probs,
                              const int32_t* __restrict__ plist, int pass, double* ws) {
  __shared__ int any_rotation;
  const SvdProblem& P = probs[plist[blockIdx.x]];
  const int l = pass == 0 ? P.l : P.r;
  const int64_t ll = static_cast<int64_t>(l) * l;
  double* G = ws + (pass == 0 ? P.g_off : P.h_off);
  double* Wt = ws + (pass == 0 ? P.wt_off : P.hwt_off);
  double* rot = ws + P.rot_off;
  const int nplayers = l + (l & 1);
  const int npairs = nplayers / 2;
  const int nrounds = nplayers - 1;

  for (int64_t e = threadIdx.x; e < ll; e += blockDim.x) Wt[e] = (e / l == e % l) ? 1.0 : 0.0;
  __syncthreads();
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    if (threadIdx.x == 0) any_rotation = 0;
    __syncthreads();
    for (int round = 0; round < nrounds; ++round) {
      jacobi_rotations(G, l, rot, round, nplayers, npairs, &any_rotation);
      jacobi_apply(G, Wt, l, rot, round, nplayers, npairs);
    }
    const bool done = (any_rotation == 0);
    __syncthreads();  // every thread has read the flag before thread 0 clears it
    if (done) break;
  }
  jacobi_sort(G, Wt, l, ws + (pass == 0 ? P.lam_off : P.lam2_off),
              ws + (pass == 0 ? P.ws_off : P.hws_off));
}

// Stage: finalize. S, U, Vh in the input dtype and orientation. grid (x: grid-stride, y: problem).
__global__ void __launch_bounds__(kThreads)
    batched_svd_finalize_kernel(const SvdProblem* __restrict__ probs,
                                const double* __restrict__ ws) {
  const SvdProblem& P = probs[blockIdx.y];
  const int64_t r = P.r, m = P.m, n = P.n, s = P.s, L = P.L;
  const int64_t nu = m * r, nv = r * n;
  const int64_t total = r + nu + nv;
  const double scale = ws[P.scale_off];
  const double* sig = ws + P.sig_off;
  const int64_t* perm = reinterpret_cast<const int64_t*>(ws + P.perm_off);
  const double* urows = ws + P.ufin_off;  // U'^T, r x s
  const double* vt = ws + P.vfin_off;     // V'^T, r x L
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (e < r) {
      store_output(P.s_ptr, P.is_double, e, scale * sig[perm[e]]);
    } else if (e < r + nu) {
      const int64_t idx = e - r;  // U is m x r
      const int64_t i = idx / r, j = perm[idx % r];
      const double v = P.transposed ? vt[j * L + i] : urows[j * s + i];
      store_output(P.u_ptr, P.is_double, idx, v);
    } else {
      const int64_t idx = e - r - nu;  // Vh is r x n
      const int64_t j = perm[idx / n], c = idx % n;
      const double v = P.transposed ? urows[j * s + c] : vt[j * L + c];
      store_output(P.vh_ptr, P.is_double, idx, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning
// ---------------------------------------------------------------------------------------------

class GemmList {
 public:
  void add(int64_t M, int64_t N, int64_t K, int64_t a_off, int64_t a_rs, int64_t a_cs,
           int64_t b_off, int64_t b_rs, int64_t b_cs, int64_t c_off, int64_t c_rs) {
    GemmDesc g{};
    g.begin = tiles_;
    g.a_off = a_off, g.a_rs = a_rs, g.a_cs = a_cs;
    g.b_off = b_off, g.b_rs = b_rs, g.b_cs = b_cs;
    g.c_off = c_off, g.c_rs = c_rs;
    g.M = static_cast<int32_t>(M), g.N = static_cast<int32_t>(N), g.K = static_cast<int32_t>(K);
    g.tiles_n = static_cast<int32_t>(ceil_div(N, kBN));
    tiles_ += ceil_div(M, kBM) * g.tiles_n;
    descs_.push_back(g);
  }
  bool empty() const { return descs_.empty(); }
  int size() const { return static_cast<int>(descs_.size()); }
  int64_t tiles() const { return tiles_; }
  const std::vector<GemmDesc>& descs() const { return descs_; }
  int64_t table_off = -1;

 private:
  std::vector<GemmDesc> descs_;
  int64_t tiles_ = 0;
};

// Everything one call needs, from shapes only: the problem table, the problem lists, the
// workspace size, the GEMM stages and the (allocated) outputs.
struct SvdPlan {
  std::vector<SvdProblem> probs;
  std::vector<int32_t> all, rand, ref;  // every problem; randomized path; float64 refinement
  int64_t ws_size = 0;                  // workspace, in float64 elements
  int64_t max_pack = 1, max_rand = 1, max_fin = 1;  // largest per-problem work of three stages
  GemmList g_y, g_z, g_gram, g_u, g_v, g_h, g_x2, g_u2;
  std::vector<at::Tensor> S, U, Vh;

  // A workspace piece of `count` float64 elements, 256-byte aligned.
  int64_t take(int64_t count) {
    const int64_t off = ws_size;
    ws_size += ceil_div(std::max<int64_t>(count, 1), 32) * 32;
    return off;
  }
};

// One matrix's entry of the problem table, its outputs and its workspace pieces.
void plan_problem(SvdPlan& plan, const at::Tensor& A, std::optional<int64_t> k,
                  int64_t oversample) {
  const int64_t m = A.size(0), n = A.size(1);
  const int64_t s = std::min(m, n), L = std::max(m, n);
  const int64_t r = k.has_value() ? *k : s;
  const auto opts = A.options();
  plan.S.push_back(at::empty({r}, opts));
  plan.U.push_back(at::empty({m, r}, opts));
  plan.Vh.push_back(at::empty({r, n}, opts));

  const int64_t l = k.has_value() ? std::min(*k + std::min(oversample, s), s) : s;
  const bool exact = (l == s);
  const int32_t index = static_cast<int32_t>(plan.probs.size());
  SvdProblem P{};
  P.in_ptr = reinterpret_cast<uint64_t>(A.data_ptr());
  P.in_s0 = A.stride(0), P.in_s1 = A.stride(1);
  P.s_ptr = reinterpret_cast<uint64_t>(plan.S.back().data_ptr());
  P.u_ptr = reinterpret_cast<uint64_t>(plan.U.back().data_ptr());
  P.vh_ptr = reinterpret_cast<uint64_t>(plan.Vh.back().data_ptr());
  P.m = static_cast<int32_t>(m), P.n = static_cast<int32_t>(n);
  P.s = static_cast<int32_t>(s), P.L = static_cast<int32_t>(L);
  P.l = static_cast<int32_t>(l), P.r = static_cast<int32_t>(r);
  P.transposed = (m > n) ? 1 : 0;
  P.is_double = (A.scalar_type() == at::kDouble) ? 1 : 0;
  P.scale_off = plan.take(1);
  P.a_off = plan.take(s * L);
  P.g_off = plan.take(l * l);
  P.wt_off = plan.take(l * l);
  P.ws_off = plan.take(l * l);
  P.lam_off = plan.take(l);
  P.rot_off = plan.take(kRotStride * ((l + 1) / 2));
  P.coef_off = plan.take(l);
  P.vt_off = plan.take(r * L);
  P.sig_off = plan.take(r);
  P.perm_off = plan.take(r);
  if (exact) {
    P.y_off = P.p_off = P.ut_off = -1;
    P.u_off = P.ws_off;  // U'^T = first r rows of Ws (rows of length l = s)
  } else {
    P.y_off = plan.take(l * s);
    P.p_off = plan.take(l * L);
    P.ut_off = plan.take(r * s);
    P.u_off = P.ut_off;
    plan.rand.push_back(index);
    plan.max_rand = std::max(plan.max_rand, l * L);
  }
  P.vfin_off = P.vt_off;
  P.ufin_off = P.u_off;
  P.refine = P.is_double;
  if (P.refine) {
    P.h_off = plan.take(r * r);
    P.hwt_off = plan.take(r * r);
    P.hws_off = plan.take(r * r);
    P.lam2_off = plan.take(r);
    P.x2_off = plan.take(r * L);
    P.u2_off = plan.take(r * s);
    P.vfin_off = P.x2_off;
    P.ufin_off = P.u2_off;
    plan.ref.push_back(index);
  } else {
    P.h_off = P.hwt_off = P.hws_off = P.lam2_off = P.x2_off = P.u2_off = -1;
  }
  plan.all.push_back(index);
  plan.max_pack = std::max(plan.max_pack, s * L);
  plan.max_fin = std::max(plan.max_fin, r + m * r + r * n);
  plan.probs.push_back(P);
}

// The GEMM stages. Buffers (row-major): A' s x L; Y^T l x s (columns of Y as rows); P buffer
// l x L (Omega^T, then Z^T, then B); G, Wt, Ws l x l; U'^T r x s; V'^T r x L.
void plan_gemms(SvdPlan& plan) {
  for (const SvdProblem& P : plan.probs) {
    const int64_t s = P.s, L = P.L, l = P.l, r = P.r;
    const bool exact = P.y_off < 0;
    if (!exact) {
      // Y^T (l x s) = Pbuf (l x L) * A'^T          [Y = A' Omega, then Y = A' P]
      plan.g_y.add(l, s, L, P.p_off, L, 1, P.a_off, 1, L, P.y_off, s);
      // Pbuf (l x L) = Y^T (l x s) * A' (s x L)     [Z^T = Q^T A', and finally B = Q^T A']
      plan.g_z.add(l, L, s, P.y_off, s, 1, P.a_off, L, 1, P.p_off, L);
      // U'^T (r x s) = Ws[:r] (r x l) * Q^T (l x s)
      plan.g_u.add(r, s, l, P.ws_off, l, 1, P.y_off, s, 1, P.ut_off, s);
    }
    const int64_t bmat = exact ? P.a_off : P.p_off;  // B, l x L
    // G (l x l) = B B^T
    plan.g_gram.add(l, l, L, bmat, L, 1, bmat, 1, L, P.g_off, l);
    // V'^T before normalisation (r x L) = Ws[:r] (r x l) * B (l x L)
    plan.g_v.add(r, L, l, P.ws_off, l, 1, bmat, L, 1, P.vt_off, L);
    if (P.refine) {
      // H (r x r) = X X^T, X = V'^T before normalisation
      plan.g_h.add(r, r, L, P.vt_off, L, 1, P.vt_off, 1, L, P.h_off, r);
      // X2 (r x L) = W2^T X and U2'^T (r x s) = W2^T U'^T, W2^T = rows of hws
      plan.g_x2.add(r, L, r, P.hws_off, r, 1, P.vt_off, L, 1, P.x2_off, L);
      plan.g_u2.add(r, s, r, P.hws_off, r, 1, P.u_off, s, 1, P.u2_off, s);
    }
  }
}

SvdPlan plan_problems(at::TensorList mats, std::optional<int64_t> k, int64_t oversample) {
  SvdPlan plan;
  const size_t nmat = mats.size();
  plan.S.reserve(nmat), plan.U.reserve(nmat), plan.Vh.reserve(nmat);
  for (const at::Tensor& A : mats) plan_problem(plan, A, k, oversample);
  plan_gemms(plan);
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Host side: launching
// ---------------------------------------------------------------------------------------------

// The plan's table on the device, and where each part of it lies.
struct DeviceTable {
  at::Tensor bytes;  // keeps the upload alive until the call returns (the stream orders reuse)
  const SvdProblem* probs = nullptr;
  const int32_t* all = nullptr;
  const int32_t* rand = nullptr;
  const int32_t* ref = nullptr;
  const uint8_t* base = nullptr;
};

// Problems, problem lists and GEMM descriptors in one table, one upload.
DeviceTable upload_plan(SvdPlan& plan, const at::Device& device) {
  HostTable table;
  const int64_t off_probs = table.append(plan.probs);
  const int64_t off_all = table.append(plan.all);
  const int64_t off_rand = plan.rand.empty() ? -1 : table.append(plan.rand);
  const int64_t off_ref = plan.ref.empty() ? -1 : table.append(plan.ref);
  for (GemmList* gl : {&plan.g_y, &plan.g_z, &plan.g_gram, &plan.g_u, &plan.g_v, &plan.g_h,
                       &plan.g_x2, &plan.g_u2}) {
    if (!gl->empty()) gl->table_off = table.append(gl->descs());
  }
  DeviceTable t;
  t.bytes = table.upload(device);
  t.base = t.bytes.data_ptr<uint8_t>();
  t.probs = reinterpret_cast<const SvdProblem*>(t.base + off_probs);
  t.all = reinterpret_cast<const int32_t*>(t.base + off_all);
  t.rand = off_rand >= 0 ? reinterpret_cast<const int32_t*>(t.base + off_rand) : nullptr;
  t.ref = off_ref >= 0 ? reinterpret_cast<const int32_t*>(t.base + off_ref) : nullptr;
  return t;
}

// The two launch helpers that most stages use, bound to one stream, table and workspace.
struct StageLauncher {
  cudaStream_t stream;
  const DeviceTable& t;
  double* ws;
  uint64_t seed_key;
  uint64_t orth_salt = 0;  // a fresh random stream for every orthonormalisation

  void gemm(const GemmList& gl) {
    if (gl.empty()) return;
    TORCH_CHECK(gl.tiles() < (int64_t{1} << 31), "batched_svd (CUDA): too many GEMM tiles");
    batched_svd_gemm_kernel<<<static_cast<unsigned>(gl.tiles()), kThreads, 0, stream>>>(
        reinterpret_cast<const GemmDesc*>(t.base + gl.table_off), gl.size(), ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void orth(const int32_t* plist, unsigned count, int target) {
    if (count == 0) return;
    ++orth_salt;
    batched_svd_orth_kernel<<<count, kThreads, 0, stream>>>(t.probs, plist, target, ws,
                                                            splitmix64(seed_key + orth_salt));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Randomized problems: the range finder, ending with B = Q^T A' in the P buffer.
void launch_range_finder(StageLauncher& run, const SvdPlan& plan, int64_t niter) {
  const unsigned nrand = static_cast<unsigned>(plan.rand.size());
  if (nrand == 0) return;
  batched_svd_sketch_kernel<<<dim3(grid_blocks(plan.max_rand, kThreads, 1024), nrand), kThreads, 0,
                              run.stream>>>(run.t.probs, run.t.rand, run.ws, run.seed_key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run.gemm(plan.g_y);                   // Y = A' Omega
  run.orth(run.t.rand, nrand, kOrthY);  // Q
  for (int64_t it = 0; it < niter; ++it) {
    run.gemm(plan.g_z);                   // Z = A'^T Q
    run.orth(run.t.rand, nrand, kOrthP);  // P = orth(Z)
    run.gemm(plan.g_y);                   // Y = A' P
    run.orth(run.t.rand, nrand, kOrthY);  // Q = orth(Y)
  }
  run.gemm(plan.g_z);  // B = Q^T A'
}

// Launches every stage on the current stream, in order (see the stage list at the top).
void launch_stages(SvdPlan& plan, int64_t niter, int64_t seed, const at::Device& device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::Tensor ws_t = at::empty({std::max<int64_t>(plan.ws_size, 1)},
                              at::TensorOptions().dtype(at::kDouble).device(device));
  const DeviceTable t = upload_plan(plan, device);
  StageLauncher run{stream, t, ws_t.data_ptr<double>(), splitmix64(static_cast<uint64_t>(seed))};
  const unsigned nprob = static_cast<unsigned>(plan.probs.size());
  const unsigned nref = static_cast<unsigned>(plan.ref.size());

  batched_svd_scale_kernel<<<nprob, kThreads, 0, stream>>>(t.probs, run.ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  batched_svd_pack_kernel<<<dim3(grid_blocks(plan.max_pack, kThreads, 1024), nprob), kThreads, 0,
                            stream>>>(t.probs, run.ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_range_finder(run, plan, niter);
  run.gemm(plan.g_gram);  // G = B B^T
  batched_svd_jacobi_kernel<<<nprob, kJacobiThreads, 0, stream>>>(t.probs, t.all, 0, run.ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run.gemm(plan.g_u);  // U' = Q W (randomized problems)
  run.gemm(plan.g_v);  // X = W^T B (V'^T before normalisation)
  if (nref > 0) {      // float64: second pass on X X^T
    run.gemm(plan.g_h);
    batched_svd_jacobi_kernel<<<nref, kJacobiThreads, 0, stream>>>(t.probs, t.ref, 1, run.ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    run.gemm(plan.g_x2);
    run.gemm(plan.g_u2);
  }
  run.orth(t.all, nprob, kOrthV);  // sigma = row norms; normalise, re-orthonormalise
  batched_svd_finalize_kernel<<<dim3(grid_blocks(plan.max_fin, kThreads, 1024), nprob), kThreads, 0,
                                stream>>>(t.probs, run.ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

BatchedSvdOutput batched_svd_cuda(at::TensorList mats, std::optional<int64_t> k, int64_t niter,
                                  int64_t oversample, int64_t seed) {
  check_batched_svd_args(mats, k, niter, oversample);  // the CPU kernel's checks and messages
  const int64_t nmat = static_cast<int64_t>(mats.size());
  const at::Device device = mats[0].device();  // every matrix is on it (checked above)
  TORCH_CHECK(device.is_cuda(), "batched_svd (CUDA kernel): mats[0] is on ", device,
              "; expected CUDA tensors");
  TORCH_CHECK(nmat <= 65535, "batched_svd (CUDA kernel): at most 65535 matrices per call, got ",
              nmat, "; split the list");
  for (int64_t i = 0; i < nmat; ++i) {
    TORCH_CHECK(mats[i].size(0) < (int64_t{1} << 31) && mats[i].size(1) < (int64_t{1} << 31),
                "batched_svd (CUDA kernel): mats[", i, "] of shape ", mats[i].sizes(),
                " has a dimension of 2^31 or more");
  }
  c10::cuda::CUDAGuard guard(device);
  SvdPlan plan = plan_problems(mats, k, oversample);
  launch_stages(plan, niter, seed, device);
  return BatchedSvdOutput(std::move(plan.S), std::move(plan.U), std::move(plan.Vh));
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CUDA, m) { m.impl("batched_svd", TORCH_FN(batched_svd_cuda)); }

}  // namespace svdgrow
