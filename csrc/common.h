// Shared by the CPU and CUDA kernels: argument checks (one set of messages for both), the
// slice_copy geometry and aliasing rules, and the allocate-then-fill wrappers of slice_copy.
//
// Header-only and free of CUDA code, so both the C++ and the nvcc translation units include it.
// The ops' contracts: docs/design.md, section "Kernels".
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace svdgrow {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

// What batched_svd returns: S, U and Vh, one entry per matrix.
using BatchedSvdOutput =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// ---------------------------------------------------------------------------------------------
// batched_svd
// ---------------------------------------------------------------------------------------------

// Checks the arguments of batched_svd: a non-empty list of non-empty 2-D float32/float64
// matrices on one device, 0 < k <= min(m, n) for every matrix, niter >= 0, oversample >= 0.
inline void check_batched_svd_args(at::TensorList mats, std::optional<int64_t> k, int64_t niter,
                                   int64_t oversample) {
  // The dispatcher refuses an empty list before any kernel runs; this check is for C++ callers.
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

// ---------------------------------------------------------------------------------------------
// pivoted_cholesky
// ---------------------------------------------------------------------------------------------

// Checks the arguments of pivoted_cholesky: square float32/float64 matrices on one device, one
// pivot count per matrix with 0 <= r[i] <= n_i, block >= 1.
inline void check_pivoted_cholesky_args(at::TensorList grams, at::IntArrayRef r, int64_t block) {
  TORCH_CHECK(grams.size() == r.size(), "pivoted_cholesky: grams has ", grams.size(),
              " entries but r has ", r.size(), "; pass one pivot count per matrix");
  TORCH_CHECK(block >= 1, "pivoted_cholesky: block must be >= 1, got ", block);
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor& g = grams[i];
    TORCH_CHECK(g.defined(), "pivoted_cholesky: grams[", i, "] is an undefined tensor");
    TORCH_CHECK(g.dim() == 2 && g.size(0) == g.size(1), "pivoted_cholesky: grams[", i,
                "] must be a square matrix, got shape ", g.sizes());
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
                "pivoted_cholesky: grams[", i, "] must be float32 or float64, got ",
                g.scalar_type());
    TORCH_CHECK(g.device() == grams[0].device(), "pivoted_cholesky: all grams must be on one ",
                "device; grams[0] is on ", grams[0].device(), " but grams[", i, "] is on ",
                g.device());
    TORCH_CHECK(r[i] >= 0 && r[i] <= g.size(0), "pivoted_cholesky: asked for ", r[i],
                " pivots of grams[", i, "], which has ", g.size(0), " columns");
  }
}

// ---------------------------------------------------------------------------------------------
// slice_copy: src[i] viewed as [R, C, B] (docs/design.md, "Kernels: slice_copy")
// ---------------------------------------------------------------------------------------------

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
inline void check_slice_copy_lists(at::TensorList src, const OptTensorList& row_index,
                                   const OptTensorList& col_index, at::IntArrayRef block,
                                   const OptTensorList& fill) {
  const size_t n = src.size();
  TORCH_CHECK(row_index.size() == n, "slice_copy: row_index has ", row_index.size(),
              " entries but src has ", n, "; pass one index (or None) per tensor");
  TORCH_CHECK(col_index.size() == n, "slice_copy: col_index has ", col_index.size(),
              " entries but src has ", n, "; pass one index (or None) per tensor");
  TORCH_CHECK(block.size() == n, "slice_copy: block has ", block.size(), " entries but src has ", n,
              "; pass one block size per tensor (1 for Linear weights and vectors)");
  TORCH_CHECK(fill.size() == n, "slice_copy: fill has ", fill.size(), " entries but src has ", n,
              "; pass one fill tensor (or None) per tensor");
}

// Checks one index tensor's type, rank and device (its values: check_index_values).
inline void check_slice_index(const at::Tensor& idx, const char* name, size_t i,
                              const at::Device& device) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "slice_copy: ", name, "[", i,
              "] must be an int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "slice_copy: ", name, "[", i, "] must be 1-D, got shape ",
              idx.sizes());
  TORCH_CHECK(idx.device() == device, "slice_copy: ", name, "[", i, "] is on ", idx.device(),
              " but src[", i, "] is on ", device, "; move the index to the tensor's device");
}

// Checks the values of an index (host memory): in [-1, limit), no non-negative value twice.
inline void check_index_values(const int64_t* v, int64_t len, int64_t limit, const char* name,
                               size_t i, const char* dim) {
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

// The fill tensor's checks, for slice_geometry.
inline void check_slice_fill(const at::Tensor& f, const at::Tensor& src,
                             const std::vector<int64_t>& dst_sizes, size_t i) {
  TORCH_CHECK(f.sizes().vec() == dst_sizes, "slice_copy: fill[", i,
              "] must have the destination shape ", at::IntArrayRef(dst_sizes), ", got ",
              f.sizes());
  TORCH_CHECK(f.scalar_type() == src.scalar_type(), "slice_copy: fill[", i, "] has dtype ",
              f.scalar_type(), " but src[", i, "] has dtype ", src.scalar_type());
  TORCH_CHECK(f.device() == src.device(), "slice_copy: fill[", i, "] is on ", f.device(),
              " but src[", i, "] is on ", src.device());
}

// Validates src[i] with its indices, block and fill, and returns its geometry.
inline SliceGeometry slice_geometry(const at::Tensor& src,
                                    const std::optional<at::Tensor>& row_index,
                                    const std::optional<at::Tensor>& col_index, int64_t block,
                                    const std::optional<at::Tensor>& fill, size_t i,
                                    const at::Device& device) {
  TORCH_CHECK(src.defined(), "slice_copy: src[", i, "] is an undefined tensor");
  TORCH_CHECK(src.device() == device,
              "slice_copy: all tensors must be on one device; src[0] is on ", device, " but src[",
              i, "] is on ", src.device(), "; call slice_copy once per device");
  TORCH_CHECK(is_floating_for_slice(src.scalar_type()), "slice_copy: src[", i,
              "] must be float32, float64, float16 or bfloat16, got ", src.scalar_type());
  TORCH_CHECK(src.dim() >= 1, "slice_copy: src[", i,
              "] must have at least one dimension, got a 0-D tensor");
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
  TORCH_CHECK(g.Rn > 0 && g.Cn > 0, "slice_copy: src[", i, "] would become empty (", g.Rn,
              " rows, ", g.Cn, " channels); keep at least one row and channel");
  g.dst_sizes = src.sizes().vec();
  g.dst_sizes[0] = g.Rn;
  if (src.dim() >= 2) g.dst_sizes[1] = src.size(1) / g.C * g.Cn;
  if (fill.has_value() && fill->defined()) check_slice_fill(*fill, src, g.dst_sizes, i);
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
              dst.sizes(), ", strides ", dst.strides(),
              "); pass a contiguous tensor or use slice_copy");
}

// The byte ranges [begin, end) of the destinations, sorted: lets every input be tested for
// overlap with all destinations in O(log n).
class DstRanges {
 public:
  // Refuses destinations that share memory (the same tensor twice, or overlapping views).
  explicit DstRanges(at::TensorList dst) {
    for (size_t i = 0; i < dst.size(); ++i) {
      const auto* b = static_cast<const char*>(dst[i].const_data_ptr());
      ranges_.push_back({b, b + dst[i].nbytes(), i});
    }
    std::sort(ranges_.begin(), ranges_.end(),
              [](const Range& x, const Range& y) { return x.begin < y.begin; });
    for (size_t t = 1; t < ranges_.size(); ++t) {
      const Range& a = ranges_[t - 1];
      const Range& b = ranges_[t];
      TORCH_CHECK(b.begin >= a.end, "slice_copy_: dst[", std::min(a.index, b.index), "] and dst[",
                  std::max(a.index, b.index),
                  "] share memory; pass a separate destination for every tensor");
    }
  }
  // Whether the contiguous tensor t shares memory with any destination.
  bool overlaps(const at::Tensor& t) const {
    const auto* b = static_cast<const char*>(t.const_data_ptr());
    const char* e = b + t.nbytes();
    // The last destination that begins before e is the only one that can reach past b.
    auto it = std::lower_bound(ranges_.begin(), ranges_.end(), e,
                               [](const Range& r, const char* x) { return r.begin < x; });
    return it != ranges_.begin() && std::prev(it)->end > b;
  }

 private:
  struct Range {
    const char* begin;
    const char* end;
    size_t index;
  };
  std::vector<Range> ranges_;
};

// Validates every argument of slice_copy / slice_copy_ (dst empty for slice_copy) before any
// data moves, and returns each tensor's geometry. Index values are checked by each kernel
// (check_index_values), also before it writes anything.
inline std::vector<SliceGeometry> check_slice_copy_args(at::TensorList src, at::TensorList dst,
                                                        const OptTensorList& row_index,
                                                        const OptTensorList& col_index,
                                                        at::IntArrayRef block,
                                                        const OptTensorList& fill, bool has_dst) {
  check_slice_copy_lists(src, row_index, col_index, block, fill);
  TORCH_CHECK(!has_dst || dst.size() == src.size(), "slice_copy_: dst has ", dst.size(),
              " entries but src has ", src.size(), "; pass one destination per tensor");
  std::vector<SliceGeometry> geo(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    geo[i] = slice_geometry(src[i], row_index.get(i), col_index.get(i), block[i], fill.get(i), i,
                            src[0].device());
    if (has_dst) check_slice_dst(dst[i], src[i], geo[i], i);
  }
  return geo;
}

// The inputs of one call, contiguous and safe to read while the destinations are written: any
// that shares memory with a destination is read from a copy. Undefined where the argument is
// None.
struct SliceInputs {
  std::vector<at::Tensor> src, rows, cols, fill;
};

inline SliceInputs slice_inputs(at::TensorList src, at::TensorList dst,
                                const OptTensorList& row_index, const OptTensorList& col_index,
                                const OptTensorList& fill) {
  const DstRanges ranges(dst);
  auto readable = [&](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return ranges.overlaps(c) ? c.clone() : c;
  };
  auto readable_opt = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? readable(*t) : at::Tensor();
  };
  SliceInputs in;
  for (size_t i = 0; i < src.size(); ++i) {
    in.src.push_back(readable(src[i]));
    in.rows.push_back(readable_opt(row_index.get(i)));
    in.cols.push_back(readable_opt(col_index.get(i)));
    in.fill.push_back(readable_opt(fill.get(i)));
  }
  return in;
}

// A backend's copy: checks the index values, then fills dst (validated, of the destination
// shapes). It must not write before all index values are checked.
using SliceCopyImpl = void (*)(const std::vector<SliceGeometry>& geo, const SliceInputs& in,
                               at::TensorList dst);

inline void check_slice_backend(at::TensorList src, at::DeviceType type) {
  TORCH_CHECK(src.empty() || src[0].device().type() == type, "slice_copy (", type,
              " kernel): src[0] is on ", src[0].device());
}

// slice_copy: validates, allocates the destinations, and runs the backend's copy.
inline std::vector<at::Tensor> slice_copy_allocate(at::TensorList src,
                                                   const OptTensorList& row_index,
                                                   const OptTensorList& col_index,
                                                   at::IntArrayRef block, const OptTensorList& fill,
                                                   at::DeviceType type, SliceCopyImpl impl) {
  const auto geo = check_slice_copy_args(src, {}, row_index, col_index, block, fill, false);
  check_slice_backend(src, type);
  std::vector<at::Tensor> dst;
  dst.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    dst.push_back(at::empty(geo[i].dst_sizes, src[i].options()));
  }
  impl(geo, slice_inputs(src, dst, row_index, col_index, fill), dst);
  return dst;
}

// slice_copy_: validates (the destinations too), then runs the backend's copy.
inline void slice_copy_into(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                            const OptTensorList& col_index, at::IntArrayRef block,
                            const OptTensorList& fill, at::DeviceType type, SliceCopyImpl impl) {
  const auto geo = check_slice_copy_args(src, dst, row_index, col_index, block, fill, true);
  check_slice_backend(src, type);
  impl(geo, slice_inputs(src, dst, row_index, col_index, fill), dst);
}

}  // namespace svdgrow
