// slice_copy / slice_copy_ on CUDA: move kept rows / channels of many tensors into new storage
// and fill the new slices, one kernel launch per element size for all tensors.
//
// src[i] is viewed as [R, C, B] (R = size(0), B = block[i], C = numel / (R * B)); destination
// [R', C', B] with R' = len(row_index[i]) (or R), C' = len(col_index[i]) (or C). Destination
// element (r, c, b) takes src (row_index[r], col_index[c], b), or, where either index is -1,
// fill[i] at the same place (zeros when fill[i] is None).
//
// Index tensors must be CPU int64 tensors: they are validated on the host (range, duplicates)
// and uploaded together with the tensor table in one non-blocking copy from pinned memory, so
// the op never synchronises with the host (and can be captured in a CUDA graph).
//
// The copy moves raw bits, so tensors of every floating dtype (float64/32, half, bfloat16,
// float8) share one launch per element size: a device table of entries (pointers, sizes, index
// offsets, first element), grid-stride over all destination elements, binary search for the
// entry.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "svdgrow_cuda_common.cuh"

namespace svdgrow_cuda {
namespace {

constexpr int kThreads = 256;

struct SliceEntry {
  int64_t begin;  // first destination element of this tensor within the launch
  int64_t count;  // destination elements
  uint64_t src, dst, fill;   // fill == 0: zeros
  int64_t row_off, col_off;  // byte offsets of int64 index arrays in the table; -1: identity
  int64_t C, Cn, B;          // source channels, destination channels, block
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    slice_copy_kernel(const SliceEntry* __restrict__ entries, int nentries, int64_t total,
                      const uint8_t* __restrict__ table) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const SliceEntry& E = entries[find_segment(entries, nentries, e)];
    const int64_t local = e - E.begin;
    const int64_t B = E.B, Cn = E.Cn;
    const int64_t b = local % B;
    const int64_t t = local / B;
    const int64_t cd = t % Cn, rd = t / Cn;
    const int64_t sr =
        E.row_off >= 0 ? reinterpret_cast<const int64_t*>(table + E.row_off)[rd] : rd;
    const int64_t sc =
        E.col_off >= 0 ? reinterpret_cast<const int64_t*>(table + E.col_off)[cd] : cd;
    T v;
    if (sr < 0 || sc < 0) {
      v = E.fill ? reinterpret_cast<const T*>(E.fill)[local] : T(0);
    } else {
      v = reinterpret_cast<const T*>(E.src)[(sr * E.C + sc) * B + b];
    }
    reinterpret_cast<T*>(E.dst)[local] = v;
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t d = 0; d < s.size(); ++d) {
    if (d) out += ", ";
    out += std::to_string(s[d]);
  }
  return out + "]";
}

// Everything the launch needs about one tensor, after validation.
struct SlicePlan {
  at::Tensor src;   // contiguous
  at::Tensor fill;  // contiguous or undefined
  int64_t R = 0, C = 0, B = 1, Rn = 0, Cn = 0;
  std::vector<int64_t> dst_shape;
  std::vector<int64_t> rows, cols;  // validated indices (empty + has_* false: identity)
  bool has_rows = false, has_cols = false;
};

void read_index(const std::optional<at::Tensor>& idx, const char* name, int64_t i, int64_t limit,
                const char* dim_name, std::vector<int64_t>& out) {
  const at::Tensor& t = *idx;
  TORCH_CHECK(t.device().is_cpu(), "slice_copy (CUDA): ", name, "[", i, "] is on ", t.device(),
              "; index tensors must be CPU int64 tensors (they are checked on the host and "
              "uploaded with the op's table, so the op never waits for the GPU): pass ", name,
              "[", i, "].cpu()");
  TORCH_CHECK(t.scalar_type() == at::kLong, "slice_copy: ", name, "[", i, "] has dtype ",
              t.scalar_type(), ", expected int64");
  TORCH_CHECK(t.dim() == 1, "slice_copy: ", name, "[", i, "] must be 1-D, got shape ",
              shape_str(t.sizes()));
  const at::Tensor c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t n = c.numel();
  out.assign(p, p + n);
  std::vector<char> seen(static_cast<size_t>(limit), 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = out[j];
    TORCH_CHECK(v >= -1 && v < limit, "slice_copy: ", name, "[", i, "][", j, "] = ", v,
                " is out of range: expected -1 (a new slice) or a source ", dim_name,
                " in [0, ", limit, ")");
    if (v >= 0) {
      TORCH_CHECK(!seen[v], "slice_copy: ", name, "[", i, "] takes source ", dim_name, " ", v,
                  " more than once (again at position ", j, "); each kept slice is copied once");
      seen[v] = 1;
    }
  }
}

std::vector<SlicePlan> plan_slices(at::TensorList src,
                                   const c10::List<std::optional<at::Tensor>>& row_index,
                                   const c10::List<std::optional<at::Tensor>>& col_index,
                                   at::IntArrayRef block,
                                   const c10::List<std::optional<at::Tensor>>& fill,
                                   at::Device& device) {
  const int64_t n = static_cast<int64_t>(src.size());
  TORCH_CHECK(static_cast<int64_t>(row_index.size()) == n &&
                  static_cast<int64_t>(col_index.size()) == n &&
                  static_cast<int64_t>(block.size()) == n &&
                  static_cast<int64_t>(fill.size()) == n,
              "slice_copy: src, row_index, col_index, block and fill must have the same length, "
              "got ", n, ", ", row_index.size(), ", ", col_index.size(), ", ", block.size(),
              " and ", fill.size(), " (use None for an index or fill that is not needed)");
  std::vector<SlicePlan> plans(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = src[i];
    TORCH_CHECK(s.defined(), "slice_copy: src[", i, "] is an undefined tensor");
    if (i == 0) device = s.device();
    TORCH_CHECK(s.device().is_cuda(), "slice_copy (CUDA): src[", i, "] is on ", s.device(),
                "; expected a CUDA tensor (on the device of src[0])");
    TORCH_CHECK(s.device() == device, "slice_copy: src[", i, "] is on ", s.device(),
                " but src[0] is on ", device, "; all tensors must be on one device");
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), "slice_copy: src[", i, "] has dtype ",
                s.scalar_type(), ", expected a floating dtype");
    const int64_t esz = static_cast<int64_t>(s.element_size());
    TORCH_CHECK(esz == 1 || esz == 2 || esz == 4 || esz == 8, "slice_copy (CUDA): src[", i,
                "] has an element size of ", esz, " bytes, which is not supported");
    TORCH_CHECK(s.dim() >= 1 && s.numel() > 0, "slice_copy: src[", i,
                "] must be a non-empty tensor with at least one dimension, got shape ",
                shape_str(s.sizes()));
    SlicePlan& P = plans[i];
    P.R = s.size(0);
    P.B = block[i];
    TORCH_CHECK(P.B >= 1 && s.numel() % (P.R * P.B) == 0, "slice_copy: block[", i, "] = ",
                block[i], " does not fit src[", i, "] of shape ", shape_str(s.sizes()),
                ": numel / size(0) = ", s.numel() / P.R, " must be a multiple of the block");
    P.C = s.numel() / (P.R * P.B);

    if (row_index.get(i).has_value()) {
      read_index(row_index.get(i), "row_index", i, P.R, "row", P.rows);
      P.has_rows = true;
      P.Rn = static_cast<int64_t>(P.rows.size());
    } else {
      P.Rn = P.R;
    }
    P.dst_shape.assign(s.sizes().begin(), s.sizes().end());
    P.dst_shape[0] = P.Rn;
    if (col_index.get(i).has_value()) {
      TORCH_CHECK(s.dim() >= 2, "slice_copy: src[", i, "] is 1-D, so col_index[", i,
                  "] must be None");
      TORCH_CHECK(s.size(1) % P.C == 0, "slice_copy: src[", i, "] of shape ",
                  shape_str(s.sizes()), " viewed as [R, C, B] = [", P.R, ", ", P.C, ", ", P.B,
                  "]: with a col_index, dimension 1 (size ", s.size(1),
                  ") must be a multiple of C; choose block[", i,
                  "] as the number of elements per channel (kh*kw for a conv weight, h*w for a "
                  "Linear after Flatten)");
      read_index(col_index.get(i), "col_index", i, P.C, "channel", P.cols);
      P.has_cols = true;
      P.Cn = static_cast<int64_t>(P.cols.size());
      P.dst_shape[1] = (s.size(1) / P.C) * P.Cn;
    } else {
      P.Cn = P.C;
    }
    P.src = s.contiguous();

    if (fill.get(i).has_value()) {
      const at::Tensor& f = *fill.get(i);
      TORCH_CHECK(f.defined(), "slice_copy: fill[", i, "] is an undefined tensor");
      TORCH_CHECK(f.device() == device, "slice_copy: fill[", i, "] is on ", f.device(),
                  ", expected ", device, " (the device of src)");
      TORCH_CHECK(f.scalar_type() == s.scalar_type(), "slice_copy: fill[", i, "] has dtype ",
                  f.scalar_type(), " but src[", i, "] has ", s.scalar_type());
      TORCH_CHECK(f.sizes() == at::IntArrayRef(P.dst_shape), "slice_copy: fill[", i,
                  "] has shape ", shape_str(f.sizes()), ", expected the destination shape ",
                  shape_str(P.dst_shape));
      P.fill = f.contiguous();
    }
  }
  return plans;
}

template <typename T>
void launch_group(const std::vector<SliceEntry>& entries, int64_t entries_off, const uint8_t* base,
                  cudaStream_t stream) {
  if (entries.empty()) return;
  const int64_t total = entries.back().begin + entries.back().count;
  slice_copy_kernel<T><<<grid_blocks(total, kThreads), kThreads, 0, stream>>>(
      reinterpret_cast<const SliceEntry*>(base + entries_off), static_cast<int>(entries.size()),
      total, base);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_slices(std::vector<SlicePlan>& plans, at::TensorList dst, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  HostTable table;
  std::vector<SliceEntry> groups[4];  // element sizes 1, 2, 4, 8
  for (size_t i = 0; i < plans.size(); ++i) {
    const SlicePlan& P = plans[i];
    const int64_t count = P.Rn * P.Cn * P.B;
    if (count == 0) continue;
    SliceEntry E{};
    E.count = count;
    E.src = reinterpret_cast<uint64_t>(P.src.data_ptr());
    E.dst = reinterpret_cast<uint64_t>(dst[i].data_ptr());
    E.fill = P.fill.defined() ? reinterpret_cast<uint64_t>(P.fill.data_ptr()) : 0;
    E.row_off = P.has_rows ? table.append(P.rows) : -1;
    E.col_off = P.has_cols ? table.append(P.cols) : -1;
    E.C = P.C, E.Cn = P.Cn, E.B = P.B;
    const int64_t esz = static_cast<int64_t>(P.src.element_size());
    const int g = esz == 1 ? 0 : esz == 2 ? 1 : esz == 4 ? 2 : 3;
    auto& grp = groups[g];
    E.begin = grp.empty() ? 0 : grp.back().begin + grp.back().count;
    grp.push_back(E);
  }
  int64_t offs[4];
  bool any = false;
  for (int g = 0; g < 4; ++g) {
    offs[g] = groups[g].empty() ? -1 : table.append(groups[g]);
    any = any || !groups[g].empty();
  }
  if (!any) return;
  at::Tensor table_t = table.upload(device);
  const uint8_t* base = table_t.data_ptr<uint8_t>();
  launch_group<uint8_t>(groups[0], offs[0], base, stream);
  launch_group<uint16_t>(groups[1], offs[1], base, stream);
  launch_group<uint32_t>(groups[2], offs[2], base, stream);
  launch_group<uint64_t>(groups[3], offs[3], base, stream);
}

bool ranges_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  const auto* a1 = a0 + a.numel() * a.element_size();
  const auto* b1 = b0 + b.numel() * b.element_size();
  return a0 < b1 && b0 < a1;
}

std::vector<at::Tensor> slice_copy_cuda(at::TensorList src,
                                        const c10::List<std::optional<at::Tensor>>& row_index,
                                        const c10::List<std::optional<at::Tensor>>& col_index,
                                        at::IntArrayRef block,
                                        const c10::List<std::optional<at::Tensor>>& fill) {
  if (src.empty()) return {};
  at::Device device(at::kCUDA);
  std::vector<SlicePlan> plans = plan_slices(src, row_index, col_index, block, fill, device);
  std::vector<at::Tensor> out;
  out.reserve(plans.size());
  for (const SlicePlan& P : plans) out.push_back(at::empty(P.dst_shape, P.src.options()));
  run_slices(plans, out, device);
  return out;
}

void slice_copy__cuda(at::TensorList src, at::TensorList dst,
                      const c10::List<std::optional<at::Tensor>>& row_index,
                      const c10::List<std::optional<at::Tensor>>& col_index,
                      at::IntArrayRef block,
                      const c10::List<std::optional<at::Tensor>>& fill) {
  TORCH_CHECK(dst.size() == src.size(), "slice_copy_: dst has ", dst.size(),
              " tensors but src has ", src.size());
  if (src.empty()) return;
  at::Device device(at::kCUDA);
  std::vector<SlicePlan> plans = plan_slices(src, row_index, col_index, block, fill, device);
  for (size_t i = 0; i < plans.size(); ++i) {
    const at::Tensor& d = dst[i];
    TORCH_CHECK(d.defined(), "slice_copy_: dst[", i, "] is an undefined tensor");
    TORCH_CHECK(d.device() == device, "slice_copy_: dst[", i, "] is on ", d.device(),
                ", expected ", device, " (the device of src)");
    TORCH_CHECK(d.scalar_type() == plans[i].src.scalar_type(), "slice_copy_: dst[", i,
                "] has dtype ", d.scalar_type(), " but src[", i, "] has ",
                plans[i].src.scalar_type());
    TORCH_CHECK(d.sizes() == at::IntArrayRef(plans[i].dst_shape), "slice_copy_: dst[", i,
                "] has shape ", shape_str(d.sizes()), ", expected ",
                shape_str(plans[i].dst_shape));
    TORCH_CHECK(d.is_contiguous(), "slice_copy_: dst[", i,
                "] must be contiguous (allocate it with torch.empty(shape))");
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    for (size_t j = 0; j < plans.size(); ++j) {
      TORCH_CHECK(!ranges_overlap(dst[i], plans[j].src) && !ranges_overlap(dst[i], plans[j].fill) &&
                      (i == j || !ranges_overlap(dst[i], dst[j])),
                  "slice_copy_: dst[", i, "] overlaps the memory of ",
                  ranges_overlap(dst[i], plans[j].src) ? "src[" : (ranges_overlap(dst[i], plans[j].fill) ? "fill[" : "dst["),
                  j, "]; the destinations must be new storage");
    }
  }
  run_slices(plans, dst, device);
}

}  // namespace
}  // namespace svdgrow_cuda

TORCH_LIBRARY_IMPL(svdgrow, CUDA, m) {
  m.impl("slice_copy", TORCH_FN(svdgrow_cuda::slice_copy_cuda));
  m.impl("slice_copy_", TORCH_FN(svdgrow_cuda::slice_copy__cuda));
}
