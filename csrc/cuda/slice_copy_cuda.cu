// slice_copy / slice_copy_ on CUDA: one kernel launch per element size for all tensors.
//
// The [R, C, B] contract, the checks and the aliasing rules: docs/design.md, "Kernels:
// slice_copy" (shared with the CPU kernel through csrc/common.h). Index values are validated on
// the host before any data moves: all indices are packed into one device buffer and copied to
// the host once, the op's only synchronisation (so slice_copy is not CUDA-graph capturable;
// batched_svd is). The copy moves raw bits, so all dtypes of one element size share a launch: a
// device table of entries (pointers, sizes, index pointers, first element), uploaded in one
// non-blocking copy from pinned memory; grid-stride over all destination elements, binary
// search for the entry.
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_helpers.cuh"

namespace svdgrow {
namespace {

constexpr int kThreads = 256;

struct SliceEntry {
  int64_t begin;            // first destination element of this tensor within the launch
  int64_t count;            // destination elements
  uint64_t src, dst, fill;  // fill == 0: zeros
  uint64_t rows, cols;      // int64 index arrays on the device; 0: identity
  int64_t C, Cn, B;         // source channels, destination channels, block
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    slice_copy_kernel(const SliceEntry* __restrict__ entries, int nentries, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const SliceEntry& E = entries[find_segment(entries, nentries, e)];
    const int64_t local = e - E.begin;
    const int64_t B = E.B, Cn = E.Cn;
    const int64_t b = local % B;
    const int64_t t = local / B;
    const int64_t cd = t % Cn, rd = t / Cn;
    const int64_t sr = E.rows ? reinterpret_cast<const int64_t*>(E.rows)[rd] : rd;
    const int64_t sc = E.cols ? reinterpret_cast<const int64_t*>(E.cols)[cd] : cd;
    T v;
    if (sr < 0 || sc < 0) {
      v = E.fill ? reinterpret_cast<const T*>(E.fill)[local] : T(0);
    } else {
      v = reinterpret_cast<const T*>(E.src)[(sr * E.C + sc) * B + b];
    }
    reinterpret_cast<T*>(E.dst)[local] = v;
  }
}

template <typename T>
void launch_group(const std::vector<SliceEntry>& entries, int64_t entries_off, const uint8_t* base,
                  cudaStream_t stream) {
  if (entries.empty()) return;
  const int64_t total = entries.back().begin + entries.back().count;
  slice_copy_kernel<T><<<grid_blocks(total, kThreads), kThreads, 0, stream>>>(
      reinterpret_cast<const SliceEntry*>(base + entries_off), static_cast<int>(entries.size()),
      total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Checks every index value on the host (one copy, before anything is written), and returns
// the packed device buffer with each index's offset in it (-1: None).
struct PackedIndices {
  at::Tensor packed;
  std::vector<int64_t> row_at, col_at;
};

PackedIndices pack_and_check_indices(const std::vector<SliceGeometry>& geo, const SliceInputs& in) {
  const size_t n = geo.size();
  PackedIndices out;
  out.row_at.assign(n, -1);
  out.col_at.assign(n, -1);
  std::vector<at::Tensor> idx;
  int64_t len = 0;
  for (size_t i = 0; i < n; ++i) {
    if (in.rows[i].defined()) {
      out.row_at[i] = len;
      len += in.rows[i].numel();
      idx.push_back(in.rows[i]);
    }
    if (in.cols[i].defined()) {
      out.col_at[i] = len;
      len += in.cols[i].numel();
      idx.push_back(in.cols[i]);
    }
  }
  if (idx.empty()) return out;
  out.packed = idx.size() == 1 ? idx[0] : at::cat(idx);
  const at::Tensor host = out.packed.to(at::kCPU);
  const int64_t* h = host.const_data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    if (out.row_at[i] >= 0) {
      check_index_values(h + out.row_at[i], geo[i].Rn, geo[i].R, "row_index", i, "rows");
    }
    if (out.col_at[i] >= 0) {
      check_index_values(h + out.col_at[i], geo[i].Cn, geo[i].C, "col_index", i, "channels");
    }
  }
  return out;
}

void slice_copy_impl(const std::vector<SliceGeometry>& geo, const SliceInputs& in,
                     at::TensorList dst) {
  const size_t n = geo.size();
  if (n == 0) return;
  const at::Device device = in.src[0].device();
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const PackedIndices idx = pack_and_check_indices(geo, in);
  const int64_t* dev_idx = idx.packed.defined() ? idx.packed.const_data_ptr<int64_t>() : nullptr;

  std::vector<SliceEntry> groups[3];  // element sizes 2, 4, 8
  for (size_t i = 0; i < n; ++i) {
    const SliceGeometry& g = geo[i];
    SliceEntry E{};
    E.count = g.Rn * g.Cn * g.B;
    E.src = reinterpret_cast<uint64_t>(in.src[i].const_data_ptr());
    E.dst = reinterpret_cast<uint64_t>(dst[i].data_ptr());
    E.fill = in.fill[i].defined() ? reinterpret_cast<uint64_t>(in.fill[i].const_data_ptr()) : 0;
    E.rows = idx.row_at[i] >= 0 ? reinterpret_cast<uint64_t>(dev_idx + idx.row_at[i]) : 0;
    E.cols = idx.col_at[i] >= 0 ? reinterpret_cast<uint64_t>(dev_idx + idx.col_at[i]) : 0;
    E.C = g.C, E.Cn = g.Cn, E.B = g.B;
    const int64_t esz = static_cast<int64_t>(in.src[i].element_size());
    TORCH_CHECK(esz == 2 || esz == 4 || esz == 8, "slice_copy (CUDA kernel): src[", i,
                "] has elements of ", esz, " bytes; expected 2, 4 or 8");
    auto& grp = groups[esz == 2 ? 0 : esz == 4 ? 1 : 2];
    E.begin = grp.empty() ? 0 : grp.back().begin + grp.back().count;
    if (E.count > 0) grp.push_back(E);
  }
  HostTable table;
  int64_t offs[3];
  for (int g = 0; g < 3; ++g) offs[g] = groups[g].empty() ? -1 : table.append(groups[g]);
  if (groups[0].empty() && groups[1].empty() && groups[2].empty()) return;
  const at::Tensor table_t = table.upload(device);
  const uint8_t* base = table_t.const_data_ptr<uint8_t>();
  launch_group<uint16_t>(groups[0], offs[0], base, stream);
  launch_group<uint32_t>(groups[1], offs[1], base, stream);
  launch_group<uint64_t>(groups[2], offs[2], base, stream);
}

std::vector<at::Tensor> slice_copy_cuda(at::TensorList src, const OptTensorList& row_index,
                                        const OptTensorList& col_index, at::IntArrayRef block,
                                        const OptTensorList& fill) {
  return slice_copy_allocate(src, row_index, col_index, block, fill, at::kCUDA, slice_copy_impl);
}

void slice_copy__cuda(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                      const OptTensorList& col_index, at::IntArrayRef block,
                      const OptTensorList& fill) {
  slice_copy_into(src, dst, row_index, col_index, block, fill, at::kCUDA, slice_copy_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CUDA, m) {
  m.impl("slice_copy", TORCH_FN(slice_copy_cuda));
  m.impl("slice_copy_", TORCH_FN(slice_copy__cuda));
}

}  // namespace svdgrow
