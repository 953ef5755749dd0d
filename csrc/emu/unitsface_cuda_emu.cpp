// The unitsface family's CUDA sweep (csrc/cuda/unitsface_sweep.cu and its kernels) built for the host
// with the emulation of csrc/emu/cuda_emu.h, its ops registered for CPU tensors as
// unitsface_emu::unitsface_fwd / unitsface_bwd (the schemas of the native ops). Test-only: not
// part of the extension (setup.py compiles csrc/*.cpp, not this folder); tests/test_cuda_emu.py
// builds it with torch.utils.cpp_extension.load and compares it with the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

#define UNITSFACE_CUDA_EMU 1
#include "../cuda/unitsface_sweep.cu"

namespace {
int64_t kernel_launches() { return cuda_emu::g_launches; }
}  // namespace

TORCH_LIBRARY(unitsface_emu, m) {
  m.def("kernel_launches() -> int", &kernel_launches);
  m.def("unitsface_fwd(Tensor x, Tensor centres, Tensor? bank, Tensor labels, Tensor? index, "
        "Tensor? bank_valid, Tensor? bias, Tensor? margin_rows, float[] options, "
        "bool row_grads=False, "
        "bool sparse_grad=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  m.def("unitsface_bwd(Tensor grad_rows, Tensor x, Tensor centres, Tensor? bank, "
        "Tensor labels, Tensor? index, Tensor? bank_valid, Tensor? bias, Tensor? margin_rows, "
        "Tensor stats, "
        "Tensor nx, Tensor nw, Tensor nb, Tensor dx_rows, Tensor db_rows, Tensor exps, "
        "Tensor exp_rows, float[] options, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.impl("unitsface_fwd", c10::DispatchKey::CPU,
         &unitsface::unitsface_fwd_op<&unitsface::forward_cuda>);
  m.impl("unitsface_bwd", c10::DispatchKey::CPU,
         &unitsface::unitsface_bwd_op<&unitsface::backward_cuda>);
}
