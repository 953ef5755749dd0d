// unitsface::unitsface_fwd / unitsface_bwd — the native partial-FC margin softmax plus
// λ·USS on the memory bank rows of the same classes (DESIGN.md §1.2–§1.3).
//
// The drivers (csrc/unitsface.cpp) stream the class index S in chunks of c columns: per chunk
// the W rows (and bank rows) of the chunk's classes — a view, or a chunk-sized gathered copy
// under partial FC — one GEMM each for the raw dots, one epilogue pass (CPU loop in
// csrc/unitsface.cpp, CUDA kernel in csrc/unitsface_cuda.cu, maths in csrc/epilogue.h).
// Outputs are those of the Triton ops (library.py): rows [B], stats [7, B] = (lse_c z_ic,
// A, σA, B, σB, z_iy, USS loss), nx [B], nw [S], nb [S] (empty without a bank). A label that
// matches no column has no target: z_iy = 0 and no USS positive.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace unitsface {

// One chunk of the class index: columns [col0, col0 + c).
struct UnitsfaceChunk {
  at::Tensor dots_w;   // B × c raw x_i · w_c (acc dtype); undefined when !do_w
  at::Tensor dots_b;   // B × c raw x_i · bank_c; undefined when !do_b
  at::Tensor grads_w;  // backward: B × c, receives g_ic·inv_w_c (may alias dots_w)
  at::Tensor grads_b;  // backward: B × c, receives g'_ic·inv_b_c (may alias dots_b)
  at::Tensor inv_x;    // B
  at::Tensor inv_w;    // c
  at::Tensor inv_b;    // c (do_b)
  at::Tensor target;   // B int64: the column (in S) of y_i, −1 when y_i is not in S
  at::Tensor valid;    // c bool: bank slot written (do_b)
  at::Tensor bias;     // c: b_c (a scalar b expanded) (do_b)
  int64_t col0 = 0;
  bool do_w = true, do_b = false;
  double scale = 0.0, margin_cos = 0.0, cos_m2 = 1.0, sin_m2 = 0.0, m2_sin_m2 = 0.0;
  bool arc = false;
  double uss_margin = 0.0, uss_weight = 0.0;
  bool uss_lse = false;
  at::Tensor state;  // forward: 7 × B (m, Σe, Σ z_iy, USS: Σ softplus | m⁺, s⁺, m⁻, s⁻);
                     // fused forward: kGradState × B (see unitsface_forward_grad)
  at::Tensor alpha;  // fused forward only: 2 × B, the chunk's rescale factors e^{m_old − m_new}
                     // of the softmax and of the USS negatives (lse); its presence selects
                     // the fused epilogue, which also overwrites the dots with the weights of
                     // the ∂x GEMMs
  at::Tensor go;     // backward: B
  at::Tensor stats;  // backward: 7 × B
  at::Tensor hs;     // backward: 2 × B, += (Σ g·cos over both losses, Σ_c g'_ic of USS)
};

using UnitsfaceEpilogue = void (*)(const UnitsfaceChunk&);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unitsface_forward(
    const at::Tensor& x, const at::Tensor& centres, const std::optional<at::Tensor>& bank,
    const at::Tensor& labels, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& bank_valid, const std::optional<at::Tensor>& bias,
    double scale, double margin_arc, double margin_cos, double uss_margin, double uss_weight,
    bool uss_lse, UnitsfaceEpilogue epilogue);

// Fused forward (unitsface::unitsface_fwd_g, CPU): the outputs of unitsface_forward plus
// dx_rows [B, D] = ∂L_i/∂x_i and db_rows [B] = ∂L_i/∂b (for a scalar b), formed in the same
// sweep over the classes: the softmax part of G_i = Σ_c g_ic ŵ_c is accumulated with the
// running max like flash-attention's output (rescaled by e^{m_old − m_new}), the USS part
// directly (pairs) or rescaled too (lse), so the backward needs no ∂x GEMM and no bank GEMM.
// L_i depends on x only through x_i, so ∂L/∂x_i = grad_rows_i · dx_rows_i for any upstream.
constexpr int64_t kGradState = 13;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
unitsface_forward_grad(const at::Tensor& x, const at::Tensor& centres,
                       const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                       const std::optional<at::Tensor>& index,
                       const std::optional<at::Tensor>& bank_valid,
                       const std::optional<at::Tensor>& bias, double scale, double margin_arc,
                       double margin_cos, double uss_margin, double uss_weight, bool uss_lse,
                       UnitsfaceEpilogue epilogue);

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_backward(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, double scale, double margin_arc,
    double margin_cos, double uss_margin, double uss_weight, bool uss_lse, bool need_dx,
    bool need_dw, bool need_dbias, UnitsfaceEpilogue epilogue);

// The backward of the fused forward: ∂x = grad_rows_i·dx_rows_i, a scalar b's
// ∂b = Σ_i grad_rows_i·db_rows_i; ∂W (and a per-class b's ∂b) by unitsface_backward's sweep.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_backward_grad(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, const at::Tensor& dx_rows,
    const at::Tensor& db_rows, double scale, double margin_arc, double margin_cos,
    double uss_margin, double uss_weight, bool uss_lse, bool need_dx, bool need_dw,
    bool need_dbias, UnitsfaceEpilogue epilogue);

}  // namespace unitsface
