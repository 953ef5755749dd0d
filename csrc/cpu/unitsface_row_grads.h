// The per-row gradients of unitsface's fused forward (row_grads, CPU only; see
// unitsface_kernels/contract.py): dx_rows = ∂L_i/∂x_i and db_rows = ∂L_i/∂b (scalar b),
// formed in the forward's sweep over the classes, so that the backward needs neither a ∂x
// GEMM nor the bank GEMMs (6 GEMMs a step instead of 7; 5 are the useful ones of
// docs/design.md §7). L_i depends on x only through x_i, so ∂L/∂x_i = grad_rows_i·dx_rows_i
// for any upstream gradient.
//
// With G_i = Σ_c g_ic r̂_c and h_i = Σ_c g_ic cos_ic (docs/design.md §2), per split:
// * softmax: g_ic = s·p_ic·κ_c − s·κ_t·[c = y_i] with p_ic = e^{z_ic − m_i}/S_i. The row
//   kernel writes e^{z − m_new}·κ·inv_w, whose GEMM with the chunk's rows accumulates G
//   relative to the running max (rescaled by alpha = e^{m_old − m_new} first, like
//   flash-attention's output); the target's −s·κ_t term is added at the end.
// * USS pairs: g' = λ·∂(term)/∂cos is final at once: accumulated directly.
// * USS lse: the negatives like the softmax (relative to m⁻), their factor λ·s·σB'/s⁻ at the
//   end; the one positive (one bank row per class) from its cosine at the end.
#pragma once

#include <utility>

#include <ATen/ATen.h>

#include "options.h"
#include "unitsface.h"

namespace unitsface {

// Rows of the forward's running state [splits, rows, B] (csrc/cpu/unitsface_sweep.cpp): the plain
// forward's 7, then those of the fused forward.
enum StateRow : int64_t {
  kMax = 0,          // softmax: running max m of the logits
  kSumExp = 1,       //          Σ e^{z − m}
  kTargetLogit = 2,  //          z_iy
  kUss = 3,          // USS: 4 rows (UssRows::state)
  kPlainRows = 7,
  kTargetState = 7,  // fused: 3 rows (SoftmaxRows::target_state), the last (kHw) relative to m
  kHw = 9,
  kUssSums = 10,     // fused: 3 rows (UssRows::sums), the first relative to m⁻ (lse)
  kTargetArg = 13,   // fused: the target's arg-max sub-centre (SoftmaxRows::target_arg)
  kFusedRows = 14,
};

// What the finish reads besides the accumulators.
struct RowGradsInputs {
  at::Tensor x;       // B × D, accumulation dtype
  at::Tensor nx;      // B
  at::Tensor centres, bank, bank_valid;  // bank / bank_valid undefined without them
  at::Tensor labels;  // B int64
  at::Tensor target;  // B: the column of y_i in S, −1
  int64_t k = 1;      // K sub-centres per class
  at::Tensor nw, nb;  // S
  at::ScalarType read;  // x's dtype: rows of another dtype are read rounded to it
};

class RowGrads {
 public:
  RowGrads(int64_t splits, int64_t B, int64_t D, bool has_bank, const UnitsfaceOptions& o,
           const at::TensorOptions& opts);

  // Points the chunk's fused-forward outputs at split sp's buffers (the chunk's dots are set;
  // the weights are written over them). `state` is the split's running state.
  void bind(UnitsfaceChunk& ck, const at::Tensor& state, int64_t sp) const;

  // After the chunk's epilogue: rescale split sp's accumulators to the new running maxima and
  // add the chunk's weights times its rows (wc: W rows, bc: bank rows).
  void accumulate(const UnitsfaceChunk& ck, int64_t sp, const at::Tensor& wc,
                  const at::Tensor& bc);

  // Merge the splits: soft, neg = merge_splits' factors of the softmax max and of the USS
  // negatives' max (lse; else undefined).
  void merge(const at::Tensor& soft, const at::Tensor& neg);

  // (dx_rows [B, D], db_rows [B]) from the merged state, the statistics and the accumulators.
  std::pair<at::Tensor, at::Tensor> finish(const at::Tensor& state, const at::Tensor& stats,
                                           const RowGradsInputs& in) const;

 private:
  bool has_bank_;
  UnitsfaceOptions o_;
  at::Tensor alpha_;         // [splits, 2, B]: the chunk's rescale factors (softmax, USS lse)
  at::Tensor acc_w_, acc_b_; // [splits, B, D] (merged: [B, D])
};

}  // namespace unitsface
