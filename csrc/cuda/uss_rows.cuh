// The CUDA row code of USS (docs/design.md §1.1): one thread block per row of a chunk, its
// threads striding over the chunk's columns with the maths of csrc/epilogue.h, the block
// combining with csrc/cuda/block_reduce.cuh. Used by the USS family's kernels (csrc/cuda/uss.cu) and
// by the bank part of the unitsface kernels (csrc/cuda/unitsface_sweep.cu, column labels = the
// chunk's classes), like the CPU row code of csrc/cpu/uss_rows.h.
#pragma once

#include "epilogue.h"
#include "cuda/block_reduce.cuh"
#include "rows.h"

namespace unitsface {
namespace cuda_rows {

using cuda_epi::kThreads;

// Forward of row i: the chunk folded into the row's running statistics (UssRows::state).
template <typename T>
__device__ __forceinline__ void uss_fwd_row(const UssRows<T>& a, int64_t i) {
  const int64_t B = a.B, c = a.c;
  const T* d = a.dots + i * c;
  const T ix = a.inv_x[i];
  const int64_t yi = a.y[i], self = self_column(a, i);
  T* st = a.state;
  if (!a.p.lse) {
    T acc[1] = {T(0)};
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
      if (pos || neg) {
        const T cos = d[j] * ix * a.inv_r[j];
        acc[0] += epi::uss_pair_loss<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.p), a.p);
      }
    }
    cuda_epi::block_sum<T, 1>(acc);
    if (threadIdx.x == 0) st[i] += acc[0];
    return;
  }
  const T neg_big = static_cast<T>(epi::kNegBig);
  T mp = neg_big, sp = 0, mn = neg_big, sn = 0;
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
    const T z = epi::uss_z<T>(d[j] * ix * a.inv_r[j], a.bias[j], pos, a.p);
    if (pos) epi::lse_push<T>(mp, sp, z);
    if (neg) epi::lse_push<T>(mn, sn, z);
  }
  cuda_epi::block_lse<T>(mp, sp);
  cuda_epi::block_lse<T>(mn, sn);
  if (threadIdx.x == 0) {
    epi::lse_merge<T>(st[i], st[B + i], mp, sp);
    epi::lse_merge<T>(st[2 * B + i], st[3 * B + i], mn, sn);
  }
}

// Backward of row i: g_ij = go_i·∂L_i/∂cos_ij; g'_ij = g_ij·inv_r_j written to `grads` (the
// GEMM dtype G; may alias the dots: each element is read, then written), and this thread's
// Σ g·cos and Σ g added to v (the caller reduces the block).
template <typename T, typename G>
__device__ __forceinline__ void uss_bwd_row(const UssRows<T>& a, G* grads, int64_t i,
                                            T (&v)[2]) {
  const int64_t B = a.B, c = a.c;
  const T* d = a.dots + i * c;
  G* g_out = grads + i * c;
  const T ix = a.inv_x[i], go = a.go[i];
  const int64_t yi = a.y[i], self = self_column(a, i);
  const T sa = a.stats[stats::kA * B + i], fa = a.stats[stats::kSigmaA * B + i];
  const T sb = a.stats[stats::kB * B + i], fb = a.stats[stats::kSigmaB * B + i];
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
    const T cos = d[j] * ix * a.inv_r[j];
    T g = T(0);
    if (pos || neg) {
      g = epi::uss_grad<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.p), pos, sa, fa, sb, fb, a.p) *
          go;
    }
    v[0] += g * cos;
    v[1] += g;
    g_out[j] = static_cast<G>(g * a.inv_r[j]);
  }
}

}  // namespace cuda_rows
}  // namespace unitsface
