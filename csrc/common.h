// Shared argument checks and geometry for the svdgrow kernels (CPU and CUDA).
//
// Header-only and free of CUDA code, so both the C++ and the nvcc translation units can
// include it and reject bad arguments with the same messages.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace svdgrow {

// ---------------------------------------------------------------------------------------
// batched_svd
// ---------------------------------------------------------------------------------------

// Checks the arguments of batched_svd: a non-empty list of non-empty 2-D float32/float64
// matrices on one device, 0 < k <= min(m, n) for every matrix, niter >= 0, oversample >= 0.
inline void check_batched_svd_args(at::TensorList mats, std::optional<int64_t> k, int64_t niter,
                                   int64_t oversample) {
  TORCH_CHECK(!mats.empty(), "batched_svd: mats is an empty list; pass at least one 2-D matrix");
  TORCH_CHECK(niter >= 0, "batched_svd: niter must be >= 0, got ", niter);
  TORCH_CHECK(oversample >= 0, "batched_svd: oversample must be >= 0, got ", oversample);
  const auto device = mats[0].device();
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& a = mats[i];
    TORCH_CHECK(a.defined(), "batched_svd: mats[", i, "] is an undefined tensor");
    TORCH_CHECK(a.dim() == 2, "batched_svd: mats[", i, "] must be a 2-D matrix, got a ", a.dim(),
                "-D tensor of shape ", a.sizes(),
                "; reshape it first (a conv weight [out, in, kh, kw] as [out, in*kh*kw])");
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "batched_svd: mats[", i, "] must be float32 or float64, got ", a.scalar_type(),
                "; convert it with .float()");
    TORCH_CHECK(a.size(0) > 0 && a.size(1) > 0, "batched_svd: mats[", i,
                "] is an empty matrix of shape ", a.sizes());
    TORCH_CHECK(a.device() == device, "batched_svd: all mats must be on one device; mats[0] is on ",
                device, " but mats[", i, "] is on ", a.device());
    if (k.has_value()) {
      const int64_t p = std::min(a.size(0), a.size(1));
      TORCH_CHECK(*k > 0 && *k <= p, "batched_svd: k must satisfy 0 < k <= min(m, n) for every ",
                  "matrix, got k = ", *k, " but mats[", i, "] has shape ", a.sizes(),
                  " (min(m, n) = ", p, "); pass a smaller k or k=None");
    }
  }
}

// ---------------------------------------------------------------------------------------
// slice_copy
// ---------------------------------------------------------------------------------------

// The [R, C, B] view of one src tensor and the shape of its destination.
struct SliceGeometry {
  int64_t R = 0, C = 0, B = 1;  // source rows, channels, block
  int64_t Rn = 0, Cn = 0;       // destination rows, channels
  std::vector<int64_t> dst_sizes;
};

inline bool is_floating_for_slice(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks that the per-tensor argument lists all have len(src) entries.
inline void check_slice_copy_lists(at::TensorList src, const c10::List<std::optional<at::Tensor>>& row_index,
                                   const c10::List<std::optional<at::Tensor>>& col_index,
                                   at::IntArrayRef block,
                                   const c10::List<std::optional<at::Tensor>>& fill) {
  const size_t n = src.size();
  TORCH_CHECK(row_index.size() == n, "slice_copy: row_index has ", row_index.size(),
              " entries but src has ", n, "; pass one index (or None) per tensor");
  TORCH_CHECK(col_index.size() == n, "slice_copy: col_index has ", col_index.size(),
              " entries but src has ", n, "; pass one index (or None) per tensor");
  TORCH_CHECK(block.size() == n, "slice_copy: block has ", block.size(), " entries but src has ",
              n, "; pass one block size per tensor (1 for Linear weights and vectors)");
  TORCH_CHECK(fill.size() == n, "slice_copy: fill has ", fill.size(), " entries but src has ", n,
              "; pass one fill tensor (or None) per tensor");
}

// Checks one index tensor's type, rank and device (its values are checked by each kernel).
inline void check_slice_index(const at::Tensor& idx, const char* name, size_t i,
                              const at::Device& device) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "slice_copy: ", name, "[", i,
              "] must be an int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "slice_copy: ", name, "[", i, "] must be 1-D, got shape ",
              idx.sizes());
  TORCH_CHECK(idx.device() == device, "slice_copy: ", name, "[", i, "] is on ", idx.device(),
              " but src[", i, "] is on ", device, "; move the index to the tensor's device");
}

// Validates src[i] with its indices, block and fill, and returns its geometry.
inline SliceGeometry slice_geometry(const at::Tensor& src, const std::optional<at::Tensor>& row_index,
                                    const std::optional<at::Tensor>& col_index, int64_t block,
                                    const std::optional<at::Tensor>& fill, size_t i,
                                    const at::Device& device) {
  TORCH_CHECK(src.defined(), "slice_copy: src[", i, "] is an undefined tensor");
  TORCH_CHECK(src.device() == device, "slice_copy: all tensors must be on one device; src[0] is on ",
              device, " but src[", i, "] is on ", src.device());
  TORCH_CHECK(is_floating_for_slice(src.scalar_type()), "slice_copy: src[", i,
              "] must be float32, float64, float16 or bfloat16, got ", src.scalar_type());
  TORCH_CHECK(src.dim() >= 1, "slice_copy: src[", i, "] must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(src.numel() > 0, "slice_copy: src[", i, "] is empty (shape ", src.sizes(), ")");
  TORCH_CHECK(block >= 1, "slice_copy: block[", i, "] must be >= 1, got ", block);
  SliceGeometry g;
  g.B = block;
  g.R = src.size(0);
  if (src.dim() == 1) {
    TORCH_CHECK(block == 1, "slice_copy: block[", i, "] must be 1 for the 1-D src[", i,
                "] of shape ", src.sizes(), ", got ", block);
    g.C = 1;
  } else {
    int64_t trailing = 1;  // product of dims 2..
    for (int64_t d = 2; d < src.dim(); ++d) trailing *= src.size(d);
    TORCH_CHECK(block % trailing == 0 && src.size(1) % (block / trailing) == 0,
                "slice_copy: block[", i, "] = ", block, " does not fit src[", i, "] of shape ",
                src.sizes(), ": the block must be the product of the trailing dimensions (",
                trailing, " here) times a divisor of size(1) (for a Linear weight after Flatten, ",
                "[out, C*h*w] with block h*w)");
    g.C = src.size(1) / (block / trailing);
  }
  g.Rn = g.R;
  if (row_index.has_value() && row_index->defined()) {
    check_slice_index(*row_index, "row_index", i, device);
    g.Rn = row_index->size(0);
  }
  g.Cn = g.C;
  if (col_index.has_value() && col_index->defined()) {
    check_slice_index(*col_index, "col_index", i, device);
    g.Cn = col_index->size(0);
    TORCH_CHECK(src.dim() >= 2 || g.Cn == 1, "slice_copy: col_index[", i,
                "] must be None (or of length 1) for the 1-D src[", i, "], got length ", g.Cn);
  }
  TORCH_CHECK(g.Rn > 0 && g.Cn > 0, "slice_copy: tensor ", i, " would become empty (",
              g.Rn, " rows, ", g.Cn, " channels); keep at least one row and channel");
  g.dst_sizes = src.sizes().vec();
  g.dst_sizes[0] = g.Rn;
  if (src.dim() >= 2) g.dst_sizes[1] = src.size(1) / g.C * g.Cn;
  if (fill.has_value() && fill->defined()) {
    const at::Tensor& f = *fill;
    TORCH_CHECK(f.sizes().vec() == g.dst_sizes, "slice_copy: fill[", i, "] must have the destination shape ",
                at::IntArrayRef(g.dst_sizes), ", got ", f.sizes());
    TORCH_CHECK(f.scalar_type() == src.scalar_type(), "slice_copy: fill[", i, "] has dtype ",
                f.scalar_type(), " but src[", i, "] has dtype ", src.scalar_type());
    TORCH_CHECK(f.device() == device, "slice_copy: fill[", i, "] is on ", f.device(), " but src[", i,
                "] is on ", device);
  }
  return g;
}

// Checks a preallocated destination of slice_copy_.
inline void check_slice_dst(const at::Tensor& dst, const at::Tensor& src, const SliceGeometry& g,
                            size_t i) {
  TORCH_CHECK(dst.defined(), "slice_copy_: dst[", i, "] is an undefined tensor");
  TORCH_CHECK(dst.sizes().vec() == g.dst_sizes, "slice_copy_: dst[", i, "] must have shape ",
              at::IntArrayRef(g.dst_sizes), " (src[", i, "] of shape ", src.sizes(),
              " after indexing), got ", dst.sizes());
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "slice_copy_: dst[", i, "] has dtype ",
              dst.scalar_type(), " but src[", i, "] has dtype ", src.scalar_type());
  TORCH_CHECK(dst.device() == src.device(), "slice_copy_: dst[", i, "] is on ", dst.device(),
              " but src[", i, "] is on ", src.device());
  TORCH_CHECK(dst.is_contiguous(), "slice_copy_: dst[", i, "] must be contiguous (shape ",
              dst.sizes(), ", strides ", dst.strides(), "); pass a contiguous tensor or use slice_copy");
}

}  // namespace svdgrow
