// unitsface::uss_fwd / uss_bwd — the chunked drivers (device-agnostic ATen code) and the CPU
// epilogue. See csrc/uss.h for the contract and csrc/epilogue.h for the maths.
//
// Forward, per chunk of c reference rows: nr of the chunk, one GEMM dots = x · R_cᵀ (raw, the
// inverse norms are applied in the epilogue: no normalised copy of the reference set), one
// epilogue pass that updates per-row running statistics (Σ softplus, or running max/sum-exp
// of P and N). Backward, per chunk: the same GEMM, one epilogue pass that writes
// g_ij·inv_r_j over the dots and accumulates h_i = Σ g_ij cos_ij and Σ_j g_ij, then
//   G   += g' · R_c         (∂x)
//   Q_c  = g'ᵀ · x̂          (∂ref for in-batch / class centres; Q_j·r_j gives h_j)
//   Σ_i g_ij                (a per-reference-row bias)
// Working memory: B×c + c×D per buffer, never B×N. On the CPU the chunks are shared out
// among the intra-op threads ("splits", each with its own buffers and per-row state, merged
// at the end; chunking.h), so every GEMM and epilogue runs single-threaded on its own chunk.
#include "uss.h"

#include <limits>

#include <ATen/Dispatch.h>
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

void check_uss_args(const char* op, const at::Tensor& x, const at::Tensor& ref,
                    const at::Tensor& labels, const at::Tensor& ref_labels,
                    const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(ref.dim() == 2, op, ": ref must be 2-D (N, D), got shape ", ref.sizes());
  TORCH_CHECK_VALUE(ref.size(1) == x.size(1), op, ": ref has embedding size ", ref.size(1),
                    " but x has ", x.size(1));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(ref.scalar_type() == x.scalar_type(), op, ": ref has dtype ",
                   ref.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), op,
                    ": labels must have shape (", x.size(0), ",), got ", labels.sizes());
  TORCH_CHECK_VALUE(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0), op,
                    ": ref_labels must have shape (", ref.size(0), ",), got ",
                    ref_labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) &&
                       !at::isFloatingType(ref_labels.scalar_type()),
                   op, ": labels and ref_labels must be integer tensors");
  TORCH_CHECK_TYPE(at::isFloatingType(bias.scalar_type()), op,
                   ": bias must be a floating tensor, got ", bias.scalar_type());
  TORCH_CHECK_VALUE(bias.numel() == 1 || bias.numel() == ref.size(0), op,
                    ": bias must hold 1 value or one per reference row (", ref.size(0),
                    "), got shape ", bias.sizes());
  const auto dev = x.device();
  TORCH_CHECK_VALUE(ref.device() == dev && labels.device() == dev &&
                        ref_labels.device() == dev && bias.device() == dev,
                    op, ": every tensor must be on ", dev);
  if (ref_valid.has_value()) {
    TORCH_CHECK_TYPE(ref_valid->scalar_type() == at::kBool, op,
                     ": ref_valid must be a bool tensor, got ", ref_valid->scalar_type());
    TORCH_CHECK_VALUE(ref_valid->dim() == 1 && ref_valid->size(0) == ref.size(0), op,
                      ": ref_valid must have shape (", ref.size(0), ",), got ",
                      ref_valid->sizes());
    TORCH_CHECK_VALUE(ref_valid->device() == dev, op, ": ref_valid must be on ", dev);
  }
}

// The per-column inputs shared by forward and backward.
struct UssColumns {
  at::Tensor labels, ref_labels, valid, bias, bias_fill;
  bool vector_bias = false;
};

UssColumns uss_columns(const at::Tensor& labels, const at::Tensor& ref_labels,
                       const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias,
                       int64_t n, int64_t c, at::ScalarType acc) {
  UssColumns cols;
  cols.labels = labels.to(at::kLong).contiguous();
  cols.ref_labels = ref_labels.to(at::kLong).contiguous();
  cols.valid = ref_valid.has_value() ? ref_valid->contiguous()
                                     : at::ones({n}, labels.options().dtype(at::kBool));
  cols.bias = bias.detach().reshape({-1}).to(acc).contiguous();
  cols.vector_bias = cols.bias.numel() > 1;
  if (!cols.vector_bias) cols.bias_fill = cols.bias.expand({c}).contiguous();
  return cols;
}

// The fields every chunk of one call shares (the chunks copy it and add their columns).
UssChunk uss_proto(const at::Tensor& inv_x, const UssColumns& cols, bool in_batch, double scale,
                   double margin, bool lse, bool clamp) {
  UssChunk proto;
  proto.inv_x = inv_x;
  proto.labels = cols.labels;
  proto.in_batch = in_batch;
  proto.scale = scale;
  proto.margin = margin;
  proto.lse = lse;
  proto.clamp = clamp;
  return proto;
}

void set_columns(UssChunk& ck, const UssColumns& cols, int64_t j0, int64_t n) {
  ck.col0 = j0;
  ck.col_labels = cols.ref_labels.narrow(0, j0, n);
  ck.valid = cols.valid.narrow(0, j0, n);
  ck.bias = cols.vector_bias ? cols.bias.narrow(0, j0, n) : cols.bias_fill.narrow(0, 0, n);
}

}  // namespace

// ============================================================================ drivers

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> uss_forward(
    const at::Tensor& x_in, const at::Tensor& ref_in, const at::Tensor& labels,
    const at::Tensor& ref_labels, const std::optional<at::Tensor>& ref_valid,
    const at::Tensor& bias, double scale, double margin, bool lse, bool clamp, bool in_batch,
    UssEpilogue epilogue) {
  check_uss_args("uss_fwd", x_in, ref_in, labels, ref_labels, ref_valid, bias);
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const at::ScalarType gdt = chunking::gemm_type(x_in);
  const bool cuda = x_in.is_cuda();
  const int64_t B = x_in.size(0), N = ref_in.size(0);
  const at::Tensor xg = x_in.to(gdt).contiguous();
  const at::Tensor ref = ref_in.contiguous();
  const at::Tensor nx = chunking::row_norms(xg, acc);
  const int64_t c = chunking::chunk_cols(B, N, cuda);
  const UssColumns cols = uss_columns(labels, ref_labels, ref_valid, bias, N, c, acc);
  const auto opts = xg.options().dtype(acc);

  const int64_t n_chunks = (N + c - 1) / c;
  const int64_t splits = chunking::num_splits(cuda, n_chunks);
  at::Tensor state = at::zeros({splits, 4, B}, opts);
  if (lse) {
    state.select(1, 0).fill_(epi::kNegBig);
    state.select(1, 2).fill_(epi::kNegBig);
  }
  at::Tensor nr = at::empty({N}, opts);
  const at::Tensor flat = at::empty({splits, B * c}, opts);

  const UssChunk proto =
      uss_proto(chunking::inv_norms(nx), cols, in_batch, scale, margin, lse, clamp);
  chunking::for_splits(splits, n_chunks, [&](int64_t sp, int64_t q0, int64_t q1) {
    UssChunk ck = proto;
    ck.state = state[sp];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * c, n = std::min(c, N - j0);
      const at::Tensor rc = chunk_rows(ref, at::Tensor(), j0, n, gdt);
      const at::Tensor nrc = chunking::row_norms(rc, acc);
      nr.narrow(0, j0, n).copy_(nrc);
      ck.dots = scratch(flat[sp], B, n);
      chunking::gemm_nt(ck.dots, xg, rc);
      ck.inv_r = chunking::inv_norms(nrc);
      set_columns(ck, cols, j0, n);
      epilogue(ck);
    }
  });
  if (splits > 1) {  // merge: sums add up, (max, sum-exp) pairs are rescaled to a common max
    at::Tensor merged = state.sum(0);
    if (lse) {
      for (int64_t k = 0; k < 4; k += 2) {
        const auto mx = chunking::merge_max(state.select(1, k));
        merged[k].copy_(mx.first);
        merged[k + 1].copy_((state.select(1, k + 1) * mx.second).sum(0));
      }
    }
    state = merged.unsqueeze(0);
  }
  state = state[0];

  if (!lse) return {state[0].clone(), at::zeros({4, B}, opts), nx, nr};
  at::Tensor stats = at::empty({4, B}, opts);
  const at::Tensor stat_a = chunking::lse_from(state[0], state[1]);
  const at::Tensor stat_b = chunking::lse_from(state[2], state[3]);
  at::Tensor rows = chunking::uss_lse_rows(stat_a, stat_b, stats, 0, scale, clamp);
  return {rows, stats, nx, nr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> uss_backward(
    const at::Tensor& grad_rows, const at::Tensor& x_in, const at::Tensor& ref_in,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias, const at::Tensor& nx_in,
    const at::Tensor& nr_in, const at::Tensor& stats, double scale, double margin, bool lse,
    bool clamp, bool in_batch, bool need_dx, bool need_dref, bool need_dbias,
    UssEpilogue epilogue) {
  check_uss_args("uss_bwd", x_in, ref_in, labels, ref_labels, ref_valid, bias);
  const bool vector_bias = bias.numel() > 1;
  const bool need_rows = need_dx || (need_dbias && !vector_bias);
  const bool need_cols = need_dref || (need_dbias && vector_bias);
  at::Tensor dx = x_in.new_empty({0}), dref = ref_in.new_empty({0}), dbias = bias.new_empty({0});
  if (!need_rows && !need_cols) return {dx, dref, dbias};

  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const at::ScalarType gdt = chunking::gemm_type(x_in);
  const bool cuda = x_in.is_cuda();
  const int64_t B = x_in.size(0), N = ref_in.size(0), D = x_in.size(1);
  TORCH_CHECK_VALUE(grad_rows.numel() == B && nx_in.numel() == B && nr_in.numel() == N &&
                        stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == B,
                    "uss_bwd: grad_rows, nx, nr and stats must come from uss_fwd on these inputs");
  const at::Tensor xg = x_in.to(gdt).contiguous();
  const at::Tensor ref = ref_in.contiguous();
  const auto opts = xg.options().dtype(acc);
  const at::Tensor nx = nx_in.to(acc).contiguous();
  const at::Tensor nr = nr_in.to(acc).contiguous();
  const at::Tensor inv_x = chunking::inv_norms(nx);
  const at::Tensor inv_r = chunking::inv_norms(nr);
  const int64_t c = chunking::chunk_cols(B, N, cuda);
  const UssColumns cols = uss_columns(labels, ref_labels, ref_valid, bias, N, c, acc);

  const int64_t n_chunks = (N + c - 1) / c;
  const int64_t splits = chunking::num_splits(cuda, n_chunks);
  at::Tensor hs = at::zeros({splits, 2, B}, opts);
  at::Tensor G = need_dx ? at::zeros({splits, B, D}, opts) : at::Tensor();
  const at::Tensor xh = need_dref ? (xg.to(acc) * inv_x.unsqueeze(1)).to(gdt) : at::Tensor();
  if (need_dref) dref = at::empty({N, D}, ref_in.options());
  at::Tensor dbias_vec = (need_dbias && vector_bias) ? at::empty({N}, opts) : at::Tensor();
  const at::Tensor flat = at::empty({splits, B * c}, opts);
  const at::Tensor gflat = gdt == acc ? flat : at::empty({splits, B * c}, xg.options());
  const at::Tensor qflat = need_dref ? at::empty({splits, c * D}, opts) : at::Tensor();

  UssChunk proto = uss_proto(inv_x, cols, in_batch, scale, margin, lse, clamp);
  proto.go = grad_rows.reshape({-1}).to(acc).contiguous();
  proto.stats = stats.to(acc).contiguous();
  chunking::for_splits(splits, n_chunks, [&](int64_t sp, int64_t q0, int64_t q1) {
    UssChunk ck = proto;
    ck.hs = hs[sp];
    at::Tensor g_acc = need_dx ? G[sp] : at::Tensor();
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * c, n = std::min(c, N - j0);
      const at::Tensor rc = chunk_rows(ref, at::Tensor(), j0, n, gdt);
      ck.dots = scratch(flat[sp], B, n);
      chunking::gemm_nt(ck.dots, xg, rc);
      ck.grads = scratch(gflat[sp], B, n);
      ck.inv_r = inv_r.narrow(0, j0, n);
      set_columns(ck, cols, j0, n);
      epilogue(ck);
      if (need_dx) chunking::gemm_acc(g_acc, ck.grads, rc);
      if (need_dref) {
        at::Tensor q_rows = scratch(qflat[sp], n, D);
        chunking::gemm_tn(q_rows, ck.grads, xh);
        dref.narrow(0, j0, n).copy_(
            chunking::column_grad(q_rows, rc.to(acc), nr.narrow(0, j0, n)));
      }
      if (need_dbias && vector_bias) {
        // Σ_i g_ij = Σ_i g'_ij / inv_r_j
        const at::Tensor colsum = ck.grads.sum(0, /*keepdim=*/false, acc);
        dbias_vec.narrow(0, j0, n).copy_(colsum * nr.narrow(0, j0, n).clamp_min(kNormEps) *
                                         (-1.0 / scale));
      }
    }
  });
  hs = hs.sum(0);
  if (need_dx) G = G.sum(0);
  if (need_dx) dx = chunking::normalised_grad(G, hs[0], xg.to(acc), nx).to(x_in.scalar_type());
  if (need_dbias) {
    const at::Tensor db = vector_bias ? dbias_vec : hs[1].sum() * (-1.0 / scale);
    dbias = db.reshape(bias.sizes()).to(bias.scalar_type());
  }
  return {dx, dref, dbias};
}

// ============================================================================ CPU epilogue

namespace {

template <typename T>
struct UssRows {
  T* dots;
  T* grads;
  const T* inv_x;
  const T* inv_r;
  const int64_t* y;
  const int64_t* l;
  const T* valid;  // the mask as 0 / 1 in T (byte or bool masks keep GCC from vectorising)
  const T* bias;
  int64_t c, col0, B;
  bool in_batch;
  epi::UssParams<T> p;
  T* state;        // forward
  const T* go;     // backward
  const T* stats;  // backward
  T* hs;           // backward
};

template <typename T>
UssRows<T> uss_rows_args(const UssChunk& ck) {
  UssRows<T> a;
  a.dots = ck.dots.data_ptr<T>();
  a.grads = cpu::ptr_or_null<T>(ck.grads);
  a.inv_x = ck.inv_x.const_data_ptr<T>();
  a.inv_r = ck.inv_r.const_data_ptr<T>();
  a.y = ck.labels.const_data_ptr<int64_t>();
  a.l = ck.col_labels.const_data_ptr<int64_t>();
  a.valid = nullptr;  // set by the epilogue (a T copy of ck.valid)
  a.bias = ck.bias.const_data_ptr<T>();
  a.c = ck.dots.size(1);
  a.col0 = ck.col0;
  a.B = ck.dots.size(0);
  a.in_batch = ck.in_batch;
  a.p = epi::UssParams<T>{static_cast<T>(ck.scale), static_cast<T>(ck.margin), ck.lse, ck.clamp};
  a.state = cpu::ptr_or_null<T>(ck.state);
  a.go = cpu::const_ptr_or_null<T>(ck.go);
  a.stats = cpu::const_ptr_or_null<T>(ck.stats);
  a.hs = cpu::ptr_or_null<T>(ck.hs);
  return a;
}

}  // namespace
}  // namespace unitsface

// The row kernels, once per instruction set (see cpu_loops.h).
#define UF_ROWS_HEADER "uss_rows.h"
#define UF_ROWS_NS(isa) uss_##isa
#include "isa_variants.h"

namespace unitsface {
namespace {

template <typename T>
void run_rows(const UssRows<T>& a, cpu::IsaLevel isa, bool backward, int64_t r0,
              int64_t r1) {
  switch (isa) {
#if UF_CPU_DISPATCH
    case cpu::kAvx512:
      return backward ? uss_avx512::bwd<T>(a, r0, r1) : uss_avx512::fwd<T>(a, r0, r1);
    case cpu::kAvx2:
      return backward ? uss_avx2::bwd<T>(a, r0, r1) : uss_avx2::fwd<T>(a, r0, r1);
#endif
    default:
      return backward ? uss_base::bwd<T>(a, r0, r1) : uss_base::fwd<T>(a, r0, r1);
  }
}

void uss_epilogue_cpu(const UssChunk& ck) {
  const int64_t B = ck.dots.size(0), c = ck.dots.size(1);
  const bool backward = ck.grads.defined();
  const cpu::IsaLevel isa = cpu::isa_level();
  const at::Tensor mask = ck.valid.to(ck.dots.scalar_type());
  if (ck.dots.scalar_type() == at::kDouble) {
    UssRows<double> a = uss_rows_args<double>(ck);
    a.valid = mask.const_data_ptr<double>();
    cpu::for_rows(B, c, [&](int64_t r0, int64_t r1) {
      run_rows<double>(a, isa, backward, r0, r1);
    });
  } else {
    UssRows<float> a = uss_rows_args<float>(ck);
    a.valid = mask.const_data_ptr<float>();
    cpu::for_rows(B, c, [&](int64_t r0, int64_t r1) {
      run_rows<float>(a, isa, backward, r0, r1);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> uss_fwd_cpu(
    const at::Tensor& x, const at::Tensor& ref, const at::Tensor& labels,
    const at::Tensor& ref_labels, const std::optional<at::Tensor>& ref_valid,
    const at::Tensor& bias, double scale, double margin, bool lse, bool clamp, bool in_batch) {
  return uss_forward(x, ref, labels, ref_labels, ref_valid, bias, scale, margin, lse, clamp,
                     in_batch, &uss_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> uss_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& ref,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias, const at::Tensor& nx,
    const at::Tensor& nr, const at::Tensor& stats, double scale, double margin, bool lse,
    bool clamp, bool in_batch, bool need_dx, bool need_dref, bool need_dbias) {
  return uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats,
                      scale, margin, lse, clamp, in_batch, need_dx, need_dref, need_dbias,
                      &uss_epilogue_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CPU, m) {
  m.impl("uss_fwd", &uss_fwd_cpu);
  m.impl("uss_bwd", &uss_bwd_cpu);
}

}  // namespace unitsface
