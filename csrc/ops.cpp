// The `unitsface` operator namespace: every schema of the package is defined here, in
// one TORCH_LIBRARY block (a namespace may have only one). Each op family lives in its
// own files and registers its kernels with TORCH_LIBRARY_IMPL(unitsface, CPU/CUDA, m):
//
//   bank_update_   csrc/bank_update.cpp (CPU), csrc/bank_update_cuda.cu (CUDA)
//   uss_fwd/_bwd   csrc/uss.cpp (drivers + CPU), csrc/uss_cuda.cu (CUDA)
//   unitsface_fwd/_bwd  csrc/unitsface.cpp (drivers + CPU), csrc/unitsface_cuda.cu (CUDA)
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

  // --- native fused losses (chunked GEMM + fused epilogue) ------------------------------
  // The schemas of the Triton ops in unitsface_kernels/library.py, without "_triton": same
  // outputs and statistics. csrc/uss.cpp, csrc/unitsface.cpp (CPU), csrc/*_cuda.cu (CUDA).
  m.def("uss_fwd(Tensor x, Tensor ref, Tensor labels, Tensor ref_labels, Tensor? ref_valid, "
        "Tensor bias, float scale, float margin, bool lse, bool clamp, bool in_batch) "
        "-> (Tensor rows, Tensor stats, Tensor nx, Tensor nr)");
  m.def("uss_bwd(Tensor grad_rows, Tensor x, Tensor ref, Tensor labels, Tensor ref_labels, "
        "Tensor? ref_valid, Tensor bias, Tensor nx, Tensor nr, Tensor stats, float scale, "
        "float margin, bool lse, bool clamp, bool in_batch, bool need_dx, bool need_dref, "
        "bool need_dbias) -> (Tensor, Tensor, Tensor)");
  m.def("unitsface_fwd(Tensor x, Tensor centres, Tensor? bank, Tensor labels, Tensor? index, "
        "Tensor? bank_valid, Tensor? bias, float scale, float margin_arc, float margin_cos, "
        "float uss_margin, float uss_weight, bool uss_lse) "
        "-> (Tensor rows, Tensor stats, Tensor nx, Tensor nw, Tensor nb)");
  m.def("unitsface_bwd(Tensor grad_rows, Tensor x, Tensor centres, Tensor? bank, Tensor labels, "
        "Tensor? index, Tensor? bank_valid, Tensor? bias, Tensor nx, Tensor nw, Tensor nb, "
        "Tensor stats, float scale, float margin_arc, float margin_cos, float uss_margin, "
        "float uss_weight, bool uss_lse, bool need_dx, bool need_dw, bool need_dbias) "
        "-> (Tensor, Tensor, Tensor)");

  // The fused forward of the objective (CPU): the outputs of unitsface_fwd plus
  // dx_rows = ∂L_i/∂x_i and db_rows = ∂L_i/∂b, formed in the forward sweep, so that its
  // backward recomputes only the W cosines (for ∂W). csrc/unitsface.cpp; wired in
  // unitsface_kernels/native.py.
  m.def("unitsface_fwd_g(Tensor x, Tensor centres, Tensor? bank, Tensor labels, Tensor? index, "
        "Tensor? bank_valid, Tensor? bias, float scale, float margin_arc, float margin_cos, "
        "float uss_margin, float uss_weight, bool uss_lse) -> (Tensor rows, Tensor stats, "
        "Tensor nx, Tensor nw, Tensor nb, Tensor dx_rows, Tensor db_rows)");
  m.def("unitsface_bwd_g(Tensor grad_rows, Tensor x, Tensor centres, Tensor? bank, "
        "Tensor labels, Tensor? index, Tensor? bank_valid, Tensor? bias, Tensor nx, Tensor nw, "
        "Tensor nb, Tensor stats, Tensor dx_rows, Tensor db_rows, float scale, "
        "float margin_arc, float margin_cos, float uss_margin, float uss_weight, bool uss_lse, "
        "bool need_dx, bool need_dw, bool need_dbias) -> (Tensor, Tensor, Tensor)");

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
