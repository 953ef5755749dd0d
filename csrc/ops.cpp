// The Python module unitsface_kernels._C. The op schemas are defined in Python
// (unitsface_kernels/contract.py, torch.library DEF of the `unitsface` namespace); this
// extension only registers kernels for them, each op family in its own files:
//
//   uss_{fwd,bwd}_native        csrc/uss_sweep.cpp (drivers), csrc/cpu/uss.cpp, csrc/cuda/uss.cu
//   unitsface_{fwd,bwd}_native  csrc/cpu/unitsface_sweep.cpp (CPU driver), csrc/cpu/unitsface.cpp,
//                               csrc/cuda/unitsface_sweep.cu (the CUDA sweep, its own driver)
//   bank_update_                csrc/bank_update.cpp, csrc/cuda/bank_update.cu
//
// `import unitsface_kernels._C` only has to run the static initialisers of those files (their
// TORCH_LIBRARY_IMPL blocks register the kernels with the dispatcher). The module itself has
// plain functions for what the tests and tools read of the C++ side, there in every build:
// cuda_plan, the chunk plan of the CUDA sweep (csrc/cuda_plan.h: host arithmetic, so that the
// CPU tests and benchmarks/native_cost.py read the plan the CUDA code uses), option_fields,
// the field tables of csrc/options.h, and selected_isa, the instruction set of the CPU row
// kernels. The pattern of pytorch/extension-cpp, without pybind11.
#include <Python.h>

#include <string>
#include <vector>

#include "cpu/row_kernels.h"
#include "cuda_plan.h"
#include "options.h"

namespace {

// cuda_plan(B, S, D, parts, acc_bytes, x_bytes, with_q, l2_bytes)
//   -> (c, kw, ns, n_chunks, ns_used, budget_elems)
PyObject* cuda_plan(PyObject* /*self*/, PyObject* args) {
  long long B = 0, S = 0, D = 0, parts = 0, acc = 0, xb = 0, l2 = 0;
  int with_q = 0;
  if (!PyArg_ParseTuple(args, "LLLLLLpL", &B, &S, &D, &parts, &acc, &xb, &with_q, &l2)) {
    return nullptr;
  }
  const unitsface::cuda_plan::SweepPlan p =
      unitsface::cuda_plan::plan_chunks(B, S, D, parts, acc, xb, with_q != 0, l2);
  return Py_BuildValue("(LLLLLL)", static_cast<long long>(p.c), static_cast<long long>(p.kw),
                       static_cast<long long>(p.ns), static_cast<long long>(p.n_chunks),
                       static_cast<long long>(p.ns_used), static_cast<long long>(p.budget));
}

PyObject* names_tuple(const std::vector<std::string>& names) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* s = PyUnicode_FromString(names[i].c_str());
    if (s == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), s);
  }
  return out;
}

// option_fields(struct_name) -> the field names of UssOptions or UnitsfaceOptions, in order
PyObject* option_fields(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  const std::string which(name);
  if (which == unitsface::UssOptions::kName) {
    return names_tuple(unitsface::option_field_names<unitsface::UssOptions>());
  }
  if (which == unitsface::UnitsfaceOptions::kName) {
    return names_tuple(unitsface::option_field_names<unitsface::UnitsfaceOptions>());
  }
  PyErr_Format(PyExc_ValueError, "option_fields: no settings struct %R (UssOptions or "
               "UnitsfaceOptions)", PyTuple_GET_ITEM(args, 0));
  return nullptr;
}

// selected_isa() -> "base" | "avx2" | "avx512": the instruction set whose CPU row kernels run
// now (csrc/cpu/row_kernels.h: this CPU's widest, capped by UNITSFACE_NATIVE_ISA)
PyObject* selected_isa(PyObject* /*self*/, PyObject* /*args*/) {
  try {
    return PyUnicode_FromString(unitsface::cpu::isa_name(unitsface::cpu::isa_level()));
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cuda_plan", cuda_plan, METH_VARARGS,
     "cuda_plan(B, S, D, parts, acc_bytes, x_bytes, with_q, l2_bytes) -> (c, kw, ns, n_chunks, "
     "ns_used, budget): the chunk / split-K plan of the native CUDA sweep (csrc/cuda_plan.h)"},
    {"option_fields", option_fields, METH_VARARGS,
     "option_fields(struct_name) -> tuple of the field names that csrc/options.h unpacks for "
     "'UssOptions' or 'UnitsfaceOptions', in packing order"},
    {"selected_isa", selected_isa, METH_NOARGS,
     "selected_isa() -> 'base' | 'avx2' | 'avx512': the instruction set of the CPU row kernels "
     "now (this CPU's widest, capped by UNITSFACE_NATIVE_ISA)"},
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
