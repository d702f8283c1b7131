// slice_copy / slice_copy_ on the CPU: one parallel pass over the rows of all tensors.
//
// The [R, C, B] contract, the checks and the aliasing rules: docs/design.md, "Kernels:
// slice_copy". Here the channel map of each tensor is split once into runs of consecutive
// sources, so kept channels that stay in order move with one memcpy per run and row. The
// parallel region runs plain copies only (no ATen call).
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace svdgrow {
namespace {

using at::Tensor;

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
      if (f) {
        copy_n(f, dst_row, d);
      } else {
        zero_n(dst_row, d);
      }
      continue;
    }
    const scalar_t* s = src + sr * src_row;
    for (const ChannelRun& run : job.runs) {
      if (run.src >= 0) {
        copy_n(s + run.src, run.len, d + run.dst);
      } else if (f) {
        copy_n(f + run.dst, run.len, d + run.dst);
      } else {
        zero_n(run.len, d + run.dst);
      }
    }
  }
}

// Checks every index value (before anything is written), then describes each tensor's work.
std::vector<SliceJob> plan_jobs(const std::vector<SliceGeometry>& geo, const SliceInputs& in,
                                at::TensorList dst) {
  const size_t n = geo.size();
  for (size_t i = 0; i < n; ++i) {
    const Tensor& r = in.rows[i];
    const Tensor& c = in.cols[i];
    if (r.defined()) {
      check_index_values(r.const_data_ptr<int64_t>(), geo[i].Rn, geo[i].R, "row_index", i, "rows");
    }
    if (c.defined()) {
      check_index_values(c.const_data_ptr<int64_t>(), geo[i].Cn, geo[i].C, "col_index", i,
                         "channels");
    }
  }
  std::vector<SliceJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    const SliceGeometry& g = geo[i];
    SliceJob& job = jobs[i];
    job.C = g.C, job.B = g.B, job.Rn = g.Rn, job.Cn = g.Cn;
    job.dtype = in.src[i].scalar_type();
    job.src = in.src[i].const_data_ptr();
    job.dst = dst[i].data_ptr();
    job.fill = in.fill[i].defined() ? in.fill[i].const_data_ptr() : nullptr;
    job.rows = in.rows[i].defined() ? in.rows[i].const_data_ptr<int64_t>() : nullptr;
    job.runs = channel_runs(in.cols[i].defined() ? in.cols[i].const_data_ptr<int64_t>() : nullptr,
                            g.C, g.Cn, g.B);
  }
  return jobs;
}

void slice_copy_impl(const std::vector<SliceGeometry>& geo, const SliceInputs& in,
                     at::TensorList dst) {
  const std::vector<SliceJob> jobs = plan_jobs(geo, in, dst);
  const size_t n = jobs.size();
  std::vector<int64_t> row_offset(n + 1, 0);
  int64_t total_elems = 0;
  for (size_t i = 0; i < n; ++i) {
    row_offset[i + 1] = row_offset[i] + jobs[i].Rn;
    total_elems += jobs[i].Rn * jobs[i].Cn * jobs[i].B;
  }
  const int64_t total_rows = row_offset[n];
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 15) * total_rows / std::max<int64_t>(1, total_elems));
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
  return slice_copy_allocate(src, row_index, col_index, block, fill, at::kCPU, slice_copy_impl);
}

void slice_copy__cpu(at::TensorList src, at::TensorList dst, const OptTensorList& row_index,
                     const OptTensorList& col_index, at::IntArrayRef block,
                     const OptTensorList& fill) {
  slice_copy_into(src, dst, row_index, col_index, block, fill, at::kCPU, slice_copy_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(svdgrow, CPU, m) {
  m.impl("slice_copy", TORCH_FN(slice_copy_cpu));
  m.impl("slice_copy_", TORCH_FN(slice_copy__cpu));
}

}  // namespace svdgrow
