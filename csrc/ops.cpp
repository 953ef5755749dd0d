// The Python module unitsface_kernels._C. The op schemas are defined in Python
// (unitsface_kernels/contract.py, torch.library DEF of the `unitsface` namespace); this
// extension only registers kernels for them, each op family in its own files:
//
//   uss_{fwd,bwd}_native        csrc/uss.cpp (drivers), csrc/uss_cpu.cpp, csrc/uss_cuda.cu
//   unitsface_{fwd,bwd}_native  csrc/unitsface.cpp (drivers), csrc/unitsface_cpu.cpp,
//                               csrc/unitsface_cuda.cu
//   bank_update_                csrc/bank_update.cpp, csrc/bank_update_cuda.cu
//
// `import unitsface_kernels._C` only has to run the static initialisers of those files (their
// TORCH_LIBRARY_IMPL blocks register the kernels with the dispatcher); the Python module
// itself is empty. The pattern of pytorch/extension-cpp, without pybind11.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "unitsface_kernels native kernels; the ops are torch.ops.unitsface.*",
      -1,  // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
