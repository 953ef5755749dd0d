// Host-side helpers of the chunked native drivers (csrc/uss_sweep.cpp, csrc/cpu/unitsface_sweep.cpp,
// csrc/cpu/unitsface_row_grads.cpp): the chunk-size policy and the sweep over chunks, chunk
// gathers of reference rows, the chunk GEMMs, norms, the merge of per-split statistics and
// the gradient finishes. Device-agnostic ATen code (the drivers run it for CPU and CUDA
// tensors alike); the per-element maths is csrc/epilogue.h.
//
// The reference / class dimension is processed in chunks of `c` columns: per chunk one GEMM
// writes the B×c raw dot products into a reusable buffer and one epilogue pass turns them
// into running statistics (forward) or gradient coefficients (backward). Working memory is
// O(B·c + c·D), never B×N (docs/design.md §2): c = budget / B, where the budget (elements per
// chunk buffer) is kCpuChunkElems / kCudaChunkElems, or UNITSFACE_NATIVE_CHUNK_ELEMS when set
// (tests use a tiny budget to exercise many chunks).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "common.h"
#include "options.h"
#include "stats.h"

namespace unitsface {
namespace chunking {

// 256K fp32 = 1 MiB per chunk buffer: B=256 gives 1024-column chunks, which keep the GEMM
// at full speed and the epilogue's working set in L2.
constexpr int64_t kCpuChunkElems = int64_t(1) << 18;
// 8M fp32 = 32 MiB on the GPU: B=512 gives 16K-column chunks (enough columns per GEMM).
constexpr int64_t kCudaChunkElems = int64_t(1) << 23;

inline int64_t budget_elems(bool cuda) {
  const int64_t forced = forced_chunk_elems();
  return forced > 0 ? forced : cuda ? kCudaChunkElems : kCpuChunkElems;
}

// One sweep over `cols` columns for `rows` rows: c columns per chunk (at least 1, at most
// cols), the chunks shared out among `splits` independent sweeps (like the Triton kernels'
// split-K over the reference dimension). On the CPU one split per intra-op thread, each with
// its own buffers and per-row state, running single-threaded GEMMs and epilogues on a
// contiguous range of chunks (merged at the end): every core stays on its own cache-resident
// chunk and no thread barrier is needed per GEMM. On CUDA one split (the kernels are
// parallel).
struct Sweep {
  int64_t cols = 0, c = 1, n_chunks = 0, splits = 1;

  Sweep(int64_t rows, int64_t cols_, bool cuda) : cols(cols_) {
    c = std::max<int64_t>(1, budget_elems(cuda) / std::max<int64_t>(rows, 1));
    c = std::max<int64_t>(1, std::min(c, cols));
    n_chunks = (cols + c - 1) / c;
    splits = cuda ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  }

  // fn(split, j0, n) for every chunk [j0, j0 + n), the splits in parallel on CPU threads
  template <typename F>
  void run(const F& fn) const {
    auto range = [&](int64_t s) {
      const int64_t q1 = n_chunks * (s + 1) / splits;
      for (int64_t q = n_chunks * s / splits; q < q1; ++q) {
        fn(s, q * c, std::min(c, cols - q * c));
      }
    };
    if (splits <= 1) return range(0);
    // the worker threads run ATen ops: give them the caller's thread-local state (the
    // dispatch keys excluded below autograd, grad mode, ...)
    const at::ThreadLocalState tls;
    at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
      const at::ThreadLocalStateGuard guard(tls);
      for (int64_t s = s0; s < s1; ++s) range(s);
    });
  }
};

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

// Entries [j0, j0 + n) of a per-column vector (columns = the index S when defined).
inline at::Tensor columns(const at::Tensor& v, int64_t j0, int64_t n) {
  return v.narrow(0, j0, n);
}

// Reference rows (centres, bank, ref) may come in another 16/32-bit float dtype than x (fp32
// master weights with half embeddings, a half bank with fp32 embeddings): they are read
// rounded to x's dtype, chunk by chunk (chunk_rows; docs/design.md §3). float64 mixes with
// nothing.
inline bool reads_as(at::ScalarType ref, at::ScalarType x) {
  const auto narrow = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
  };
  return ref == x || (narrow(ref) && narrow(x));
}

// Rows [j0, j0 + n) of t (through `idx` when defined: t[idx[j0 + k]]), contiguous, rounded to
// `read` (x's dtype) and then in dtype `dt`, with the rows whose `valid` entry (the chunk's bool mask; undefined: all valid) is
// false read as zero rows: an invalid row takes no part whatever it holds, NaN included
// (docs/design.md §5), and a zero row also has zero dots and a zero norm, so no 0·NaN reaches
// a GEMM. A view when possible; else a chunk-sized copy.
at::Tensor chunk_rows(const at::Tensor& t, const at::Tensor& idx, int64_t j0, int64_t n,
                      at::ScalarType read, at::ScalarType dt,
                      const at::Tensor& valid = at::Tensor());

// Writes a chunk's per-column values into rows [j0, j0 + n) of dst, or rows idx[j0 + k].
void write_columns(at::Tensor& dst, const at::Tensor& idx, int64_t j0, const at::Tensor& values);

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

// out (n × D, acc dtype) = gᵀ (g: rows × n) · t (rows × D)
inline void gemm_tn(at::Tensor& out, const at::Tensor& g, const at::Tensor& t) {
  if (g.scalar_type() == out.scalar_type() && t.scalar_type() == out.scalar_type()) {
    at::mm_out(out, g.t(), t);
  } else {
    at::mm_out(out, g.t(), t, out.scalar_type());
  }
}

// With K > 1 sub-centres a chunk of n classes has n·K centre rows in the centres' own order
// (class, sub-centre), row j·K + r, while its B × n·K dots and gradient tiles and its inverse
// norms are in the order (sub-centre, class), column r·n + j: the per-element passes of
// csrc/cpu/family_rows.h then read a class's K sub-centres from K contiguous blocks instead of
// at stride K. The products run per sub-centre on strided views (BLAS takes the row stride
// K·D and the tile's K·n), so nothing is copied to reorder it. Sub-centre r's rows of a chunk
// (n × D) and its block of a tile (rows × n):
inline at::Tensor sub_centre_rows(const at::Tensor& rows, int64_t K, int64_t r) {
  return K == 1 ? rows : rows.view({-1, K, rows.size(1)}).select(1, r);
}
inline at::Tensor sub_centre_cols(const at::Tensor& tile, int64_t K, int64_t r) {
  const int64_t n = tile.size(1) / K;
  return tile.narrow(1, r * n, n);
}

// A chunk's per-row vector (j·K + r) in its tiles' order (r·n + j).
inline at::Tensor sub_centre_major(const at::Tensor& v, int64_t K) {
  return K == 1 ? v : v.view({-1, K}).t().contiguous().view({-1});
}

// out (rows × n·K, sub-centre-major) = a · rowsᵀ, rows a chunk's n·K centre rows
inline void gemm_nt_k(const at::Tensor& out, const at::Tensor& a, const at::Tensor& rows,
                      int64_t K) {
  for (int64_t r = 0; r < K; ++r) {
    at::Tensor o = sub_centre_cols(out, K, r);
    gemm_nt(o, a, sub_centre_rows(rows, K, r));
  }
}

// acc += g (rows × n·K, sub-centre-major) · rows
inline void gemm_acc_k(at::Tensor& acc, const at::Tensor& g, const at::Tensor& rows, int64_t K) {
  for (int64_t r = 0; r < K; ++r) {
    gemm_acc(acc, sub_centre_cols(g, K, r), sub_centre_rows(rows, K, r));
  }
}

// ||t_i|| of the rows of a (chunk of a) matrix, in the accumulation dtype.
at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc);

// 1 / max(||t||, eps), eps the options' normalisation eps
inline at::Tensor inv_norms(const at::Tensor& norms, double eps) {
  return norms.clamp_min(eps).reciprocal();
}

// Row side (docs/design.md §2): ∂L/∂t_i = (G_i − h_i·t̂_i) / max(||t_i||, eps) for
// G_i = Σ_j g_ij r̂_j and h_i = Σ_j g_ij cos_ij, without the projection where ||t_i|| < eps
// (the plain derivative of t / eps). All in the accumulation dtype.
inline at::Tensor normalised_grad(const at::Tensor& G, const at::Tensor& h, const at::Tensor& t,
                                  const at::Tensor& norms, double eps) {
  const at::Tensor inv = inv_norms(norms, eps);
  const at::Tensor proj = at::where(norms >= eps, h, at::zeros_like(h));
  return inv.unsqueeze(1) * (G - (proj * inv).unsqueeze(1) * t);
}

// Column side (docs/design.md §2), for the chunk's reference rows r (n × D, GEMM dtype) with
// norms `norms`: Q = g'ᵀ · x̂ (one GEMM of the chunk's g'_ij = g_ij·inv_r_j with the
// normalised batch), then ∂L/∂r_j = Q_j − inv_r_j²·(Q_j · r_j)·r_j (h_j = Σ_i g_ij cos_ij
// = Q_j · r_j; no projection where ||r_j|| < eps), written into rows j0 + k of `out` (r's
// dtype). `q` is an n × D scratch in the accumulation dtype. With K > 1 sub-centres the grads
// tile is sub-centre-major (see sub_centre_rows) and the rows, norms and rows of `out` are in
// the order (class, sub-centre); out, r and q may have strided rows (their last dim dense).
void column_grads(at::Tensor& out, const at::Tensor& grads, const at::Tensor& xh,
                  const at::Tensor& r, const at::Tensor& norms, int64_t j0, at::Tensor q,
                  double eps, int64_t K = 1);

// ∂L/∂b_j of a per-column threshold from a chunk's gradient tile, summed in `acc`:
// ∂z/∂b = ±1 = −(1/s)·∂z/∂cos, so ∂b_j = −(1/s)·Σ_i g_ij. The tile holds g'_ij = g_ij·inv_r_j
// when `norms` (‖r_j‖) is given (Σ_i g_ij = max(‖r_j‖, eps)·Σ_i g'_ij), g_ij itself when it
// is undefined (the CUDA sweep's fp16 tiles).
inline at::Tensor bias_grad_columns(const at::Tensor& grads, const at::Tensor& norms,
                                    double scale, double eps, at::ScalarType acc) {
  at::Tensor colsum = grads.sum(0, /*keepdim=*/false, acc);
  if (norms.defined()) colsum = colsum * norms.clamp_min(eps);
  return colsum * (-1.0 / scale);
}

// Per-row logsumexp from a running (max, Σ e^{z − max}) pair; −inf for an empty set
// (sum 0). A NaN sum stays NaN (NaN inputs are never hidden).
inline at::Tensor lse_from(const at::Tensor& m, const at::Tensor& s) {
  return at::where(s == 0, at::full_like(m, -std::numeric_limits<double>::infinity()),
                   m + at::log(s));
}

// A (max, Σ e^{z − max}) pair of the running state: the max in row `max_row`, the sum in the
// row after it, and `rescaled` further rows kept relative to the same max.
struct MaxPair {
  int64_t max_row;
  std::vector<int64_t> rescaled;
};

// Merges the per-split running state [splits, R, B] of a sweep into [R, B]: rows add up,
// except that the sums of each listed pair (and its rescaled rows) are first brought to the
// pair's common max. Returns the merged state and, per pair, the factors e^{m_split − m}
// [splits, B] (for per-split accumulators kept relative to that max).
std::pair<at::Tensor, std::vector<at::Tensor>> merge_splits(const at::Tensor& state,
                                                            const std::vector<MaxPair>& pairs);

// The lse form of USS, per row, from its two statistics A (positives) and B (negatives)
// (docs/design.md §1.1): loss softplus(A) + softplus(B) (an empty set adds 0; the official
// clamp clamps A, B to [−s, s]); writes (A, σ(A)·[A inside], B, σ(B)·[B inside]) to
// stats[first .. first+3].
at::Tensor uss_lse_rows(const at::Tensor& stat_a, const at::Tensor& stat_b, at::Tensor& stats,
                        int64_t first, double scale, bool clamp);

// The running state of USS (UssRows::state in csrc/rows.h): 4 rows from `first` of a
// [splits, R, B] state, zero except the running maxima of the lse form (epi::kNegBig).
void init_uss_state(at::Tensor& state, int64_t first, bool lse);
// Its (max, Σ e^{z − max}) pairs for merge_splits: (m⁺, s⁺) and (m⁻, s⁻) of the lse form.
std::vector<MaxPair> uss_max_pairs(int64_t first, bool lse);
// The per-row USS loss from a merged state [R, B] (rows first..first+3), writing the lse
// statistics to stats[stats_first .. stats_first+3] (pairs: left as they are).
at::Tensor uss_rows_from_state(const at::Tensor& state, int64_t first, const UssOptions& o,
                               at::Tensor& stats, int64_t stats_first);

}  // namespace chunking
}  // namespace unitsface
