// The out-of-line helpers of csrc/chunking.h.
#include "chunking.h"

#include <ATen/Dispatch.h>

#include "epilogue.h"

namespace unitsface {
namespace chunking {

at::Tensor chunk_rows(const at::Tensor& t, const at::Tensor& idx, int64_t j0, int64_t n,
                      at::ScalarType read, at::ScalarType dt, const at::Tensor& valid) {
  at::Tensor rows = idx.defined() ? t.index_select(0, idx.narrow(0, j0, n)) : t.narrow(0, j0, n);
  if (rows.scalar_type() != read) rows = rows.to(read);
  if (rows.scalar_type() != dt) rows = rows.to(dt);
  // On the CPU a chunk whose rows are all valid stays a view (reading the mask is free);
  // on CUDA that test would cost a synchronisation, so the chunk is always masked.
  if (valid.defined() && (rows.is_cuda() || !valid.all().item<bool>())) {
    rows = at::where(valid.unsqueeze(1), rows, at::zeros({}, rows.options()));
  }
  return rows.contiguous();
}

void write_columns(at::Tensor& dst, const at::Tensor& idx, int64_t j0, const at::Tensor& values) {
  const int64_t n = values.size(0);
  if (idx.defined()) {
    dst.index_copy_(0, idx.narrow(0, j0, n), values.to(dst.scalar_type()));
  } else {
    dst.narrow(0, j0, n).copy_(values);
  }
}

namespace {

template <typename T>
void row_norms_cpu(const T* p, T* out, int64_t n, int64_t d) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* r = p + i * d;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) ss += r[k] * r[k];
      out[i] = std::sqrt(ss);
    }
  });
}

// ∂W rows of a chunk on the CPU in one pass over Q (see column_grads): out[j0 + j] =
// Q_j − coef_j·r_j with coef_j = inv_r_j²·(Q_j·r_j). `q` may be those very rows of out (then
// it is updated in place).
// (q, r and out have row strides q_ld, r_ld and out_ld.)
template <typename T, typename O>
void column_fix_rows(const T* q, int64_t q_ld, const T* r, int64_t r_ld, const T* norms, O* out,
                     int64_t out_ld, int64_t j0, int64_t n, int64_t D, T eps) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(D, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* qj = q + j * q_ld;
      const T* rj = r + j * r_ld;
      T h = 0;
#pragma omp simd reduction(+ : h)
      for (int64_t d = 0; d < D; ++d) h += qj[d] * rj[d];
      const T inv = epi::inv_norm<T>(norms[j], eps);
      const T coef = norms[j] >= eps ? h * inv * inv : T(0);
      O* oj = out + (j0 + j) * out_ld;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) oj[d] = static_cast<O>(qj[d] - coef * rj[d]);
    }
  });
}

}  // namespace

at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc) {
  // ATen's generic norm reduction costs several times more on these row-major chunks: on the
  // CPU, a contiguous matrix already in the accumulation dtype takes one plain pass
  if (t.is_cuda() || t.scalar_type() != acc || !t.is_contiguous()) {
    return at::linalg_vector_norm(t, 2, {1}, /*keepdim=*/false, acc);
  }
  at::Tensor out = at::empty({t.size(0)}, t.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "row_norms", [&] {
    row_norms_cpu<scalar_t>(t.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.size(0),
                            t.size(1));
  });
  return out;
}

void column_grads(at::Tensor& out, const at::Tensor& grads, const at::Tensor& xh,
                  const at::Tensor& r, const at::Tensor& norms, int64_t j0, at::Tensor q,
                  double eps, int64_t K) {
  if (K > 1) {  // one pass per sub-centre: its block of the tile, its rows of r and out
    const int64_t n = r.size(0) / K;
    const at::Tensor rows = out.narrow(0, j0, n * K);
    for (int64_t s = 0; s < K; ++s) {
      at::Tensor o = sub_centre_rows(rows, K, s);
      column_grads(o, sub_centre_cols(grads, K, s), xh, sub_centre_rows(r, K, s),
                   norms.view({n, K}).select(1, s).contiguous(), 0, q.narrow(0, 0, n), eps);
    }
    return;
  }
  const int64_t n = r.size(0), D = r.size(1);
  if (out.is_cuda()) {
    gemm_tn(q, grads, xh);
    const at::Tensor inv = inv_norms(norms, eps);
    const at::Tensor rc = r.to(q.scalar_type());
    const at::Tensor h = (q * rc).sum(1);
    const at::Tensor coef = at::where(norms >= eps, h * inv * inv, at::zeros_like(h));
    out.narrow(0, j0, n).copy_(q - coef.unsqueeze(1) * rc);
    return;
  }
  // the CPU: Q straight into the rows of out when they are in its dtype, then the projection
  // in place
  if (out.scalar_type() == q.scalar_type()) q = out.narrow(0, j0, n);
  gemm_tn(q, grads, xh);
  const at::Tensor rc = r.scalar_type() == q.scalar_type() ? r : r.to(q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "column_grads", [&] {
    using T = scalar_t;
    const T* qp = q.const_data_ptr<T>();
    const T* rp = rc.const_data_ptr<T>();
    const T* np = norms.const_data_ptr<T>();
    TORCH_INTERNAL_ASSERT(q.stride(1) == 1 && rc.stride(1) == 1 && out.stride(1) == 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "column_out", [&] {
          column_fix_rows<T, scalar_t>(qp, q.stride(0), rp, rc.stride(0), np,
                                       out.data_ptr<scalar_t>(), out.stride(0), j0, n, D,
                                       static_cast<T>(eps));
        });
  });
}

std::pair<at::Tensor, std::vector<at::Tensor>> merge_splits(const at::Tensor& state,
                                                            const std::vector<MaxPair>& pairs) {
  at::Tensor merged = state.sum(0);
  std::vector<at::Tensor> factors;
  for (const MaxPair& pair : pairs) {
    const at::Tensor m = state.select(1, pair.max_row);
    const at::Tensor top = std::get<0>(m.max(0));
    const at::Tensor f = at::exp(m - top.unsqueeze(0));
    merged[pair.max_row].copy_(top);
    std::vector<int64_t> rows = pair.rescaled;
    rows.insert(rows.begin(), pair.max_row + 1);
    for (const int64_t k : rows) merged[k].copy_((state.select(1, k) * f).sum(0));
    factors.push_back(f);
  }
  return {merged, factors};
}

at::Tensor uss_lse_rows(const at::Tensor& stat_a, const at::Tensor& stat_b, at::Tensor& stats,
                        int64_t first, double scale, bool clamp) {
  at::Tensor rows = at::zeros_like(stat_a);
  const at::Tensor* st[2] = {&stat_a, &stat_b};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& stat = *st[k];
    const at::Tensor empty = stat == -std::numeric_limits<double>::infinity();
    const at::Tensor arg = clamp ? stat.clamp(-scale, scale) : stat;
    rows += at::where(empty, at::zeros_like(stat), at::logaddexp(arg, at::zeros_like(arg)));
    const at::Tensor inside =
        clamp ? at::logical_not(at::logical_or(stat < -scale, stat > scale))
              : at::logical_not(empty);
    const int64_t row = first + (k == 0 ? stats::kA : stats::kB);
    stats[row].copy_(stat);
    // (the σ row follows its statistic's: kSigmaA = kA + 1, kSigmaB = kB + 1)
    stats[row + 1].copy_(at::where(inside, at::sigmoid(stat), at::zeros_like(stat)));
  }
  return rows;
}

void init_uss_state(at::Tensor& state, int64_t first, bool lse) {
  if (!lse) return;
  state.select(1, first).fill_(epi::kNegBig);
  state.select(1, first + 2).fill_(epi::kNegBig);
}

std::vector<MaxPair> uss_max_pairs(int64_t first, bool lse) {
  if (!lse) return {};
  return {MaxPair{first, {}}, MaxPair{first + 2, {}}};
}

at::Tensor uss_rows_from_state(const at::Tensor& state, int64_t first, const UssOptions& o,
                               at::Tensor& stats, int64_t stats_first) {
  if (!o.lse) return state[first].clone();
  return uss_lse_rows(lse_from(state[first], state[first + 1]),
                      lse_from(state[first + 2], state[first + 3]), stats, stats_first, o.scale,
                      o.clamp);
}

}  // namespace chunking
}  // namespace unitsface
