// The `unitsface` operator namespace: every schema of the package is defined here, in
// one TORCH_LIBRARY block (a namespace may have only one). Each op family lives in its
// own files and registers its kernels with TORCH_LIBRARY_IMPL(unitsface, CPU/CUDA, m):
//
//   bank_update_   csrc/bank_update.cpp (CPU), csrc/bank_update_cuda.cu (CUDA)
//
// To add an op family: add its m.def(...) lines below (grouped, with a comment naming
// its source files), then implement it in csrc/<family>.cpp / csrc/<family>_cuda.cu and
// register a fake (meta) implementation in Python (unitsface_kernels/native.py) so that
// torch.compile can trace it.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(unitsface, m) {
  // --- memory bank ---------------------------------------------------------------------
  // bank[labels[i]] = x[i] / max(||x[i]||, 1e-5) (in fp32, fp64 for fp64 x), cast to the
  // bank's dtype; bank_valid[labels[i]] = true. The last occurrence of a label wins.
  m.def("bank_update_(Tensor(a!) bank, Tensor(b!) bank_valid, Tensor x, Tensor labels) -> ()");

  // --- (other op families: add their schemas here) -----------------------------------
}

// `import unitsface_kernels._C` only has to run the static initialisers above (which
// register the ops with the dispatcher); the Python module itself is empty. This is the
// pattern of pytorch/extension-cpp, without pybind11.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "unitsface_kernels native ops; they are registered as torch.ops.unitsface.*",
      -1,  // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
