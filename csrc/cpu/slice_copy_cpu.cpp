// slice_copy / slice_copy_ on the CPU: one parallel pass over the rows of all tensors.
//
// Each src[i] is viewed as [R, C, B]; destination row r' takes source row row_index[r'] and,
// within it, channel c' takes source channel col_index[c'] (a contiguous run of B elements).
// The channel map is split once per tensor into runs of consecutive sources, so kept channels
// that stay in order move with one memcpy per run and row.
// A -1 in either index marks a new slice, taken from fill[i] (same shape as the destination)
// or zero. The index values are checked once, serially, before any data moves, so a bad
// index raises a message naming the argument and never writes half a result.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace svdgrow {
namespace {

using at::Tensor;
using OptTensorList = c10::List<std::optional<Tensor>>;

// A run of destination channels whose sources are consecutive (or all new), in elements.
struct ChannelRun {
  int64_t dst = 0;  // offset in the destination row
  int64_t src = 0;  // offset in the source row, or -1 for new slices
  int64_t len = 0;
};

// One tensor's work, with raw pointers into contiguous storage.
struct SliceJob {
  const void* src = nullptr;
  void* dst = nullptr;
  const void* fill = nullptr;     // null: new slices are zero
  const int64_t* rows = nullptr;  // null: identity
  std::vector<ChannelRun> runs;   // one destination row, as runs over the source row
  int64_t C = 0, B = 1, Rn = 0, Cn = 0;
  at::ScalarType dtype = at::kFloat;
};

// Splits the channel map (col_index, or the identity when null) into runs of consecutive
// sources, so that kept channels that stay in order move with one copy per run.
std::vector<ChannelRun> channel_runs(const int64_t* cols, int64_t C, int64_t Cn, int64_t B) {
  std::vector<ChannelRun> runs;
  if (cols == nullptr) {
    runs.push_back({0, 0, C * B});
    return runs;
  }
  int64_t c = 0;
  while (c < Cn) {
    const int64_t first = cols[c];
    int64_t len = 1;
    if (first < 0) {
      while (c + len < Cn && cols[c + len] < 0) ++len;
    } else {
      while (c + len < Cn && cols[c + len] == first + len) ++len;
    }
    runs.push_back({c * B, first < 0 ? -1 : first * B, len * B});
    c += len;
  }
  return runs;
}

// Checks that idx's values lie in [-1, limit) and that no non-negative value repeats.
void check_index_values(const Tensor& idx, int64_t limit, const char* name, size_t i, const char* dim) {
  const int64_t* v = idx.const_data_ptr<int64_t>();
  const int64_t len = idx.numel();
  std::vector<int64_t> seen(limit, -1);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t x = v[t];
    TORCH_CHECK(x >= -1 && x < limit, "slice_copy: ", name, "[", i, "] has value ", x, " at position ",
                t, ", outside [-1, ", limit, ") (src[", i, "] has ", limit, " ", dim, ")");
    if (x >= 0) {
      TORCH_CHECK(seen[x] < 0, "slice_copy: ", name, "[", i, "] repeats source ", dim, " ", x,
                  " at positions ", seen[x], " and ", t, "; each source slice may be kept once");
      seen[x] = t;
    }
  }
}

template <typename scalar_t>
inline void copy_n(const scalar_t* s, int64_t n, scalar_t* d) {
  if (n <= 16) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(scalar_t));
  }
}

template <typename scalar_t>
inline void zero_n(int64_t n, scalar_t* d) {
  for (int64_t i = 0; i < n; ++i) d[i] = scalar_t(0);
}

template <typename scalar_t>
void copy_rows(const SliceJob& job, int64_t r0, int64_t r1) {
  const scalar_t* src = static_cast<const scalar_t*>(job.src);
  scalar_t* dst = static_cast<scalar_t*>(job.dst);
  const scalar_t* fill = static_cast<const scalar_t*>(job.fill);
  const int64_t src_row = job.C * job.B, dst_row = job.Cn * job.B;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* d = dst + r * dst_row;
    const scalar_t* f = fill ? fill + r * dst_row : nullptr;
    const int64_t sr = job.rows ? job.rows[r] : r;
    if (sr < 0) {
      if (f) copy_n(f, dst_row, d);
      else zero_n(dst_row, d);
      continue;
    }
    const scalar_t* s = src + sr * src_row;
    for (const ChannelRun& run : job.runs) {
      if (run.src >= 0) copy_n(s + run.src, run.len, d + run.dst);
      else if (f) copy_n(f + run.dst, run.len, d + run.dst);
      else zero_n(run.len, d + run.dst);
    }
  }
}

// Validates everything, then fills dst (already allocated with the right shapes). When
// `check_dst` is set, dst comes from the caller and is checked too.
void slice_copy_impl(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                     const OptTensorList& col_index, at::IntArrayRef block, const OptTensorList& fill,
                     bool check_dst) {
  const size_t n = src.size();
  if (n == 0) return;
  const at::Device device = src[0].device();
  TORCH_CHECK(device.is_cpu(), "slice_copy (CPU kernel): src[0] is on ", device, "; expected the CPU");
  std::vector<Tensor> keep;  // contiguous copies that must outlive the pass
  keep.reserve(4 * n);
  std::vector<SliceJob> jobs(n);
  std::vector<int64_t> row_offset(n + 1, 0);
  int64_t total_elems = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::optional<Tensor> ri = row_index.get(i), ci = col_index.get(i), fi = fill.get(i);
    const SliceGeometry g = slice_geometry(src[i], ri, ci, block[i], fi, i, device);
    if (check_dst) check_slice_dst(dst[i], src[i], g, i);
    SliceJob& job = jobs[i];
    job.C = g.C;
    job.B = g.B;
    job.Rn = g.Rn;
    job.Cn = g.Cn;
    job.dtype = src[i].scalar_type();
    Tensor s = src[i].contiguous();
    // Reading from memory that this call overwrites: read from a copy instead.
    if (at::get_overlap_status(dst[i], s) != at::MemOverlapStatus::No) s = s.clone();
    keep.push_back(s);
    job.src = s.const_data_ptr();
    job.dst = dst[i].data_ptr();
    if (ri.has_value() && ri->defined()) {
      Tensor r = ri->contiguous();
      check_index_values(r, g.R, "row_index", i, "rows");
      keep.push_back(r);
      job.rows = r.const_data_ptr<int64_t>();
    }
    if (ci.has_value() && ci->defined()) {
      Tensor c = ci->contiguous();
      check_index_values(c, g.C, "col_index", i, "channels");
      job.runs = channel_runs(c.const_data_ptr<int64_t>(), g.C, g.Cn, g.B);
    } else {
      job.runs = channel_runs(nullptr, g.C, g.Cn, g.B);
    }
    if (fi.has_value() && fi->defined()) {
      Tensor f = fi->contiguous();
      if (at::get_overlap_status(dst[i], f) != at::MemOverlapStatus::No) f = f.clone();
      keep.push_back(f);
      job.fill = f.const_data_ptr();
    }
    row_offset[i + 1] = row_offset[i] + g.Rn;
    total_elems += g.Rn * g.Cn * g.B;
  }
  const int64_t total_rows = row_offset[n];
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) * total_rows / std::max<int64_t>(1, total_elems));
  at::parallel_for(0, total_rows, grain, [&](int64_t b, int64_t e) {
    size_t i = std::upper_bound(row_offset.begin(), row_offset.end(), b) - row_offset.begin() - 1;
    while (b < e) {
      const int64_t r0 = b - row_offset[i];
      const int64_t r1 = std::min(e, row_offset[i + 1]) - row_offset[i];
      const SliceJob& job = jobs[i];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "slice_copy_cpu",
                                      [&] { copy_rows<scalar_t>(job, r0, r1); });
      b = row_offset[i] + r1;
      ++i;
    }
  });
}

std::vector<Tensor> slice_copy_cpu(at::TensorList src, const OptTensorList& row_index,
                                   const OptTensorList& col_index, at::IntArrayRef block,
                                   const OptTensorList& fill) {
  check_slice_copy_lists(src, row_index, col_index, block, fill);
  std::vector<Tensor> dst;
  dst.reserve(src.size());
  const at::Device device = src.empty() ? at::Device(at::kCPU) : src[0].device();
  for (size_t i = 0; i < src.size(); ++i) {
    const SliceGeometry g = slice_geometry(src[i], row_index.get(i), col_index.get(i), block[i],
                                           fill.get(i), i, device);
    dst.push_back(at::empty(g.dst_sizes, src[i].options().memory_format(at::MemoryFormat::Contiguous)));
  }
  slice_copy_impl(src, dst, row_index, col_index, block, fill, /*check_dst=*/false);
  return dst;
}

void slice_copy__cpu(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                     const OptTensorList& col_index, at::IntArrayRef block, const OptTensorList& fill) {
  check_slice_copy_lists(src, row_index, col_index, block, fill);
  TORCH_CHECK(dst.size() == src.size(), "slice_copy_: dst has ", dst.size(), " entries but src has ",
              src.size(), "; pass one destination per tensor");
  slice_copy_impl(src, dst, row_index, col_index, block, fill, /*check_dst=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) {
  m.impl("slice_copy", &slice_copy_cpu);
  m.impl("slice_copy_", &slice_copy__cpu);
}

}  // namespace svdgrow
