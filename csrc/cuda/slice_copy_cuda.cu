// slice_copy / slice_copy_ on CUDA: move kept rows / channels of many tensors into new storage
// and fill the new slices, one kernel launch per element size for all tensors.
//
// src[i] is viewed as [R, C, B] (R = size(0), B = block[i], C = numel / (R * B)); destination
// [R', C', B] with R' = len(row_index[i]) (or R), C' = len(col_index[i]) (or C). Destination
// element (r, c, b) takes src (row_index[r], col_index[c], b), or, where either index is -1,
// fill[i] at the same place (zeros when fill[i] is None).
//
// Arguments are checked by the helpers in csrc/common.h, as in the CPU kernel, with its
// messages: index tensors are int64 1-D tensors on the device of src. Their values (range and
// duplicates) are validated on the host before any data moves: all indices are packed into one
// device buffer and copied to the host once, the op's only synchronisation. So slice_copy is
// not CUDA-graph capturable (batched_svd is). The kernel then reads the indices from that
// device buffer.
//
// The copy moves raw bits, so tensors of every supported dtype (float64/32, half, bfloat16)
// share one launch per element size: a device table of entries (pointers, sizes, index
// pointers, first element), uploaded in one non-blocking copy from pinned memory; grid-stride
// over all destination elements, binary search for the entry. A source or fill that overlaps
// any destination is read from a copy.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common.h"
#include "svdgrow_cuda_common.cuh"

namespace svdgrow_cuda {
namespace {

constexpr int kThreads = 256;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

struct SliceEntry {
  int64_t begin;  // first destination element of this tensor within the launch
  int64_t count;  // destination elements
  uint64_t src, dst, fill;   // fill == 0: zeros
  uint64_t rows, cols;       // int64 index arrays on the device; 0: identity
  int64_t C, Cn, B;          // source channels, destination channels, block
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

// Same rule and messages as the CPU kernel: values in [-1, limit), no source slice twice.
void check_index_values(const int64_t* v, int64_t len, int64_t limit, const char* name, size_t i,
                        const char* dim) {
  std::vector<int64_t> seen(static_cast<size_t>(limit), -1);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t x = v[t];
    TORCH_CHECK(x >= -1 && x < limit, "slice_copy: ", name, "[", i, "] has value ", x,
                " at position ", t, ", outside [-1, ", limit, ") (src[", i, "] has ", limit, " ",
                dim, ")");
    if (x >= 0) {
      TORCH_CHECK(seen[x] < 0, "slice_copy: ", name, "[", i, "] repeats source ", dim, " ", x,
                  " at positions ", seen[x], " and ", t, "; each source slice may be kept once");
      seen[x] = t;
    }
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

// Validates everything (before any data moves), then fills dst (already allocated with the
// destination shapes). With `check_dst`, dst comes from the caller and is checked too.
void slice_copy_impl(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                     const OptTensorList& col_index, at::IntArrayRef block,
                     const OptTensorList& fill, bool check_dst) {
  const size_t n = src.size();
  if (n == 0) return;
  const at::Device device = src[0].device();
  TORCH_CHECK(device.is_cuda(), "slice_copy (CUDA kernel): src[0] is on ", device,
              "; expected a CUDA tensor");
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<svdgrow::SliceGeometry> geo(n);
  std::vector<at::Tensor> srcs(n), fills(n);
  // Index tensors (on the device, contiguous) and where each one starts in the packed buffer.
  std::vector<at::Tensor> idx;
  std::vector<int64_t> row_at(n, -1), col_at(n, -1);
  int64_t packed_len = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> ri = row_index.get(i), ci = col_index.get(i), fi = fill.get(i);
    geo[i] = svdgrow::slice_geometry(src[i], ri, ci, block[i], fi, i, device);
    if (check_dst) svdgrow::check_slice_dst(dst[i], src[i], geo[i], i);
    at::Tensor s = src[i].contiguous();
    // Reading from memory that this call overwrites: read from a copy instead.
    if (at::get_overlap_status(dst[i], s) != at::MemOverlapStatus::No) s = s.clone();
    srcs[i] = s;
    if (fi.has_value() && fi->defined()) {
      at::Tensor f = fi->contiguous();
      if (at::get_overlap_status(dst[i], f) != at::MemOverlapStatus::No) f = f.clone();
      fills[i] = f;
    }
    if (ri.has_value() && ri->defined()) {
      row_at[i] = packed_len;
      packed_len += ri->numel();
      idx.push_back(ri->contiguous());
    }
    if (ci.has_value() && ci->defined()) {
      col_at[i] = packed_len;
      packed_len += ci->numel();
      idx.push_back(ci->contiguous());
    }
  }

  // A destination may also overlap another tensor's source or fill (one launch writes all
  // destinations): read those from copies too.
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      if (j == i) continue;
      if (at::get_overlap_status(dst[i], srcs[j]) != at::MemOverlapStatus::No) {
        srcs[j] = srcs[j].clone();
      }
      if (fills[j].defined() &&
          at::get_overlap_status(dst[i], fills[j]) != at::MemOverlapStatus::No) {
        fills[j] = fills[j].clone();
      }
    }
  }

  // All indices in one device buffer, copied to the host once to be validated there with the
  // CPU kernel's rules and messages. This copy is the op's one synchronisation.
  at::Tensor packed;
  const int64_t* dev_idx = nullptr;
  if (!idx.empty()) {
    packed = idx.size() == 1 ? idx[0] : at::cat(idx);
    dev_idx = packed.const_data_ptr<int64_t>();
    const at::Tensor host = packed.to(at::kCPU);
    const int64_t* h = host.const_data_ptr<int64_t>();
    for (size_t i = 0; i < n; ++i) {
      if (row_at[i] >= 0) {
        check_index_values(h + row_at[i], geo[i].Rn, geo[i].R, "row_index", i, "rows");
      }
      if (col_at[i] >= 0) {
        check_index_values(h + col_at[i], geo[i].Cn, geo[i].C, "col_index", i, "channels");
      }
    }
  }

  std::vector<SliceEntry> groups[3];  // element sizes 2, 4, 8
  for (size_t i = 0; i < n; ++i) {
    const svdgrow::SliceGeometry& g = geo[i];
    SliceEntry E{};
    E.count = g.Rn * g.Cn * g.B;
    E.src = reinterpret_cast<uint64_t>(srcs[i].const_data_ptr());
    E.dst = reinterpret_cast<uint64_t>(dst[i].data_ptr());
    E.fill = fills[i].defined() ? reinterpret_cast<uint64_t>(fills[i].const_data_ptr()) : 0;
    E.rows = row_at[i] >= 0 ? reinterpret_cast<uint64_t>(dev_idx + row_at[i]) : 0;
    E.cols = col_at[i] >= 0 ? reinterpret_cast<uint64_t>(dev_idx + col_at[i]) : 0;
    E.C = g.C, E.Cn = g.Cn, E.B = g.B;
    const int64_t esz = static_cast<int64_t>(srcs[i].element_size());
    TORCH_CHECK(esz == 2 || esz == 4 || esz == 8, "slice_copy (CUDA kernel): src[", i,
                "] has elements of ", esz, " bytes; expected 2, 4 or 8");
    auto& grp = groups[esz == 2 ? 0 : esz == 4 ? 1 : 2];
    E.begin = grp.empty() ? 0 : grp.back().begin + grp.back().count;
    if (E.count > 0) grp.push_back(E);
  }
  svdgrow_cuda::HostTable table;
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
  svdgrow::check_slice_copy_lists(src, row_index, col_index, block, fill);
  std::vector<at::Tensor> dst;
  dst.reserve(src.size());
  const at::Device device = src.empty() ? at::Device(at::kCUDA) : src[0].device();
  for (size_t i = 0; i < src.size(); ++i) {
    const svdgrow::SliceGeometry g = svdgrow::slice_geometry(
        src[i], row_index.get(i), col_index.get(i), block[i], fill.get(i), i, device);
    dst.push_back(at::empty(g.dst_sizes, src[i].options().memory_format(at::MemoryFormat::Contiguous)));
  }
  slice_copy_impl(src, dst, row_index, col_index, block, fill, /*check_dst=*/false);
  return dst;
}

void slice_copy__cuda(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                      const OptTensorList& col_index, at::IntArrayRef block,
                      const OptTensorList& fill) {
  svdgrow::check_slice_copy_lists(src, row_index, col_index, block, fill);
  TORCH_CHECK(dst.size() == src.size(), "slice_copy_: dst has ", dst.size(),
              " entries but src has ", src.size(), "; pass one destination per tensor");
  slice_copy_impl(src, dst, row_index, col_index, block, fill, /*check_dst=*/true);
}

}  // namespace
}  // namespace svdgrow_cuda

TORCH_LIBRARY_IMPL(svdgrow, CUDA, m) {
  m.impl("slice_copy", TORCH_FN(svdgrow_cuda::slice_copy_cuda));
  m.impl("slice_copy_", TORCH_FN(svdgrow_cuda::slice_copy__cuda));
}
