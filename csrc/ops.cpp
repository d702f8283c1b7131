// Op schemas for svdgrow, in one place. Kernels live in csrc/cpu/*_cpu.cpp and
// csrc/cuda/*_cuda.cu and register themselves with TORCH_LIBRARY_IMPL; the fakes and the
// autograd registrations are in svdgrow/ops.py. Contracts: docs/design.md, section "Kernels".
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing svdgrow._C loads this library, which runs the registrations below.
// No pybind11: the ops are reached through torch.ops.svdgrow.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(svdgrow, m) {
  // Singular values (descending), U (m x r) and Vh (r x n) of every matrix in one call;
  // r = min(m, n) when k is None, else k ("Kernels: batched_svd").
  m.def(
      "batched_svd(Tensor[] mats, int? k=None, int niter=2, int oversample=8, "
      "int seed=0) -> (Tensor[], Tensor[], Tensor[])");
  // Keeps, reorders and adds rows / channels of many tensors, each viewed as [R, C, B];
  // returns the new tensors ("Kernels: slice_copy").
  m.def(
      "slice_copy(Tensor[] src, Tensor?[] row_index, Tensor?[] col_index, "
      "int[] block, Tensor?[] fill) -> Tensor[]");
  // The same, written into preallocated destinations.
  m.def(
      "slice_copy_(Tensor[] src, Tensor(a!)[] dst, Tensor?[] row_index, "
      "Tensor?[] col_index, int[] block, Tensor?[] fill) -> ()");
  // The first r[i] greedy pivots of each PSD matrix, in the order chosen: the columns that
  // column-pivoted QR of A would pick for grams[i] = A^T A ("Kernels: pivoted_cholesky").
  m.def("pivoted_cholesky(Tensor[] grams, int[] r, int block=64) -> Tensor[]");
}
