// The margin family (docs/design.md §1.5) in the unitsface CUDA sweep: the softmax part's
// epilogues with the family's logits and factors (epi::family_z / family_kappa / family_grad,
// the functions the CPU rows call), and the two kernels around them for K sub-centres per
// class. The epilogue kernels instantiate these warps only for a family call
// (template Family), so CosFace/ArcFace run the plain warps of sweep_forward.cuh /
// sweep_backward.cuh unchanged.
//
// K > 1: the W GEMM writes the B × n·K raw dots of the chunk's sub-centre rows (class j's in
// j·K + r); uf_class_cos_kernel reduces them to the class cosines c_ij = max_r cos_{i,jK+r}
// (first arg-max, NaN wins) in the W part's dots, with the arg-max in `arg`; the epilogue
// runs on classes, its tile holding each class's weight without the inverse norm; then
// uf_expand_kernel writes the n·K-column tile of the ∂x and ∂W products: the weight (times
// the row's inverse norm when tiles carry it) on the arg-max column, 0 on the others.
#pragma once

#include "cuda/sweep_chunk.cuh"

namespace unitsface {
namespace cuda_sweep {

// ------------------------------------------------------------------------ sub-centres
template <typename T, typename X>
struct SubCentreArgs {
  const T* dots_k;      // B × ld·K raw dots of the chunk's sub-centre rows
  const T* inv_x;       // B
  const T* inv_wk;      // padded, per sub-centre row (global: (col0 + j)·K + r)
  T* cos;               // B × ld: the class cosines (the W part's dots)
  int32_t* arg;         // B × ld
  const X* tile;        // B × ld at row stride tld: the class weights (the W part's tile)
  X* tile_k;            // B × ld·K
  int64_t B, n, ld, tld, k, col0;
  bool fold_inv;        // the product tiles carry the inverse norms (not fp16)
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_class_cos_kernel(SubCentreArgs<T, X> a) {
  const int64_t total = a.B * a.n, K = a.k;
  for (int64_t e = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kRowThreads) {
    const int64_t i = e / a.n, j = e - i * a.n;
    const T* d = a.dots_k + i * a.ld * K + j * K;
    const T* w = a.inv_wk + (a.col0 + j) * K;
    const T ix = a.inv_x[i];
    T best = d[0] * ix * w[0];
    int32_t am = 0;
    for (int32_t r = 1; r < K; ++r) epi::sub_centre_max<T>(best, am, d[r] * ix * w[r], r);
    a.cos[i * a.ld + j] = best;
    a.arg[i * a.ld + j] = am;
  }
}

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_expand_kernel(SubCentreArgs<T, X> a) {
  const int64_t K = a.k, total = a.B * a.n * K;
  for (int64_t e = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kRowThreads) {
    const int64_t i = e / (a.n * K), col = e - i * a.n * K, j = col / K;
    const int32_t r = static_cast<int32_t>(col - j * K);
    const T g = static_cast<T>(a.tile[i * a.tld + j]);
    const T f = a.fold_inv ? a.inv_wk[a.col0 * K + col] : T(1);
    a.tile_k[i * a.ld * K + col] = static_cast<X>(r == a.arg[i * a.ld + j] ? g * f : T(0));
  }
}

// ------------------------------------------------------------------------ epilogues
// Forward, softmax part of the family: softmax_fwd_warp (sweep_forward.cuh) with the row's
// terms; with Grads the ∂x weights e^{z − m_new}·κ_c (κ_c = n'(c) on the negatives) and the
// target's arg-max sub-centre.
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void family_fwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T neg_big = static_cast<T>(epi::kNegBig);
  const epi::RowTerms<T> rt = epi::row_terms<T>(a.sp, a.margin_rows, a.B, s.i);
  const T* drow = dots_row(a, s, 0);
  const T* inv = a.inv_w + a.col0 + s.base;  // (not read for K > 1)
  const T ix = a.inv_x[s.i];
  T raw_t = 0, zt = 0, kappa_t = 0, wt = 1;
  if (s.tl >= 0) {
    wt = a.cosines ? T(1) : inv[s.tl];
    raw_t = class_raw(a, drow[s.tl], ix, wt);
    zt = epi::family_z<T>(raw_t, true, rt);
    kappa_t = epi::family_kappa<T>(raw_t, true, rt);
  }
  T raw[kVecs][4], z[kVecs][4];
  T cm = neg_big;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;
    T d[4], w[4] = {T(1), T(1), T(1), T(1)};
    load4<T>(drow + v * kWarpCols + s.lane * 4, d);
    if (!a.cosines) load4<T>(inv + v * kWarpCols + s.lane * 4, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      raw[v][e] = class_raw(a, d[e], ix, w[e]);
      z[v][e] = epi::family_z<T>(raw[v][e], false, rt);
      cm = max_keep<T>(cm, other ? z[v][e] : neg_big);
    }
  }
  cm = warp_max<T>(cm);
  if (s.tl >= 0) cm = max_keep<T>(cm, zt);
  T* st = a.state;
  const T m_old = a.first ? neg_big : state_at(st, kM, s, a.ns, a.B);
  const T m_new = max_keep<T>(m_old, cm);
  T se = 0, hw = 0;
  X* trow = Grads ? tile_row(a, s, 0) : nullptr;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;
    T g[4], w[4] = {T(1), T(1), T(1), T(1)};
    if (Grads && !a.cosines) load4<T>(inv + v * kWarpCols + s.lane * 4, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      const T ee = epi::uf_exp<T>(z[v][e] - m_new);
      se += other ? ee : T(0);
      if (Grads) {
        const T wk = ee * epi::family_kappa<T>(raw[v][e], false, rt);
        hw += other ? wk * raw[v][e] : T(0);  // (selects: a padded column may be garbage)
        g[e] = other ? wk * class_fold(a, w[e]) : T(0);  // (the target: 0)
      }
    }
    if (Grads) store4<X, T>(trow + v * kWarpCols + s.lane * 4, g);
  }
  se = warp_sum<T>(se);
  if (Grads) hw = warp_sum<T>(hw);
  const T alpha = epi::uf_exp<T>(m_old - m_new);
  const T so = se;  // the other columns' sum-exp (the target stays out: softmax_fwd_warp)
  if (s.tl >= 0) se += epi::uf_exp<T>(zt - m_new);
  if (s.lane == 0) {
    store_fwd_state<T, X, Grads>(a, s, m_new, alpha, se, so, zt, hw, raw_t, kappa_t);
    if (Grads && (s.tl >= 0 || a.first)) {  // and the target's arg-max sub-centre (K > 1)
      const int32_t arg_t = (s.tl >= 0 && a.cosines) ? a.arg[s.i * a.ld + s.base + s.tl] : 0;
      state_at(st, kTArg, s, a.ns, a.B) = static_cast<T>(arg_t);
    }
  }
  if (Grads && !a.first && alpha != T(1)) rescale_row<T>(a.acc_w, s, a.B, a.D, alpha);
}

// Backward, softmax part of the family: g_ic = go_i·s·(p_ic − [c = y_i])·κ_ic from the
// forward's lse (softmax_bwd_slice).
template <typename T, typename X>
__device__ __forceinline__ void family_bwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const epi::RowTerms<T> rt = epi::row_terms<T>(a.sp, a.margin_rows, a.B, s.i);
  const T go = a.go[s.i], lse = a.stats[stats::kLse * a.B + s.i];
  T raw_t = 0, gt = 0;
  if (s.tl >= 0) {
    const T* inv = a.inv_w + a.col0 + s.base;
    raw_t = class_raw(a, dots_row(a, s, 0)[s.tl], a.inv_x[s.i],
                      a.cosines ? T(1) : inv[s.tl]);
    gt = epi::family_grad<T>(raw_t, true, lse, rt) * go;
  }
  softmax_bwd_slice(a, s, raw_t, gt,
                    [&](T raw) { return epi::family_grad<T>(raw, false, lse, rt) * go; });
}

}  // namespace cuda_sweep
}  // namespace unitsface
