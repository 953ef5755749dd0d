// The fused forward's per-row gradients: see csrc/cpu/unitsface_row_grads.h.
#include "cpu/unitsface_row_grads.h"

#include "chunking.h"

namespace unitsface {

RowGrads::RowGrads(int64_t splits, int64_t B, int64_t D, bool has_bank,
                   const UnitsfaceOptions& o, const at::TensorOptions& opts)
    : has_bank_(has_bank), o_(o) {
  alpha_ = at::ones({splits, 2, B}, opts);
  acc_w_ = at::zeros({splits, B, D}, opts);
  if (has_bank) acc_b_ = at::zeros({splits, B, D}, opts);
}

void RowGrads::bind(UnitsfaceChunk& ck, const at::Tensor& state, int64_t sp) const {
  ck.softmax.grads = ck.softmax.dots;
  ck.softmax.target_state = state.narrow(0, kTargetState, 3);
  ck.softmax.alpha = alpha_[sp][0];
  ck.softmax.target_arg = state[kTargetArg];
  if (!has_bank_) return;
  ck.bank.grads = ck.bank.dots;
  ck.bank.sums = state.narrow(0, kUssSums, 3);
  ck.bank.alpha = alpha_[sp][1];
  ck.bank.weight = o_.uss_weight;
}

void RowGrads::accumulate(const UnitsfaceChunk& ck, int64_t sp, const at::Tensor& wc,
                          const at::Tensor& bc) {
  at::Tensor aw = acc_w_[sp];
  aw.mul_(alpha_[sp][0].unsqueeze(1));
  chunking::gemm_acc_k(aw, ck.softmax.grads, wc, o_.k());
  if (!has_bank_) return;
  at::Tensor ab = acc_b_[sp];
  if (o_.uss_lse) ab.mul_(alpha_[sp][1].unsqueeze(1));
  ab.addmm_(ck.bank.grads, bc);
}

void RowGrads::merge(const at::Tensor& soft, const at::Tensor& neg) {
  acc_w_ = (acc_w_ * soft.unsqueeze(2)).sum(0);
  if (!has_bank_) return;
  acc_b_ = neg.defined() ? (acc_b_ * neg.unsqueeze(2)).sum(0) : acc_b_.sum(0);
}

std::pair<at::Tensor, at::Tensor> RowGrads::finish(const at::Tensor& state,
                                                   const at::Tensor& stats,
                                                   const RowGradsInputs& in) const {
  const double s = o_.scale, lambda = o_.uss_weight;
  const at::ScalarType acc = in.x.scalar_type();
  const at::Tensor has_t = in.target >= 0;
  const at::Tensor tcol = in.target.clamp_min(0);
  const at::Tensor y = in.labels.clamp(0, in.centres.size(0) / in.k - 1);
  // the target class's arg-max sub-centre row: in centres, and among the S·K rows of nw
  const at::Tensor arg_t = state[kTargetArg].to(at::kLong);
  const at::Tensor zero = at::zeros_like(in.nx);
  // softmax: s·p·κ relative to the final Σ e^{z − m}, then the target's −s·κ_t·ŵ_t
  const at::Tensor p_norm = s / state[kSumExp];
  at::Tensor G = acc_w_ * p_norm.unsqueeze(1);
  at::Tensor h = state[kHw] * p_norm;
  const at::Tensor coef_t = at::where(has_t, -s * state[kTargetState + 1], zero);
  const at::Tensor w_t = in.centres.index_select(0, y * in.k + arg_t).to(in.read).to(acc);
  const at::Tensor inv_wt = chunking::inv_norms(in.nw, o_.eps).index_select(0, tcol * in.k + arg_t);
  G = G + (coef_t * inv_wt).unsqueeze(1) * w_t;
  h = h + coef_t * state[kTargetState];
  at::Tensor gsum = zero;  // Σ_c g'_ic of USS (λ included)
  if (has_bank_) {
    const at::Tensor sums_h = state[kUssSums], sums_g = state[kUssSums + 1];
    if (!o_.uss_lse) {
      G = G + acc_b_;
      h = h + sums_h;
      gsum = sums_g;
    } else {
      // negatives: g' = λ·s·e^{z⁻ − B}·σB' = (λ·s·σB' / s⁻)·e^{z⁻ − m⁻}
      const at::Tensor sn = state[kUss + 3];
      const at::Tensor c_n = at::where(sn > 0, lambda * s * stats[stats::kUss + stats::kSigmaB] / sn, zero);
      G = G + c_n.unsqueeze(1) * acc_b_;
      h = h + c_n * sums_h;
      // the positive (at most one bank row per class): g' = −λ·s·σA' (A = its z⁺), read as
      // the loss reads it (an invalid row is a zero row, and then no positive: σA' = 0)
      const at::Tensor g_p = -lambda * s * stats[stats::kUss + stats::kSigmaA];
      at::Tensor b_t = in.bank.index_select(0, y).to(in.read).to(acc);
      if (in.bank_valid.defined()) {
        b_t = at::where(in.bank_valid.index_select(0, y).unsqueeze(1), b_t, at::zeros({}, b_t.options()));
      }
      G = G + (g_p * chunking::inv_norms(in.nb, o_.eps).index_select(0, tcol)).unsqueeze(1) * b_t;
      h = h + g_p * state[kUssSums + 2];
      gsum = lambda * s * stats[stats::kUss + stats::kSigmaB] + g_p;
    }
  }
  return {chunking::normalised_grad(G, h, in.x, in.nx, o_.eps), gsum * (-1.0 / s)};
}

}  // namespace unitsface
