// Host-side helpers of the chunked native ops (csrc/uss.cpp, csrc/unitsface.cpp and their
// CUDA halves): the chunk-size policy, chunk views / gathers of reference rows, the chunk
// GEMMs and the ATen-level row statistics. Compiled by both the C++ compiler and nvcc's host
// pass; no device code here (the device maths is csrc/epilogue.h).
//
// The reference/class dimension is processed in chunks of `c` columns: per chunk one GEMM
// writes the B×c raw dot products into a reusable buffer and one epilogue pass turns them
// into running statistics (forward) or gradient coefficients (backward). Working memory is
// O(B·c + c·D), never B×N: c = budget / B, where the budget (elements per chunk buffer) is
// kCpuChunkElems / kCudaChunkElems, or UNITSFACE_NATIVE_CHUNK_ELEMS when set (tests use a
// tiny budget to exercise many chunks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "common.h"

namespace unitsface {
namespace chunking {

// 256K fp32 = 1 MiB per chunk buffer: B=256 gives 1024-column chunks, which keep the GEMM
// at full speed and the epilogue's working set in L2.
constexpr int64_t kCpuChunkElems = int64_t(1) << 18;
// 8M fp32 = 32 MiB on the GPU: B=512 gives 16K-column chunks (enough columns per GEMM).
constexpr int64_t kCudaChunkElems = int64_t(1) << 23;

inline int64_t budget_elems(bool cuda) {
  if (const char* env = std::getenv("UNITSFACE_NATIVE_CHUNK_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return cuda ? kCudaChunkElems : kCpuChunkElems;
}

// Columns per chunk for B rows and N columns: at least 1, at most N.
inline int64_t chunk_cols(int64_t rows, int64_t n, bool cuda) {
  const int64_t c = std::max<int64_t>(1, budget_elems(cuda) / std::max<int64_t>(rows, 1));
  return std::max<int64_t>(1, std::min(c, n));
}

// How many independent sweeps ("splits", like the Triton kernels' split-K over the reference
// dimension) share the chunks: on the CPU one per intra-op thread, each with its own
// buffers and per-row state, running single-threaded GEMMs and epilogues on a contiguous
// range of chunks (merged at the end). That keeps every core on its own cache-resident
// chunk and avoids a thread barrier per GEMM. On CUDA one sweep (the kernels are parallel).
inline int64_t num_splits(bool cuda, int64_t n_chunks) {
  if (cuda) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
}

// Runs fn(split, first_chunk, end_chunk) for every split, in parallel on CPU threads.
template <typename F>
void for_splits(int64_t splits, int64_t n_chunks, const F& fn) {
  if (splits <= 1) {
    fn(int64_t(0), int64_t(0), n_chunks);
    return;
  }
  // the worker threads run ATen ops: give them the caller's thread-local state (the
  // dispatch keys excluded below autograd, grad mode, ...)
  const at::ThreadLocalState tls;
  at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t s = s0; s < s1; ++s) fn(s, n_chunks * s / splits, n_chunks * (s + 1) / splits);
  });
}

// Per-split running (max, Σ e^{z − max}) pairs [splits, B] → the merged max and the factors
// e^{m_s − m} [splits, B] that bring each split's sums (and accumulators) to it.
inline std::pair<at::Tensor, at::Tensor> merge_max(const at::Tensor& m) {
  const at::Tensor top = std::get<0>(m.max(0));
  return {top, at::exp(m - top.unsqueeze(0))};
}

// float64 stays float64, everything else accumulates in float32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype the GEMM operands are kept in: on CUDA the input dtype (16-bit GEMMs write
// fp32 results through mm's out_dtype); on the CPU the accumulation dtype (16-bit inputs
// are upcast, chunk by chunk for the reference rows).
inline at::ScalarType gemm_type(const at::Tensor& x) {
  return x.is_cuda() ? x.scalar_type() : acc_type(x.scalar_type());
}

// The first rows·cols elements of a flat scratch buffer as a contiguous rows × cols matrix.
inline at::Tensor scratch(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Rows [j0, j0 + n) of t (through `idx` when defined: t[idx[j0 + k]]), contiguous, in
// dtype `dt`. A view when possible; else a chunk-sized copy (gather and/or cast).
inline at::Tensor chunk_rows(const at::Tensor& t, const at::Tensor& idx, int64_t j0, int64_t n,
                             at::ScalarType dt) {
  at::Tensor rows = idx.defined() ? t.index_select(0, idx.narrow(0, j0, n)) : t.narrow(0, j0, n);
  return rows.scalar_type() == dt ? rows.contiguous() : rows.to(dt).contiguous();
}

// out (rows × n, acc dtype) = a (rows × D) · bᵀ (b: n × D), both in the GEMM dtype.
inline void gemm_nt(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b.t());
  } else {
    at::mm_out(out, a, b.t(), out.scalar_type());  // 16-bit inputs, fp32 result (CUDA)
  }
}

// acc (rows × D, acc dtype) += g (rows × n) · r (n × D)
inline void gemm_acc(at::Tensor& acc, const at::Tensor& g, const at::Tensor& r) {
  if (g.scalar_type() == acc.scalar_type() && r.scalar_type() == acc.scalar_type()) {
    acc.addmm_(g, r);
  } else {
    acc.add_(at::mm(g, r, acc.scalar_type()));
  }
}

// out (n × D, acc dtype) = gᵀ (g: rows × n) · xh (rows × D)
inline void gemm_tn(at::Tensor& out, const at::Tensor& g, const at::Tensor& xh) {
  if (g.scalar_type() == out.scalar_type() && xh.scalar_type() == out.scalar_type()) {
    at::mm_out(out, g.t(), xh);
  } else {
    at::mm_out(out, g.t(), xh, out.scalar_type());
  }
}

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

// ||t_i|| of the rows of a (chunk of a) matrix, in the accumulation dtype. On the CPU, for a
// contiguous matrix already in that dtype, one plain pass (ATen's generic norm reduction
// costs several times more on these row-major chunks).
inline at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc) {
  if (t.is_cuda() || t.scalar_type() != acc || !t.is_contiguous()) {
    return at::linalg_vector_norm(t, 2, {1}, /*keepdim=*/false, acc);
  }
  at::Tensor out = at::empty({t.size(0)}, t.options());
  if (acc == at::kDouble) {
    row_norms_cpu<double>(t.const_data_ptr<double>(), out.data_ptr<double>(), t.size(0),
                          t.size(1));
  } else {
    row_norms_cpu<float>(t.const_data_ptr<float>(), out.data_ptr<float>(), t.size(0),
                         t.size(1));
  }
  return out;
}

// 1 / max(||t||, eps)
inline at::Tensor inv_norms(const at::Tensor& norms) {
  return norms.clamp_min(kNormEps).reciprocal();
}

// Row side: ∂L/∂t_i = (G_i − h_i·t̂_i) / max(||t_i||, eps) for G_i = Σ_j g_ij r̂_j and
// h_i = Σ_j g_ij cos_ij, without the projection where ||t_i|| < eps (the plain derivative
// of t / eps). All in the accumulation dtype.
inline at::Tensor normalised_grad(const at::Tensor& G, const at::Tensor& h, const at::Tensor& t,
                                  const at::Tensor& norms) {
  const at::Tensor inv = inv_norms(norms);
  const at::Tensor proj = at::where(norms >= kNormEps, h, at::zeros_like(h));
  return inv.unsqueeze(1) * (G - (proj * inv).unsqueeze(1) * t);
}

// Column side, from Q_j = Σ_i g_ij·inv_r_j·x̂_i (the GEMM of the g·inv_r buffer with x̂):
// ∂L/∂r_j = Q_j − inv_r_j²·(Q_j · r_j)·r_j, since h_j = Σ_i g_ij cos_ij = Q_j · r_j
// (no projection where ||r_j|| < eps).
inline at::Tensor column_grad(const at::Tensor& Q, const at::Tensor& r, const at::Tensor& norms) {
  const at::Tensor inv = inv_norms(norms);
  const at::Tensor h = (Q * r).sum(1);
  const at::Tensor proj = at::where(norms >= kNormEps, h * inv * inv, at::zeros_like(h));
  return Q - proj.unsqueeze(1) * r;
}

// Per-row logsumexp from a running (max, Σ e^{z − max}) pair; −inf for an empty set
// (sum 0). A NaN sum stays NaN (NaN inputs are never hidden).
inline at::Tensor lse_from(const at::Tensor& m, const at::Tensor& s) {
  return at::where(s == 0, at::full_like(m, -std::numeric_limits<double>::infinity()),
                   m + at::log(s));
}

// The lse form of USS, per row, from its two statistics A (positives) and B (negatives):
// loss softplus(A) + softplus(B) (an empty set adds 0; the official clamp clamps A, B to
// [−s, s]); writes (A, σ(A)·[A inside], B, σ(B)·[B inside]) to stats[first .. first+3].
inline at::Tensor uss_lse_rows(const at::Tensor& stat_a, const at::Tensor& stat_b,
                               at::Tensor& stats, int64_t first, double scale, bool clamp) {
  at::Tensor rows = at::zeros_like(stat_a);
  const at::Tensor* st[2] = {&stat_a, &stat_b};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& stat = *st[k];
    const at::Tensor empty = stat == -std::numeric_limits<double>::infinity();
    const at::Tensor arg = clamp ? stat.clamp(-scale, scale) : stat;
    rows += at::where(empty, at::zeros_like(stat), at::logaddexp(arg, at::zeros_like(arg)));
    const at::Tensor inside =
        clamp ? at::logical_and(stat >= -scale, stat <= scale) : at::logical_not(empty);
    stats[first + 2 * k].copy_(stat);
    stats[first + 2 * k + 1].copy_(at::where(inside, at::sigmoid(stat), at::zeros_like(stat)));
  }
  return rows;
}

}  // namespace chunking
}  // namespace unitsface
