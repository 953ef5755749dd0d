// The USS drivers (csrc/uss.h): device-agnostic ATen code around the epilogue of each device.
//
// Forward, per chunk of c reference rows: the chunk's rows (invalid ones read as zero rows),
// their norms, one GEMM dots = x · R_cᵀ (raw: the inverse norms are applied in the epilogue,
// so no normalised copy of the reference set exists), one epilogue pass that updates the
// per-row running statistics (Σ softplus, or running max / sum-exp of P and N). Backward, per
// chunk: the same GEMM, one epilogue pass that writes g'_ij = g_ij·inv_r_j over the dots and
// accumulates h_i = Σ_j g_ij cos_ij and Σ_j g_ij, then (docs/design.md §2)
//   G   += g' · R_c         (∂x)
//   ∂R_c  from g'ᵀ · x̂      (∂ref for in-batch pairs / class centres)
//   Σ_i g_ij                (a per-reference-row threshold)
// Working memory: B×c + c×D per split, never B×N.
#include "uss.h"

#include "chunking.h"

namespace unitsface {

using chunking::acc_type;
using chunking::scratch;

namespace {

void check_uss_args(const char* op, const UssInputs& in) {
  const at::Tensor &x = in.x, &ref = in.ref;
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(ref.dim() == 2, op, ": ref must be 2-D (N, D), got shape ", ref.sizes());
  TORCH_CHECK_VALUE(ref.size(1) == x.size(1), op, ": ref has embedding size ", ref.size(1),
                    " but x has ", x.size(1));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(chunking::reads_as(ref.scalar_type(), x.scalar_type()), op, ": ref has dtype ",
                   ref.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(in.labels.dim() == 1 && in.labels.size(0) == x.size(0), op,
                    ": labels must have shape (", x.size(0), ",), got ", in.labels.sizes());
  TORCH_CHECK_VALUE(in.ref_labels.dim() == 1 && in.ref_labels.size(0) == ref.size(0), op,
                    ": ref_labels must have shape (", ref.size(0), ",), got ",
                    in.ref_labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(in.labels.scalar_type()) &&
                       !at::isFloatingType(in.ref_labels.scalar_type()),
                   op, ": labels and ref_labels must be integer tensors");
  TORCH_CHECK_TYPE(at::isFloatingType(in.bias.scalar_type()), op,
                   ": bias must be a floating tensor, got ", in.bias.scalar_type());
  TORCH_CHECK_VALUE(in.bias.numel() == 1 || in.bias.numel() == ref.size(0), op,
                    ": bias must hold 1 value or one per reference row (", ref.size(0),
                    "), got shape ", in.bias.sizes());
  const auto dev = x.device();
  TORCH_CHECK_VALUE(ref.device() == dev && in.labels.device() == dev &&
                        in.ref_labels.device() == dev && in.bias.device() == dev,
                    op, ": every tensor must be on ", dev);
  if (in.ref_valid.has_value()) {
    const at::Tensor& v = *in.ref_valid;
    TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, op, ": ref_valid must be a bool tensor, got ",
                     v.scalar_type());
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == ref.size(0) && v.device() == dev, op,
                      ": ref_valid must have shape (", ref.size(0), ",) on ", dev, ", got ",
                      v.sizes());
  }
}

// The per-call pieces shared by the forward and the backward.
struct UssCall {
  at::ScalarType acc, gdt, xdt;  // accumulation, GEMM operands, x (reference rows read in it)
  int64_t B, N, D;
  at::Tensor xg;   // x in the GEMM dtype, contiguous
  at::Tensor ref;  // contiguous
  chunking::Sweep sweep;
  UssColumns cols;
  at::TensorOptions opts;  // the accumulation dtype on x's device

  explicit UssCall(const UssInputs& in)
      : acc(acc_type(in.x.scalar_type())),
        gdt(chunking::gemm_type(in.x)),
        xdt(in.x.scalar_type()),
        B(in.x.size(0)),
        N(in.ref.size(0)),
        D(in.x.size(1)),
        xg(in.x.to(gdt).contiguous()),
        ref(in.ref.contiguous()),
        sweep(B, N, in.x.is_cuda()),
        cols(uss_columns(in.labels, in.ref_labels,
                         in.ref_valid.has_value() ? *in.ref_valid : at::Tensor(), in.bias,
                         sweep.c, acc)),
        opts(xg.options().dtype(acc)) {}

  // the chunk's reference rows, invalid ones read as zero rows
  at::Tensor rows(int64_t j0, int64_t n) const {
    return chunking::chunk_rows(ref, at::Tensor(), j0, n, xdt, gdt, cols.valid_chunk(j0, n));
  }
};

}  // namespace

UssColumns uss_columns(const at::Tensor& labels, const at::Tensor& col_labels,
                       const at::Tensor& valid, const at::Tensor& bias, int64_t c,
                       at::ScalarType acc) {
  UssColumns cols;
  const int64_t n = col_labels.size(0);
  cols.labels = labels.to(at::kLong).contiguous();
  cols.col_labels = col_labels.to(at::kLong).contiguous();
  if (valid.defined()) cols.valid = valid.contiguous();
  cols.valid_t = valid.defined() ? valid.to(acc).contiguous()
                                 : at::ones({n}, col_labels.options().dtype(acc));
  const at::Tensor b = bias.detach().reshape({-1}).to(acc);
  cols.vector_bias = b.numel() > 1;
  cols.bias = cols.vector_bias ? b.contiguous() : b.expand({std::min(c, n)}).contiguous();
  return cols;
}

UssForward uss_forward(const UssInputs& in, const UssOptions& o, UssEpilogue epilogue) {
  check_uss_args("uss_fwd_native", in);
  const UssCall call(in);
  const int64_t B = call.B;
  const at::Tensor nx = chunking::row_norms(call.xg, call.acc);
  at::Tensor state = at::zeros({call.sweep.splits, 4, B}, call.opts);
  chunking::init_uss_state(state, 0, o.lse);
  at::Tensor nr = at::empty({call.N}, call.opts);
  const at::Tensor flat = at::empty({call.sweep.splits, B * call.sweep.c}, call.opts);

  UssChunk proto;
  proto.pass = Pass::kForward;
  proto.options = o;
  proto.inv_x = chunking::inv_norms(nx, o.eps);
  call.sweep.run([&](int64_t sp, int64_t j0, int64_t n) {
    UssChunk ck = proto;
    ck.state = state[sp];
    const at::Tensor rc = call.rows(j0, n);
    const at::Tensor nrc = chunking::row_norms(rc, call.acc);
    nr.narrow(0, j0, n).copy_(nrc);
    ck.inv_r = chunking::inv_norms(nrc, o.eps);
    ck.dots = scratch(flat[sp], B, n);
    chunking::gemm_nt(ck.dots, call.xg, rc);
    call.cols.set(ck, j0, n);
    epilogue(ck);
  });
  state = chunking::merge_splits(state, chunking::uss_max_pairs(0, o.lse)).first;
  at::Tensor stats = at::zeros({stats::kUssRows, B}, call.opts);
  at::Tensor rows = chunking::uss_rows_from_state(state, 0, o, stats, 0);
  return {rows, stats, nx, nr};
}

Grads uss_backward(const at::Tensor& grad_rows, const UssInputs& in, const UssSaved& saved,
                   const UssOptions& o, std::array<bool, 3> needs, UssEpilogue epilogue) {
  check_uss_args("uss_bwd_native", in);
  const bool need_dx = needs[0], need_dref = needs[1], need_dbias = needs[2];
  const bool vector_bias = in.bias.numel() > 1;
  // Gradients not asked for come back empty (the contract's fake kernels do the same).
  at::Tensor dx = in.x.new_empty({0}), dref = in.x.new_empty({0}), dbias = in.x.new_empty({0});
  if (!need_dx && !need_dref && !need_dbias) return {dx, dref, dbias};

  const UssCall call(in);
  const int64_t B = call.B, N = call.N, D = call.D;
  TORCH_CHECK_VALUE(grad_rows.numel() == B && saved.nx.numel() == B && saved.nr.numel() == N &&
                        saved.stats.dim() == 2 && saved.stats.size(0) == stats::kUssRows &&
                        saved.stats.size(1) == B,
                    "uss_bwd_native: grad_rows, stats, nx and nr must come from uss_fwd_native "
                    "on these inputs");
  const at::Tensor nx = saved.nx.to(call.acc).contiguous();
  const at::Tensor nr = saved.nr.to(call.acc).contiguous();
  const at::Tensor inv_x = chunking::inv_norms(nx, o.eps);
  const at::Tensor inv_r = chunking::inv_norms(nr, o.eps);
  const int64_t splits = call.sweep.splits, c = call.sweep.c;

  at::Tensor hs = at::zeros({splits, 2, B}, call.opts);
  at::Tensor G = need_dx ? at::zeros({splits, B, D}, call.opts) : at::Tensor();
  const at::Tensor xh =
      need_dref ? (call.xg.to(call.acc) * inv_x.unsqueeze(1)).to(call.gdt) : at::Tensor();
  if (need_dref) dref = at::empty({N, D}, in.ref.options());
  at::Tensor dbias_cols = (need_dbias && vector_bias) ? at::empty({N}, call.opts) : at::Tensor();
  const at::Tensor flat = at::empty({splits, B * c}, call.opts);
  // 16-bit GEMM operands on CUDA: the g' block in the input dtype (else it overwrites the dots)
  const at::Tensor gflat =
      call.gdt == call.acc ? flat : at::empty({splits, B * c}, call.xg.options());
  const at::Tensor qflat = need_dref ? at::empty({splits, c * D}, call.opts) : at::Tensor();

  UssChunk proto;
  proto.pass = Pass::kBackward;
  proto.options = o;
  proto.inv_x = inv_x;
  proto.go = grad_rows.reshape({-1}).to(call.acc).contiguous();
  proto.stats = saved.stats.to(call.acc).contiguous();
  call.sweep.run([&](int64_t sp, int64_t j0, int64_t n) {
    UssChunk ck = proto;
    ck.hs = hs[sp];
    const at::Tensor rc = call.rows(j0, n);
    ck.dots = scratch(flat[sp], B, n);
    chunking::gemm_nt(ck.dots, call.xg, rc);
    ck.grads = scratch(gflat[sp], B, n);
    ck.inv_r = inv_r.narrow(0, j0, n);
    call.cols.set(ck, j0, n);
    epilogue(ck);
    if (need_dx) {
      at::Tensor g = G[sp];
      chunking::gemm_acc(g, ck.grads, rc);
    }
    if (need_dref) {
      chunking::column_grads(dref, ck.grads, xh, rc, nr.narrow(0, j0, n), j0,
                             scratch(qflat[sp], n, D), o.eps);
    }
    if (need_dbias && vector_bias) {
      chunking::write_columns(dbias_cols, at::Tensor(), j0,
                              chunking::bias_grad_columns(ck.grads, nr.narrow(0, j0, n), o.scale,
                                                          o.eps, call.acc));
    }
  });
  hs = hs.sum(0);
  // an invalid row takes no part: its gradient is exactly zero, also when x holds NaN (Q's
  // gᵀ·x̂ would carry 0·NaN into it)
  if (need_dref && in.ref_valid.has_value()) {
    dref.masked_fill_(in.ref_valid->logical_not().unsqueeze(1), 0);
  }
  if (need_dx) {
    dx = chunking::normalised_grad(G.sum(0), hs[0], call.xg.to(call.acc), nx, o.eps)
             .to(in.x.scalar_type());
  }
  if (need_dbias) {
    const at::Tensor db = vector_bias ? dbias_cols : hs[1].sum() * (-1.0 / o.scale);
    dbias = db.reshape(in.bias.sizes()).to(in.bias.scalar_type());
  }
  return {dx, dref, dbias};
}

}  // namespace unitsface
