// unitsface::uss_fwd / uss_bwd — the native (chunked GEMM + fused epilogue) USS loss.
//
// The drivers (csrc/uss.cpp) are device-agnostic ATen code: per chunk of reference rows one
// GEMM of raw dot products, then one epilogue pass (the CPU loop in csrc/uss.cpp or the CUDA
// kernel in csrc/uss_cuda.cu, both built on csrc/epilogue.h), then the gradient GEMMs.
// Semantics, outputs and statistics are those of the Triton ops (library.py):
//   rows [B] (fp32, fp64 for fp64 inputs), stats [4, B] = (A, σ(A)·[A unclamped], B,
//   σ(B)·[B unclamped]) for the lse form and zeros for pairs, nx [B] = ||x_i||, nr [N].
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace unitsface {

// One chunk of the USS epilogue: reference rows (columns) [col0, col0 + c).
struct UssChunk {
  at::Tensor dots;        // B × c raw dots x_i · r_j (acc dtype)
  at::Tensor grads;       // backward: B × c, receives g_ij·inv_r_j (may alias `dots`)
  at::Tensor inv_x;       // B    1 / max(||x_i||, eps)
  at::Tensor inv_r;       // c    1 / max(||r_j||, eps)
  at::Tensor labels;      // B    int64 y_i
  at::Tensor col_labels;  // c    int64 l_j
  at::Tensor valid;       // c    bool v_j
  at::Tensor bias;        // c    b_j (a scalar b expanded)
  int64_t col0 = 0;
  bool in_batch = false;  // P_i excludes j = i
  double scale = 0.0, margin = 0.0;
  bool lse = false, clamp = false;
  at::Tensor state;  // forward: 4 × B running statistics (pairs: Σ softplus; lse: m⁺, s⁺, m⁻, s⁻)
  at::Tensor go;     // backward: B upstream gradient
  at::Tensor stats;  // backward: 4 × B (A, σA, B, σB)
  at::Tensor hs;     // backward: 2 × B, += (Σ_j g_ij cos_ij, Σ_j g_ij)
};

using UssEpilogue = void (*)(const UssChunk&);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> uss_forward(
    const at::Tensor& x, const at::Tensor& ref, const at::Tensor& labels,
    const at::Tensor& ref_labels, const std::optional<at::Tensor>& ref_valid,
    const at::Tensor& bias, double scale, double margin, bool lse, bool clamp, bool in_batch,
    UssEpilogue epilogue);

std::tuple<at::Tensor, at::Tensor, at::Tensor> uss_backward(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& ref,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias, const at::Tensor& nx,
    const at::Tensor& nr, const at::Tensor& stats, double scale, double margin, bool lse,
    bool clamp, bool in_batch, bool need_dx, bool need_dref, bool need_dbias,
    UssEpilogue epilogue);

}  // namespace unitsface
