// Helpers shared by the svdgrow CUDA kernels: device reductions, a counter-based Gaussian
// generator, segment lookup in a problem table, and the host side of the table (built from
// shapes on the host, uploaded with one non-blocking copy from pinned memory, so that no op
// synchronises with the host and every op can be captured in a CUDA graph).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace svdgrow {

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `total` items: enough to fill the GPU, never more than
// `cap` (grid-stride loops cover the rest).
inline unsigned int grid_blocks(int64_t total, int threads, int64_t cap = 4096) {
  int64_t b = ceil_div(std::max<int64_t>(total, 1), threads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, cap)));
}

// A byte table built on the host. Sections are 16-byte aligned; kernels receive the device base
// pointer plus a section's offset. Records hold device pointers of tensors allocated before the
// table is built, never pointers into the table itself.
class HostTable {
 public:
  template <typename T>
  int64_t append(const T* data, size_t count) {
    static_assert(std::is_trivially_copyable<T>::value, "table records must be trivially copyable");
    const int64_t off = reserve(sizeof(T) * count);
    if (count > 0) std::memcpy(bytes_.data() + off, data, sizeof(T) * count);
    return off;
  }
  template <typename T>
  int64_t append(const std::vector<T>& v) {
    return append(v.data(), v.size());
  }
  int64_t reserve(size_t nbytes) {
    const size_t off = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(off + nbytes);
    return static_cast<int64_t>(off);
  }
  size_t size() const { return bytes_.size(); }

  // One pinned host buffer, one cudaMemcpyAsync on the current stream. The pinned block is
  // recorded against the stream by copy_ (non_blocking), so the caching host allocator keeps it
  // until the copy has run (and, for a block used during graph capture, for good).
  at::Tensor upload(const at::Device& device) const {
    const int64_t n = std::max<int64_t>(static_cast<int64_t>(bytes_.size()), 16);
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memset(host.data_ptr(), 0, static_cast<size_t>(n));
    if (!bytes_.empty()) std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
    dev.copy_(host, /*non_blocking=*/true);
    return dev;
  }

 private:
  std::vector<uint8_t> bytes_;
};

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the same value (same order of additions). `sh` must
// hold blockDim.x / 32 doubles. Must be reached by all threads of the block. blockDim.x must be
// a multiple of 32.
__device__ __forceinline__ double block_sum(double v, double* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // earlier readers of sh are done
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0.0;
  for (int i = 0; i < nwarps; ++i) t += sh[i];
  return t;
}

__device__ __forceinline__ double block_max(double v, double* sh) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0.0;
  for (int i = 0; i < nwarps; ++i) t = fmax(t, sh[i]);
  return t;
}

__host__ __device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A standard normal number that depends only on (key, idx): counter-based, so every thread
// draws its own entries in any order and the result does not depend on the launch shape.
__device__ __forceinline__ double gaussian_hash(uint64_t key, uint64_t idx) {
  const uint64_t h1 = splitmix64(key ^ splitmix64(2 * idx));
  const uint64_t h2 = splitmix64(key ^ splitmix64(2 * idx + 1));
  const double inv53 = 1.0 / 9007199254740992.0;                    // 2^-53
  const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * inv53;  // (0, 1]
  const double u2 = static_cast<double>(h2 >> 11) * inv53;          // [0, 1)
  return sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);
}

// Index of the record whose [begin, begin + count) holds x, for records sorted by `begin`
// (a member of every record type that uses it) and x inside the covered range.
template <typename Rec>
__device__ __forceinline__ int find_segment(const Rec* recs, int n, int64_t x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (recs[mid].begin <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace svdgrow
