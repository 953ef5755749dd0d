// unitsface::unitsface_fwd / unitsface_bwd — the chunked drivers (device-agnostic ATen code)
// and the CPU epilogue. See csrc/unitsface.h for the contract, csrc/epilogue.h for the maths.
//
// Forward, per chunk of c classes of S: ||w||, ||bank|| of the chunk, the GEMMs x·W_cᵀ and
// x·bank_cᵀ (raw; inverse norms applied in the epilogue), one epilogue pass per row: online
// max / sum-exp of the margin logits, the target logit, the USS sums or running lse pairs.
// Backward, per chunk: the same GEMMs, one epilogue pass writing g·inv_w (softmax) and
// g'·inv_b (USS) over the dots and accumulating h_i, Σ g'; then
//   G  += g_W · W_c + g_B · bank_c       (∂x)
//   Q_c = g_Wᵀ · x̂                        (∂W rows of the chunk's classes; zero elsewhere)
//   Σ_i g'_ic                             (∂b_c of a per-class threshold)
// The target column of row i is found once per call (binary search of y_i in the sorted
// index), so the epilogue loops treat every other column alike and vectorise. On the CPU the
// chunks are shared out among the intra-op threads ("splits", merged at the end; chunking.h).
//
// unitsface_fwd_g / unitsface_bwd_g (CPU): the fused forward also forms ∂L_i/∂x_i in its
// sweep — the softmax part of G_i accumulated with the running max and rescaled like
// flash-attention's output, the USS part directly (pairs) or rescaled (lse) — so that the
// backward only recomputes x·W_cᵀ for ∂W: 6 GEMMs per step (2 + 2 in the forward, 2 in the
// backward) instead of 7, 5 of which are the useful ones of DESIGN.md §7.
#include "unitsface.h"

#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "chunking.h"
#include "common.h"
#include "cpu_loops.h"
#include "epilogue.h"

namespace unitsface {

using chunking::acc_type;
using chunking::chunk_rows;
using chunking::scratch;

namespace {

void check_unitsface_args(const char* op, const at::Tensor& x, const at::Tensor& centres,
                          const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                          const std::optional<at::Tensor>& index,
                          const std::optional<at::Tensor>& bank_valid,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(centres.dim() == 2 && centres.size(1) == x.size(1), op,
                    ": centres must be (C, D) with D = ", x.size(1), ", got shape ",
                    centres.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(centres.scalar_type() == x.scalar_type(), op, ": centres has dtype ",
                   centres.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), op,
                    ": labels must have shape (", x.size(0), ",), got ", labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()), op,
                   ": labels must be an integer tensor");
  const auto dev = x.device();
  TORCH_CHECK_VALUE(centres.device() == dev && labels.device() == dev, op,
                    ": every tensor must be on ", dev);
  const int64_t C = centres.size(0);
  if (index.has_value()) {
    TORCH_CHECK_TYPE(!at::isFloatingType(index->scalar_type()), op,
                     ": index must be an integer tensor");
    TORCH_CHECK_VALUE(index->dim() == 1 && index->device() == dev, op,
                      ": index must be 1-D on ", dev);
  }
  if (bank.has_value()) {
    TORCH_CHECK_VALUE(bank->dim() == 2 && bank->size(0) == C && bank->size(1) == x.size(1), op,
                      ": bank must have the shape of centres ", centres.sizes(), ", got ",
                      bank->sizes());
    TORCH_CHECK_TYPE(bank->scalar_type() == x.scalar_type(), op, ": bank has dtype ",
                     bank->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(bank->device() == dev, op, ": bank must be on ", dev);
    TORCH_CHECK_VALUE(bias.has_value(), op, ": the USS part (a bank) needs a bias");
  }
  if (bank_valid.has_value()) {
    TORCH_CHECK_TYPE(bank_valid->scalar_type() == at::kBool, op,
                     ": bank_valid must be a bool tensor");
    TORCH_CHECK_VALUE(bank_valid->dim() == 1 && bank_valid->size(0) == C &&
                          bank_valid->device() == dev,
                      op, ": bank_valid must have shape (", C, ",) on ", dev);
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), op,
                     ": bias must be a floating tensor");
    TORCH_CHECK_VALUE(bias->numel() == 1 || bias->numel() == C, op,
                      ": bias must hold 1 value or one per class (", C, "), got shape ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == dev, op, ": bias must be on ", dev);
  }
}

// Per-call inputs shared by forward and backward.
struct Classes {
  at::Tensor index;   // int64 S (undefined: all classes)
  at::Tensor target;  // int64 B: column of y_i in S, −1 if none
  at::Tensor valid;   // bool C (all true when no mask)
  at::Tensor bias;    // acc, 1 or C values
  at::Tensor bias_fill;
  bool vector_bias = false;
  int64_t S = 0;
};

Classes classes_of(const at::Tensor& labels, const at::Tensor& centres,
                   const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank,
                   const std::optional<at::Tensor>& bank_valid,
                   const std::optional<at::Tensor>& bias, int64_t B, at::ScalarType acc,
                   bool cuda) {
  Classes k;
  const int64_t C = centres.size(0);
  const at::Tensor y = labels.to(at::kLong).contiguous();
  if (index.has_value()) {
    k.index = index->to(at::kLong).contiguous();
    k.S = k.index.numel();
    if (!cuda) {  // the target search needs a sorted, unique index (ops.py checks it too)
      const int64_t* p = k.index.const_data_ptr<int64_t>();
      for (int64_t j = 0; j + 1 < k.S; ++j) {
        TORCH_CHECK_VALUE(p[j] < p[j + 1],
                          "unitsface: index must be sorted (ascending) and unique");
      }
    }
    if (k.S > 0) {
      const at::Tensor pos = at::searchsorted(k.index, y).clamp_max(k.S - 1);
      k.target = at::where(k.index.index_select(0, pos) == y, pos, at::full_like(pos, -1));
    } else {
      k.target = at::full({B}, -1, y.options());
    }
  } else {
    k.S = C;
    k.target = at::where(at::logical_and(y >= 0, y < C), y, at::full_like(y, -1));
  }
  k.target = k.target.contiguous();
  if (bank.has_value()) {
    k.valid = bank_valid.has_value() ? bank_valid->contiguous()
                                     : at::ones({C}, labels.options().dtype(at::kBool));
    k.bias = bias->detach().reshape({-1}).to(acc).contiguous();
    k.vector_bias = k.bias.numel() > 1;
  }
  return k;
}

// rows [j0, j0 + n) of the per-class vector v (through the index)
at::Tensor class_slice(const at::Tensor& v, const Classes& k, int64_t j0, int64_t n) {
  return k.index.defined() ? v.index_select(0, k.index.narrow(0, j0, n))
                           : v.narrow(0, j0, n);
}

void set_bank_columns(UnitsfaceChunk& ck, const Classes& k, int64_t j0, int64_t n) {
  ck.valid = class_slice(k.valid, k, j0, n).contiguous();
  ck.bias = k.vector_bias ? class_slice(k.bias, k, j0, n).contiguous()
                          : k.bias_fill.narrow(0, 0, n);
}

void set_params(UnitsfaceChunk& ck, double scale, double margin_arc, double margin_cos,
                double uss_margin, double uss_weight, bool uss_lse) {
  ck.scale = scale;
  ck.margin_cos = margin_cos;
  ck.cos_m2 = std::cos(margin_arc);
  ck.sin_m2 = std::sin(margin_arc);
  ck.m2_sin_m2 = margin_arc * std::sin(margin_arc);
  ck.arc = margin_arc != 0.0;
  ck.uss_margin = uss_margin;
  ck.uss_weight = uss_weight;
  ck.uss_lse = uss_lse;
}

// ∂W rows of a chunk on the CPU, in one pass: dw[row_j] = Q_j − inv_w_j²·(Q_j·w_j)·w_j (no
// projection where ||w_j|| < eps), row_j = idx[j] or j0 + j. `q` may be those very rows of
// dw (then it is updated in place). Q_j·w_j = h_j = Σ_i g_ij cos_ij (see chunking.h).
template <typename T, typename O>
void column_fix_rows(const T* q, const T* w, const T* nw, O* out, const int64_t* idx,
                     int64_t j0, int64_t n, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(D, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* qj = q + j * D;
      const T* wj = w + j * D;
      T h = 0;
#pragma omp simd reduction(+ : h)
      for (int64_t d = 0; d < D; ++d) h += qj[d] * wj[d];
      const T inv = epi::inv_norm<T>(nw[j]);
      const T coef = nw[j] >= static_cast<T>(kNormEps) ? h * inv * inv : T(0);
      O* oj = out + (idx != nullptr ? idx[j] : j0 + j) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) oj[d] = static_cast<O>(qj[d] - coef * wj[d]);
    }
  });
}

void column_fix_cpu(const at::Tensor& q, const at::Tensor& wc, const at::Tensor& nw_chunk,
                    at::Tensor& dw, const at::Tensor& idx_chunk, int64_t j0) {
  const at::Tensor w = wc.scalar_type() == q.scalar_type() ? wc : wc.to(q.scalar_type());
  const int64_t n = q.size(0), D = q.size(1);
  const int64_t* idx = idx_chunk.defined() ? idx_chunk.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "column_fix_cpu", [&] {
    using T = scalar_t;
    const T* qp = q.const_data_ptr<T>();
    const T* wp = w.const_data_ptr<T>();
    const T* np = nw_chunk.const_data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw.scalar_type(), "column_fix_out",
                                    [&] {
                                      column_fix_rows<T, scalar_t>(qp, wp, np,
                                                                   dw.data_ptr<scalar_t>(), idx,
                                                                   j0, n, D);
                                    });
  });
}

}  // namespace

// ============================================================================ drivers

namespace {

// The outputs of the forward; dx_rows / db_rows only in the fused (grad) mode.
struct ForwardOut {
  at::Tensor rows, stats, nx, nw, nb, dx_rows, db_rows;
};

// fused-mode state rows (kGradState × B)
enum GradState : int64_t {
  kM = 0,      // running max of the logits
  kS = 1,      // Σ e^{z − m}
  kZt = 2,     // the target logit z_iy
  kRawT = 3,   // the target's raw cosine
  kKappaT = 4, // f'(cos_iy) (0 where the clamp is active)
  kHw = 5,     // Σ e^{z − m}·κ·cos (rescaled like kS)
  kU0 = 6,     // USS pairs: Σ softplus | lse: m⁺
  kU1 = 7,     // lse: s⁺
  kMn = 8,     // lse: m⁻
  kSn = 9,     // lse: s⁻ = Σ e^{z⁻ − m⁻}
  kHb = 10,    // USS: Σ g'·cos (pairs) | Σ e^{z⁻ − m⁻}·cos (lse)
  kGsb = 11,   // USS pairs: Σ g'
  kCosTb = 12, // the cosine of the positive bank row
};

ForwardOut forward_impl(const at::Tensor& x_in, const at::Tensor& centres_in,
                        const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                        const std::optional<at::Tensor>& index,
                        const std::optional<at::Tensor>& bank_valid,
                        const std::optional<at::Tensor>& bias, double scale, double margin_arc,
                        double margin_cos, double uss_margin, double uss_weight, bool uss_lse,
                        bool grad, UnitsfaceEpilogue epilogue) {
  check_unitsface_args(grad ? "unitsface_fwd_g" : "unitsface_fwd", x_in, centres_in, bank,
                       labels, index, bank_valid, bias);
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const at::ScalarType gdt = chunking::gemm_type(x_in);
  const bool cuda = x_in.is_cuda();
  TORCH_CHECK(!(grad && cuda), "unitsface_fwd_g: the fused forward runs on the CPU only");
  const bool has_uss = bank.has_value();
  const int64_t B = x_in.size(0), D = x_in.size(1);
  const at::Tensor xg = x_in.to(gdt).contiguous();
  const at::Tensor centres = centres_in.contiguous();
  const at::Tensor bank_c = has_uss ? bank->contiguous() : at::Tensor();
  const auto opts = xg.options().dtype(acc);
  const at::Tensor nx = chunking::row_norms(xg, acc);
  Classes k = classes_of(labels, centres, index, bank, bank_valid, bias, B, acc, cuda);
  const int64_t S = k.S;
  const int64_t c = chunking::chunk_cols(B, S, cuda);
  if (has_uss && !k.vector_bias) k.bias_fill = k.bias.expand({c}).contiguous();

  // Per-split state (chunking::num_splits): running statistics, and in the fused mode the
  // rescale factors and the ∂x accumulators (B × D); merged after the sweep.
  const int64_t n_chunks = (S + c - 1) / c;
  const int64_t splits = chunking::num_splits(cuda, n_chunks);
  const int64_t n_state = grad ? kGradState : 7;
  at::Tensor state = at::zeros({splits, n_state, B}, opts);
  state.select(1, 0).fill_(epi::kNegBig);
  if (has_uss && uss_lse) {
    state.select(1, grad ? kU0 : 3).fill_(epi::kNegBig);
    state.select(1, grad ? kMn : 5).fill_(epi::kNegBig);
  }
  at::Tensor alpha, acc_w, acc_b;
  if (grad) {
    alpha = at::ones({splits, 2, B}, opts);
    acc_w = at::zeros({splits, B, D}, opts);
    if (has_uss) acc_b = at::zeros({splits, B, D}, opts);
  }
  at::Tensor nw = at::empty({S}, opts);
  at::Tensor nb = at::empty({has_uss ? S : 0}, opts);
  const at::Tensor flat_w = at::empty({splits, B * c}, opts);
  const at::Tensor flat_b = has_uss ? at::empty({splits, B * c}, opts) : at::Tensor();

  UnitsfaceChunk proto;
  proto.inv_x = chunking::inv_norms(nx);
  proto.target = k.target;
  proto.do_w = true;
  proto.do_b = has_uss;
  set_params(proto, scale, margin_arc, margin_cos, uss_margin, uss_weight, uss_lse);
  chunking::for_splits(splits, n_chunks, [&](int64_t sp, int64_t q0, int64_t q1) {
    UnitsfaceChunk ck = proto;
    ck.state = state[sp];
    if (grad) ck.alpha = alpha[sp];
    at::Tensor aw = grad ? acc_w[sp] : at::Tensor();
    at::Tensor ab = (grad && has_uss) ? acc_b[sp] : at::Tensor();
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * c, n = std::min(c, S - j0);
      ck.col0 = j0;
      const at::Tensor wc = chunk_rows(centres, k.index, j0, n, gdt);
      const at::Tensor nwc = chunking::row_norms(wc, acc);
      nw.narrow(0, j0, n).copy_(nwc);
      ck.inv_w = chunking::inv_norms(nwc);
      ck.dots_w = scratch(flat_w[sp], B, n);
      chunking::gemm_nt(ck.dots_w, xg, wc);
      at::Tensor bc;
      if (has_uss) {
        bc = chunk_rows(bank_c, k.index, j0, n, gdt);
        const at::Tensor nbc = chunking::row_norms(bc, acc);
        nb.narrow(0, j0, n).copy_(nbc);
        ck.inv_b = chunking::inv_norms(nbc);
        ck.dots_b = scratch(flat_b[sp], B, n);
        chunking::gemm_nt(ck.dots_b, xg, bc);
        set_bank_columns(ck, k, j0, n);
      }
      epilogue(ck);
      if (grad) {
        // the dots now hold the weights: e^{z − m}·κ·inv_w and g'·inv_b (pairs) or
        // e^{z⁻ − m⁻}·inv_b (lse); rescale the accumulators to the new running maxima first
        aw.mul_(ck.alpha[0].unsqueeze(1));
        aw.addmm_(ck.dots_w, wc);
        if (has_uss) {
          if (uss_lse) ab.mul_(ck.alpha[1].unsqueeze(1));
          ab.addmm_(ck.dots_b, bc);
        }
      }
    }
  });
  if (splits > 1) {
    // merge the splits: rescale every running sum (and accumulator) to the common maxima
    at::Tensor merged = state.sum(0);
    const auto soft = chunking::merge_max(state.select(1, 0));
    merged[0].copy_(soft.first);
    merged[1].copy_((state.select(1, 1) * soft.second).sum(0));
    if (grad) {
      merged[kHw].copy_((state.select(1, kHw) * soft.second).sum(0));
      acc_w = (acc_w * soft.second.unsqueeze(2)).sum(0, /*keepdim=*/true);
    }
    if (has_uss && uss_lse) {
      const int64_t i_mp = grad ? kU0 : 3, i_mn = grad ? kMn : 5;
      const auto pos = chunking::merge_max(state.select(1, i_mp));
      merged[i_mp].copy_(pos.first);
      merged[i_mp + 1].copy_((state.select(1, i_mp + 1) * pos.second).sum(0));
      const auto negs = chunking::merge_max(state.select(1, i_mn));
      merged[i_mn].copy_(negs.first);
      merged[i_mn + 1].copy_((state.select(1, i_mn + 1) * negs.second).sum(0));
      if (grad) {
        merged[kHb].copy_((state.select(1, kHb) * negs.second).sum(0));
        acc_b = (acc_b * negs.second.unsqueeze(2)).sum(0, /*keepdim=*/true);
      }
    } else if (grad && has_uss) {
      acc_b = acc_b.sum(0, /*keepdim=*/true);
    }
    state = merged.unsqueeze(0);
  }
  state = state[0];
  if (grad) {
    acc_w = acc_w[0];
    if (has_uss) acc_b = acc_b[0];
  }

  ForwardOut out;
  out.nx = nx;
  out.nw = nw;
  out.nb = nb;
  at::Tensor stats = at::zeros({7, B}, opts);
  const int64_t i_m = 0, i_s = 1, i_zt = 2;
  const int64_t i_u0 = grad ? kU0 : 3, i_u1 = grad ? kU1 : 4;
  const int64_t i_mn = grad ? kMn : 5, i_sn = grad ? kSn : 6;
  stats[0].copy_(chunking::lse_from(state[i_m], state[i_s]));
  stats[5].copy_(state[i_zt]);
  at::Tensor rows = stats[0] - state[i_zt];
  if (has_uss) {
    if (uss_lse) {
      stats[6].copy_(chunking::uss_lse_rows(chunking::lse_from(state[i_u0], state[i_u1]),
                                            chunking::lse_from(state[i_mn], state[i_sn]), stats,
                                            1, scale, false));
    } else {
      stats[6].copy_(state[i_u0]);
    }
    rows = rows + uss_weight * stats[6];
  }
  out.rows = rows;
  out.stats = stats;
  if (!grad) return out;

  // ∂L_i/∂x_i from the accumulators (DESIGN.md §2: G_i = Σ_c g_ic r̂_c, h_i = Σ_c g_ic cos_ic)
  const at::Tensor has_t = k.target >= 0;
  const at::Tensor tcol = k.target.clamp_min(0);
  const at::Tensor y = labels.to(at::kLong).clamp(0, centres.size(0) - 1);
  const at::Tensor p_norm = scale / state[kS];  // s / Σ e^{z − m}
  at::Tensor G = acc_w * p_norm.unsqueeze(1);
  at::Tensor h = state[kHw] * p_norm;
  // the target's "− 1": g_iy = s·(p_iy − 1)·f'(cos_iy), its −s·f' part
  const at::Tensor coef_t = at::where(has_t, -scale * state[kKappaT], at::zeros_like(h));
  const at::Tensor w_t = centres.index_select(0, y).to(acc);
  G = G + (coef_t * chunking::inv_norms(nw).index_select(0, tcol)).unsqueeze(1) * w_t;
  h = h + coef_t * state[kRawT];
  at::Tensor gsum = at::zeros_like(h);  // Σ_c g'_ic of USS (λ included)
  if (has_uss) {
    if (!uss_lse) {
      G = G + acc_b;
      h = h + state[kHb];
      gsum = state[kGsb];
    } else {
      // negatives: g' = λ·s·e^{z⁻ − B}·σB = (λ·s·σB / s⁻)·e^{z⁻ − m⁻}
      const at::Tensor sn = state[kSn];
      const at::Tensor c_n = at::where(sn > 0, uss_weight * scale * stats[4] / sn,
                                       at::zeros_like(sn));
      G = G + c_n.unsqueeze(1) * acc_b;
      h = h + c_n * state[kHb];
      // the positive (at most one bank row per class): g' = −λ·s·σA (A = its z⁺)
      const at::Tensor g_p = -uss_weight * scale * stats[2];
      const at::Tensor b_t = bank_c.index_select(0, y).to(acc);
      G = G + (g_p * chunking::inv_norms(nb).index_select(0, tcol)).unsqueeze(1) * b_t;
      h = h + g_p * state[kCosTb];
      gsum = uss_weight * scale * stats[4] + g_p;
    }
  }
  out.dx_rows = chunking::normalised_grad(G, h, xg.to(acc), nx);
  out.db_rows = gsum * (-1.0 / scale);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unitsface_forward(
    const at::Tensor& x, const at::Tensor& centres, const std::optional<at::Tensor>& bank,
    const at::Tensor& labels, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& bank_valid, const std::optional<at::Tensor>& bias,
    double scale, double margin_arc, double margin_cos, double uss_margin, double uss_weight,
    bool uss_lse, UnitsfaceEpilogue epilogue) {
  ForwardOut o = forward_impl(x, centres, bank, labels, index, bank_valid, bias, scale,
                              margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                              /*grad=*/false, epilogue);
  return {o.rows, o.stats, o.nx, o.nw, o.nb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
unitsface_forward_grad(const at::Tensor& x, const at::Tensor& centres,
                       const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                       const std::optional<at::Tensor>& index,
                       const std::optional<at::Tensor>& bank_valid,
                       const std::optional<at::Tensor>& bias, double scale, double margin_arc,
                       double margin_cos, double uss_margin, double uss_weight, bool uss_lse,
                       UnitsfaceEpilogue epilogue) {
  ForwardOut o = forward_impl(x, centres, bank, labels, index, bank_valid, bias, scale,
                              margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                              /*grad=*/true, epilogue);
  return {o.rows, o.stats, o.nx, o.nw, o.nb, o.dx_rows, o.db_rows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_backward(
    const at::Tensor& grad_rows, const at::Tensor& x_in, const at::Tensor& centres_in,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx_in, const at::Tensor& nw_in,
    const at::Tensor& nb_in, const at::Tensor& stats, double scale, double margin_arc,
    double margin_cos, double uss_margin, double uss_weight, bool uss_lse, bool need_dx,
    bool need_dw, bool need_dbias, UnitsfaceEpilogue epilogue) {
  check_unitsface_args("unitsface_bwd", x_in, centres_in, bank, labels, index, bank_valid, bias);
  const bool has_uss = bank.has_value();
  need_dbias = need_dbias && bias.has_value();
  at::Tensor dx = x_in.new_empty({0}), dw = centres_in.new_empty({0}),
             dbias = x_in.new_empty({0});
  if (need_dbias && !has_uss) dbias = at::zeros_like(*bias);  // b only enters through USS
  const bool uss_dbias = need_dbias && has_uss;
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const at::ScalarType gdt = chunking::gemm_type(x_in);
  const bool cuda = x_in.is_cuda();
  const int64_t B = x_in.size(0), D = x_in.size(1);
  Classes k = classes_of(labels, centres_in, index, bank, bank_valid, bias, B, acc, cuda);
  const bool vector_bias = has_uss && k.vector_bias;
  const bool do_w = need_dx || need_dw;
  const bool do_b = has_uss && (need_dx || uss_dbias);
  if (!do_w && !do_b) return {dx, dw, dbias};

  const int64_t S = k.S;
  TORCH_CHECK_VALUE(grad_rows.numel() == B && nx_in.numel() == B && nw_in.numel() == S &&
                        (!has_uss || nb_in.numel() == S) && stats.dim() == 2 &&
                        stats.size(0) == 7 && stats.size(1) == B,
                    "unitsface_bwd: grad_rows, nx, nw, nb and stats must come from "
                    "unitsface_fwd on these inputs");
  const at::Tensor xg = x_in.to(gdt).contiguous();
  const at::Tensor centres = centres_in.contiguous();
  const at::Tensor bank_c = has_uss ? bank->contiguous() : at::Tensor();
  const auto opts = xg.options().dtype(acc);
  const at::Tensor nx = nx_in.to(acc).contiguous();
  const at::Tensor nw = nw_in.to(acc).contiguous();
  const at::Tensor nb = has_uss ? nb_in.to(acc).contiguous() : at::Tensor();
  const at::Tensor inv_w = chunking::inv_norms(nw);
  const at::Tensor inv_b = has_uss ? chunking::inv_norms(nb) : at::Tensor();
  const int64_t c = chunking::chunk_cols(B, S, cuda);
  if (has_uss && !k.vector_bias) k.bias_fill = k.bias.expand({c}).contiguous();

  const int64_t n_chunks = (S + c - 1) / c;
  const int64_t splits = chunking::num_splits(cuda, n_chunks);
  at::Tensor hs = at::zeros({splits, 2, B}, opts);
  at::Tensor G = need_dx ? at::zeros({splits, B, D}, opts) : at::Tensor();
  const at::Tensor inv_x = chunking::inv_norms(nx);
  const at::Tensor xh = need_dw ? (xg.to(acc) * inv_x.unsqueeze(1)).to(gdt) : at::Tensor();
  if (need_dw) dw = k.index.defined() ? at::zeros_like(centres) : at::empty_like(centres);
  at::Tensor dbias_vec =
      (uss_dbias && vector_bias) ? at::zeros({k.bias.numel()}, opts) : at::Tensor();
  const at::Tensor flat_w = do_w ? at::empty({splits, B * c}, opts) : at::Tensor();
  const at::Tensor flat_b = do_b ? at::empty({splits, B * c}, opts) : at::Tensor();
  const at::Tensor gflat_w =
      (do_w && gdt != acc) ? at::empty({splits, B * c}, xg.options()) : flat_w;
  const at::Tensor gflat_b =
      (do_b && gdt != acc) ? at::empty({splits, B * c}, xg.options()) : flat_b;
  const at::Tensor qflat = need_dw ? at::empty({splits, c * D}, opts) : at::Tensor();

  UnitsfaceChunk proto;
  proto.inv_x = inv_x;
  proto.target = k.target;
  proto.do_w = do_w;
  proto.do_b = do_b;
  set_params(proto, scale, margin_arc, margin_cos, uss_margin, uss_weight, uss_lse);
  proto.go = grad_rows.reshape({-1}).to(acc).contiguous();
  proto.stats = stats.to(acc).contiguous();
  chunking::for_splits(splits, n_chunks, [&](int64_t sp, int64_t q0, int64_t q1) {
    UnitsfaceChunk ck = proto;
    ck.hs = hs[sp];
    at::Tensor g_acc = need_dx ? G[sp] : at::Tensor();
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * c, n = std::min(c, S - j0);
      ck.col0 = j0;
      at::Tensor wc, bc;
      if (do_w) {
        wc = chunk_rows(centres, k.index, j0, n, gdt);
        ck.inv_w = inv_w.narrow(0, j0, n);
        ck.dots_w = scratch(flat_w[sp], B, n);
        chunking::gemm_nt(ck.dots_w, xg, wc);
        ck.grads_w = scratch(gflat_w[sp], B, n);
      }
      if (do_b) {
        bc = chunk_rows(bank_c, k.index, j0, n, gdt);
        ck.inv_b = inv_b.narrow(0, j0, n);
        ck.dots_b = scratch(flat_b[sp], B, n);
        chunking::gemm_nt(ck.dots_b, xg, bc);
        ck.grads_b = scratch(gflat_b[sp], B, n);
        set_bank_columns(ck, k, j0, n);
      }
      epilogue(ck);
      if (need_dx) {
        chunking::gemm_acc(g_acc, ck.grads_w, wc);
        if (do_b) chunking::gemm_acc(g_acc, ck.grads_b, bc);
      }
      if (need_dw) {
        const at::Tensor idc = k.index.defined() ? k.index.narrow(0, j0, n) : at::Tensor();
        if (!cuda) {
          // Q straight into the rows of ∂W when possible, then the projection in place
          const bool direct = !idc.defined() && centres.scalar_type() == acc;
          at::Tensor q = direct ? dw.narrow(0, j0, n) : scratch(qflat[sp], n, D);
          chunking::gemm_tn(q, ck.grads_w, xh);
          column_fix_cpu(q, wc, nw.narrow(0, j0, n), dw, idc, j0);
        } else {
          at::Tensor q = scratch(qflat[sp], n, D);
          chunking::gemm_tn(q, ck.grads_w, xh);
          const at::Tensor dwc = chunking::column_grad(q, wc.to(acc), nw.narrow(0, j0, n))
                                     .to(centres.scalar_type());
          if (idc.defined()) {
            dw.index_copy_(0, idc, dwc);
          } else {
            dw.narrow(0, j0, n).copy_(dwc);
          }
        }
      }
      if (uss_dbias && vector_bias) {
        // ∂b_c = −(1/s)·Σ_i g'_ic, with Σ_i g'_ic = Σ_i grads_b[i, c] / inv_b_c
        const at::Tensor colsum = ck.grads_b.sum(0, /*keepdim=*/false, acc);
        const at::Tensor db =
            colsum * nb.narrow(0, j0, n).clamp_min(kNormEps) * (-1.0 / scale);
        if (k.index.defined()) {
          dbias_vec.index_copy_(0, k.index.narrow(0, j0, n), db);
        } else {
          dbias_vec.narrow(0, j0, n).copy_(db);
        }
      }
    }
  });
  hs = hs.sum(0);
  if (need_dx) G = G.sum(0);
  if (need_dx) dx = chunking::normalised_grad(G, hs[0], xg.to(acc), nx).to(x_in.scalar_type());
  if (uss_dbias) {
    const at::Tensor db = vector_bias ? dbias_vec : hs[1].sum() * (-1.0 / scale);
    dbias = db.reshape(bias->sizes()).to(bias->scalar_type());
  }
  return {dx, dw, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_backward_grad(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, const at::Tensor& dx_rows,
    const at::Tensor& db_rows, double scale, double margin_arc, double margin_cos,
    double uss_margin, double uss_weight, bool uss_lse, bool need_dx, bool need_dw,
    bool need_dbias, UnitsfaceEpilogue epilogue) {
  const int64_t B = x.size(0);
  TORCH_CHECK_VALUE(dx_rows.dim() == 2 && dx_rows.size(0) == B && dx_rows.size(1) == x.size(1) &&
                        db_rows.numel() == B,
                    "unitsface_bwd_g: dx_rows and db_rows must come from unitsface_fwd_g");
  need_dbias = need_dbias && bias.has_value();
  const bool vector_bias = bank.has_value() && need_dbias && bias->numel() > 1;
  // ∂W (and a per-class threshold's ∂b) need the final softmax: one recomputing sweep
  at::Tensor dx, dw, dbias;
  std::tie(dx, dw, dbias) = unitsface_backward(
      grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats, scale,
      margin_arc, margin_cos, uss_margin, uss_weight, uss_lse, /*need_dx=*/false, need_dw,
      vector_bias, epilogue);
  const at::Tensor go = grad_rows.reshape({-1}).to(dx_rows.scalar_type());
  if (need_dx) dx = (dx_rows * go.unsqueeze(1)).to(x.scalar_type());
  if (need_dbias && !vector_bias) {
    dbias = bank.has_value() ? (db_rows * go).sum().reshape(bias->sizes()).to(bias->scalar_type())
                             : at::zeros_like(*bias);
  }
  return {dx, dw, dbias};
}

// ============================================================================ CPU epilogue

namespace {

template <typename T>
struct UfRows {
  T* dw;
  T* db;
  T* gw;
  T* gb;
  const T* inv_x;
  const T* inv_w;
  const T* inv_b;
  const int64_t* target;
  const T* valid;  // the mask as 0 / 1 in T (byte or bool masks keep GCC from vectorising)
  const T* bias;
  int64_t c, col0, B;
  bool do_w, do_b;
  epi::SoftmaxParams<T> sp;
  epi::UssParams<T> up;
  T lambda;
  T* state;        // forward
  T* alpha;        // fused forward
  const T* go;     // backward
  const T* stats;  // backward
  T* hs;           // backward
};

template <typename T>
UfRows<T> uf_rows_args(const UnitsfaceChunk& ck) {
  UfRows<T> a;
  a.dw = cpu::ptr_or_null<T>(ck.dots_w);
  a.db = cpu::ptr_or_null<T>(ck.dots_b);
  a.gw = cpu::ptr_or_null<T>(ck.grads_w);
  a.gb = cpu::ptr_or_null<T>(ck.grads_b);
  a.inv_x = ck.inv_x.const_data_ptr<T>();
  a.inv_w = ck.do_w ? ck.inv_w.const_data_ptr<T>() : nullptr;
  a.inv_b = ck.do_b ? ck.inv_b.const_data_ptr<T>() : nullptr;
  a.target = ck.target.const_data_ptr<int64_t>();
  a.valid = nullptr;  // set by the epilogue (a T copy of ck.valid)
  a.bias = ck.do_b ? ck.bias.const_data_ptr<T>() : nullptr;
  a.c = ck.do_w ? ck.dots_w.size(1) : ck.dots_b.size(1);
  a.col0 = ck.col0;
  a.B = ck.inv_x.size(0);
  a.do_w = ck.do_w;
  a.do_b = ck.do_b;
  a.sp = epi::SoftmaxParams<T>{static_cast<T>(ck.scale),  static_cast<T>(ck.margin_cos),
                               static_cast<T>(ck.cos_m2), static_cast<T>(ck.sin_m2),
                               static_cast<T>(ck.m2_sin_m2), ck.arc};
  a.up = epi::UssParams<T>{static_cast<T>(ck.scale), static_cast<T>(ck.uss_margin), ck.uss_lse,
                           false};
  a.lambda = static_cast<T>(ck.uss_weight);
  a.state = cpu::ptr_or_null<T>(ck.state);
  a.alpha = cpu::ptr_or_null<T>(ck.alpha);
  a.go = cpu::const_ptr_or_null<T>(ck.go);
  a.stats = cpu::const_ptr_or_null<T>(ck.stats);
  a.hs = cpu::ptr_or_null<T>(ck.hs);
  return a;
}

}  // namespace
}  // namespace unitsface

// The row kernels, once per instruction set (see cpu_loops.h).
#define UF_ROWS_HEADER "unitsface_rows.h"
#define UF_ROWS_NS(isa) uf_##isa
#include "isa_variants.h"

namespace unitsface {
namespace {

enum class Pass { kForward, kFusedForward, kBackward };

template <typename T>
void run_rows(const UfRows<T>& a, cpu::IsaLevel isa, Pass pass, int64_t r0, int64_t r1) {
#define UF_RUN(ns)                                       \
  switch (pass) {                                        \
    case Pass::kForward:                                 \
      return ns::fwd<T>(a, r0, r1);                      \
    case Pass::kFusedForward:                            \
      return ns::fwdg<T>(a, r0, r1);                     \
    case Pass::kBackward:                                \
      return ns::bwd<T>(a, r0, r1);                      \
  }
  switch (isa) {
#if UF_CPU_DISPATCH
    case cpu::kAvx512:
      UF_RUN(uf_avx512)
      return;
    case cpu::kAvx2:
      UF_RUN(uf_avx2)
      return;
#endif
    default:
      UF_RUN(uf_base)
  }
#undef UF_RUN
}

void unitsface_epilogue_cpu(const UnitsfaceChunk& ck) {
  const int64_t B = ck.inv_x.size(0);
  const Pass pass = ck.go.defined()      ? Pass::kBackward
                    : ck.alpha.defined() ? Pass::kFusedForward
                                         : Pass::kForward;
  const cpu::IsaLevel isa = cpu::isa_level();
  const at::Tensor& any = ck.do_w ? ck.dots_w : ck.dots_b;
  const int64_t c = any.size(1) * ((ck.do_w && ck.do_b) ? 2 : 1);
  const at::Tensor mask = ck.do_b ? ck.valid.to(any.scalar_type()) : at::Tensor();
  if (any.scalar_type() == at::kDouble) {
    UfRows<double> a = uf_rows_args<double>(ck);
    a.valid = ck.do_b ? mask.const_data_ptr<double>() : nullptr;
    cpu::for_rows(B, c, [&](int64_t r0, int64_t r1) { run_rows<double>(a, isa, pass, r0, r1); });
  } else {
    UfRows<float> a = uf_rows_args<float>(ck);
    a.valid = ck.do_b ? mask.const_data_ptr<float>() : nullptr;
    cpu::for_rows(B, c, [&](int64_t r0, int64_t r1) { run_rows<float>(a, isa, pass, r0, r1); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unitsface_fwd_cpu(
    const at::Tensor& x, const at::Tensor& centres, const std::optional<at::Tensor>& bank,
    const at::Tensor& labels, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& bank_valid, const std::optional<at::Tensor>& bias,
    double scale, double margin_arc, double margin_cos, double uss_margin, double uss_weight,
    bool uss_lse) {
  return unitsface_forward(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                           margin_cos, uss_margin, uss_weight, uss_lse, &unitsface_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, double scale, double margin_arc,
    double margin_cos, double uss_margin, double uss_weight, bool uss_lse, bool need_dx,
    bool need_dw, bool need_dbias) {
  return unitsface_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw,
                            nb, stats, scale, margin_arc, margin_cos, uss_margin, uss_weight,
                            uss_lse, need_dx, need_dw, need_dbias, &unitsface_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
unitsface_fwd_g_cpu(const at::Tensor& x, const at::Tensor& centres,
                    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                    const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& bank_valid,
                    const std::optional<at::Tensor>& bias, double scale, double margin_arc,
                    double margin_cos, double uss_margin, double uss_weight, bool uss_lse) {
  return unitsface_forward_grad(x, centres, bank, labels, index, bank_valid, bias, scale,
                                margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                                &unitsface_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_bwd_g_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, const at::Tensor& dx_rows,
    const at::Tensor& db_rows, double scale, double margin_arc, double margin_cos,
    double uss_margin, double uss_weight, bool uss_lse, bool need_dx, bool need_dw,
    bool need_dbias) {
  return unitsface_backward_grad(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx,
                                 nw, nb, stats, dx_rows, db_rows, scale, margin_arc, margin_cos,
                                 uss_margin, uss_weight, uss_lse, need_dx, need_dw, need_dbias,
                                 &unitsface_epilogue_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CPU, m) {
  m.impl("unitsface_fwd", &unitsface_fwd_cpu);
  m.impl("unitsface_bwd", &unitsface_bwd_cpu);
  m.impl("unitsface_fwd_g", &unitsface_fwd_g_cpu);
  m.impl("unitsface_bwd_g", &unitsface_bwd_g_cpu);
}

}  // namespace unitsface
