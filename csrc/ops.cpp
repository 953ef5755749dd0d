// The Python module unitsface_kernels._C. The op schemas are defined in Python
// (unitsface_kernels/contract.py, torch.library DEF of the `unitsface` namespace); this
// extension only registers kernels for them, each op family in its own files:
//
//   uss_{fwd,bwd}_native        csrc/uss.cpp (drivers), csrc/uss_cpu.cpp, csrc/uss_cuda.cu
//   unitsface_{fwd,bwd}_native  csrc/unitsface.cpp (CPU driver), csrc/unitsface_cpu.cpp,
//                               csrc/unitsface_cuda.cu (the CUDA sweep, its own driver)
//   bank_update_                csrc/bank_update.cpp, csrc/bank_update_cuda.cu
//
// `import unitsface_kernels._C` only has to run the static initialisers of those files (their
// TORCH_LIBRARY_IMPL blocks register the kernels with the dispatcher). The module itself has
// one plain function, cuda_plan, the chunk plan of the CUDA sweep (csrc/cuda_plan.h): host
// arithmetic, there in every build, so that the CPU tests and benchmarks/native_cost.py
// read the plan the CUDA code uses. The pattern of pytorch/extension-cpp, without pybind11.
#include <Python.h>

#include "cuda_plan.h"

namespace {

// cuda_plan(B, S, D, parts, acc_bytes, x_bytes, with_q, l2_bytes)
//   -> (c, kw, ns, n_chunks, ns_used, budget_elems)
PyObject* cuda_plan(PyObject* /*self*/, PyObject* args) {
  long long B = 0, S = 0, D = 0, parts = 0, acc = 0, xb = 0, l2 = 0;
  int with_q = 0;
  if (!PyArg_ParseTuple(args, "LLLLLLpL", &B, &S, &D, &parts, &acc, &xb, &with_q, &l2)) {
    return nullptr;
  }
  namespace plan = unitsface::cuda_plan;
  const int64_t budget =
      plan::budget_elems(l2, plan::bytes_per_elem(B, D, parts, acc, xb, with_q != 0));
  const plan::SweepPlan p = plan::plan_sweep(B, S, budget);
  return Py_BuildValue("(LLLLLL)", static_cast<long long>(p.c), static_cast<long long>(p.kw),
                       static_cast<long long>(p.ns), static_cast<long long>(p.n_chunks),
                       static_cast<long long>(p.ns_used), static_cast<long long>(budget));
}

PyMethodDef methods[] = {
    {"cuda_plan", cuda_plan, METH_VARARGS,
     "cuda_plan(B, S, D, parts, acc_bytes, x_bytes, with_q, l2_bytes) -> (c, kw, ns, n_chunks, "
     "ns_used, budget): the chunk / split-K plan of the native CUDA sweep (csrc/cuda_plan.h)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "unitsface_kernels native kernels; the ops are torch.ops.unitsface.*",
      -1,  // size of per-interpreter state
      methods,
  };
  return PyModule_Create(&module_def);
}
}
