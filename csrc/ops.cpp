// Op schemas for svdgrow, in one place. Kernels live in csrc/cpu/*_cpu.cpp and
// csrc/cuda/*_cuda.cu and register themselves with TORCH_LIBRARY_IMPL.
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
  // Singular values (descending), U (m x r) and Vh (r x n) of every matrix in one call.
  // r = min(m, n) when k is None, else k. Matrices may have different shapes.
  m.def(
      "batched_svd(Tensor[] mats, int? k=None, int niter=2, int oversample=8, "
      "int seed=0) -> (Tensor[], Tensor[], Tensor[])");
  // Functional slice copy: each src[i] is viewed as [R, C, B] with R = size(0) and
  // B = block[i]; row_index[i] (length R') and col_index[i] (length C') pick source
  // rows / channels (-1 = a new slice, filled from fill[i] or with zeros); None keeps
  // that dimension as it is. Returns the new tensors.
  m.def(
      "slice_copy(Tensor[] src, Tensor?[] row_index, Tensor?[] col_index, "
      "int[] block, Tensor?[] fill) -> Tensor[]");
  // The same, written into preallocated destinations (contiguous, the result's shape).
  m.def(
      "slice_copy_(Tensor[] src, Tensor(a!)[] dst, Tensor?[] row_index, "
      "Tensor?[] col_index, int[] block, Tensor?[] fill) -> ()");
}
