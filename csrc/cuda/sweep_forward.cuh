// The forward epilogue of the unitsface CUDA sweep: per chunk, the running statistics of
// each (row, slice) and, with row_grads, the ∂x weights of the chunk's tiles.
#pragma once

#include "cuda/sweep_chunk.cuh"
#include "cuda/sweep_family.cuh"

namespace unitsface {
namespace cuda_sweep {

// Lane 0's update of a row's running forward state in its split (the softmax part, plain and
// margin family alike): max, Σ e^{z − m} and the target logit; with Grads the ∂x weights'
// Σ e^{z − m}·κ·cos, the other columns' sum-exp So and, where the slice holds the target (or
// on the first chunk), its raw cosine and κ_t.
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void store_fwd_state(const ChunkArgs<T, X>& a, const Slice& s,
                                                T m_new, T alpha, T se, T so, T zt, T hw,
                                                T raw_t, T kappa_t) {
  T* st = a.state;
  const T s_old = a.first ? T(0) : state_at(st, kS, s, a.ns, a.B);
  const T zt_old = a.first ? T(0) : state_at(st, kZt, s, a.ns, a.B);
  state_at(st, kM, s, a.ns, a.B) = m_new;
  state_at(st, kS, s, a.ns, a.B) = s_old * alpha + se;
  state_at(st, kZt, s, a.ns, a.B) = zt_old + (s.tl >= 0 ? zt : T(0));
  if (Grads) {
    const T hw_old = a.first ? T(0) : state_at(st, kHw, s, a.ns, a.B);
    state_at(st, kHw, s, a.ns, a.B) = hw_old * alpha + hw;
    const T so_old = a.first ? T(0) : state_at(st, kSo, s, a.ns, a.B);
    state_at(st, kSo, s, a.ns, a.B) = so_old * alpha + so;
    if (s.tl >= 0 || a.first) {
      state_at(st, kTRaw, s, a.ns, a.B) = raw_t;
      state_at(st, kTKappa, s, a.ns, a.B) = kappa_t;
    }
  }
}

// Forward, softmax part (docs/design.md §1.2): the slice folded into split k's running
// (max, Σ e^{z − m}) and target logit. With Grads (row_grads) also the weights of the ∂x
// product, e^{z − m_new}·κ_c (·inv_w_c), written to the tile, the running Σ e^{z − m}·κ·cos,
// the target's raw cosine and κ_t, and the lazy rescale of the accumulator row
// (csrc/cpu/unitsface_row_grads.h has the maths; this is its per-split form). Unlike the CPU
// loops, the target column stays out of the tile and of Σ e^{z − m}·κ·cos: its weight
// e^{z_t − m} ≈ 1 would be rounded to x's dtype in the tile, and the finish's −s·κ_t·ŵ_y
// would then cancel against it, leaving that rounding (~u·s) as the ∂x of a row with p_y ≈ 1.
// The finish adds the target's whole term s·(p_y − 1)·κ_t = −s·κ_t·So/S instead, from the
// running sum-exp of the other columns So (kSo), without cancellation.
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void softmax_fwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T scale = a.sp.scale;
  const T* drow = dots_row(a, s, 0);
  const T* inv = a.inv_w + a.col0 + s.base;
  const T ix = a.inv_x[s.i];
  T raw_t = 0, zt = 0, kappa_t = 0;
  if (s.tl >= 0) {  // warp-uniform: one scalar target, computed by every lane
    raw_t = drow[s.tl] * ix * inv[s.tl];
    zt = epi::softmax_z<T>(raw_t, true, a.sp);
    kappa_t = epi::target_kappa<T>(raw_t, a.sp);
  }
  T raw[kVecs][4], z[kVecs][4];
  T cm = neg_big;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;  // warp-uniform: the slice ends
    T d[4], w[4];
    load4<T>(drow + v * kWarpCols + s.lane * 4, d);
    load4<T>(inv + v * kWarpCols + s.lane * 4, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      raw[v][e] = d[e] * ix * w[e];
      z[v][e] = scale * epi::clamp_unit<T>(raw[v][e]);
      const T zm = other ? z[v][e] : neg_big;
      cm = max_keep<T>(cm, zm);
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
    T g[4], w[4];
    if (Grads) load4<T>(inv + v * kWarpCols + s.lane * 4, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      const T ee = epi::uf_exp<T>(z[v][e] - m_new);
      se += other ? ee : T(0);
      if (Grads) {
        const bool use = other & epi::clamp_unit_inactive<T>(raw[v][e]);
        hw += use ? ee * raw[v][e] : T(0);
        g[e] = use ? ee * (a.fold_inv ? w[e] : T(1)) : T(0);
      }
    }
    if (Grads) store4<X, T>(trow + v * kWarpCols + s.lane * 4, g);  // (the target: 0)
  }
  se = warp_sum<T>(se);
  if (Grads) hw = warp_sum<T>(hw);
  const T alpha = epi::uf_exp<T>(m_old - m_new);
  const T so = se;  // the other columns' sum-exp
  if (s.tl >= 0) se += epi::uf_exp<T>(zt - m_new);
  if (s.lane == 0) {
    store_fwd_state<T, X, Grads>(a, s, m_new, alpha, se, so, zt, hw, raw_t, kappa_t);
  }
  // (read by the lanes above before lane 0 overwrote them: the reads of m_old come first in
  // every lane, and lane 0's writes follow its own reads; no other warp touches this entry)
  if (Grads && !a.first && alpha != T(1)) rescale_row<T>(a.acc_w, s, a.B, a.D, alpha);
}


// Forward, bank part (USS, docs/design.md §1.1, column labels = the classes of S: the positive
// of row i is its target column, when that bank row is valid). Pairs: Σ softplus; lse: running
// (max, Σ e^{z − max}) of P and N. With Grads: the ∂x weights in the tile — pairs: λ·∂ℓ/∂cos
// (final at once); lse: e^{z⁻ − m⁻_new} on N (its factor λ·s·σB'/s⁻ at the end) — and the row
// sums of csrc/cpu/unitsface_row_grads.h, per split.
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void uss_fwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T neg_big = static_cast<T>(epi::kNegBig);
  const int64_t c0 = a.col0 + s.base;
  const T ix = a.inv_x[s.i];
  X* trow = Grads ? tile_row(a, s, 1) : nullptr;
  T* st = a.state;
  T cosv[kVecs][4], z[kVecs][4];
  if (!a.up.lse) {
    T loss = 0, h = 0, gs = 0;
    for_bank_elems(a, s, ix, trow, [&](int, int, bool pos, bool neg, T cos, T zz) {
      const bool in = pos | neg;
      if constexpr (!Grads) {
        loss += in ? epi::uss_pair_loss<T>(zz, a.up) : T(0);
        return T(0);
      } else {
        T term, grad;
        epi::uss_pair_loss_grad<T>(zz, pos, a.up, term, grad);
        const T gg = in ? a.weight * grad : T(0);
        loss += in ? term : T(0);
        h += in ? gg * cos : T(0);  // (a select: a masked column's cosine may be garbage)
        gs += gg;
        return gg;
      }
    });
    loss = warp_sum<T>(loss);
    if (Grads) {
      h = warp_sum<T>(h);
      gs = warp_sum<T>(gs);
    }
    if (s.lane == 0) {
      T& l = state_at(st, kU0, s, a.ns, a.B);
      l = (a.first ? T(0) : l) + loss;
      if (Grads) {
        T& hh = state_at(st, kUh, s, a.ns, a.B);
        T& gg = state_at(st, kUg, s, a.ns, a.B);
        hh = (a.first ? T(0) : hh) + h;
        gg = (a.first ? T(0) : gg) + gs;
      }
    }
    return;
  }
  // lse: the chunk maxima of z⁺ over P and z⁻ over N, then the sums relative to the new maxima
  T cp = neg_big, cn = neg_big;
  for_bank_elems(a, s, ix, static_cast<X*>(nullptr),
                 [&](int v, int e, bool pos, bool neg, T cos, T zz) {
                   cosv[v][e] = cos;
                   z[v][e] = zz;
                   cp = max_keep<T>(cp, pos ? zz : neg_big);
                   cn = max_keep<T>(cn, neg ? zz : neg_big);
                   return T(0);
                 });
  cp = warp_max<T>(cp);
  cn = warp_max<T>(cn);
  const T mp_old = a.first ? neg_big : state_at(st, kU0, s, a.ns, a.B);
  const T mn_old = a.first ? neg_big : state_at(st, kU0 + 2, s, a.ns, a.B);
  const T mp = max_keep<T>(mp_old, cp), mn = max_keep<T>(mn_old, cn);
  T sp = 0, sn = 0, hn = 0, cpos = 0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;
    T val[4], w[4], g[4];
    const int64_t off = v * kWarpCols + s.lane * 4;
    load4<T>(a.vb + c0 + off, val);
    if (Grads) load4<T>(a.inv_b + c0 + off, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bool pos, neg;
      bank_member(s, v, e, val[e] != T(0), pos, neg);
      const T ee = epi::uf_exp<T>(z[v][e] - (pos ? mp : mn));
      sp += pos ? ee : T(0);
      sn += neg ? ee : T(0);
      if (Grads) {
        hn += neg ? ee * cosv[v][e] : T(0);
        cpos += pos ? cosv[v][e] : T(0);
        g[e] = neg ? ee * (a.fold_inv ? w[e] : T(1)) : T(0);
      }
    }
    if (Grads) store4<X, T>(trow + off, g);
  }
  sp = warp_sum<T>(sp);
  sn = warp_sum<T>(sn);
  if (Grads) {
    hn = warp_sum<T>(hn);
    cpos = warp_sum<T>(cpos);
  }
  const T alpha_n = epi::uf_exp<T>(mn_old - mn);
  if (s.lane == 0) {
    const T sp_old = a.first ? T(0) : state_at(st, kU0 + 1, s, a.ns, a.B);
    const T sn_old = a.first ? T(0) : state_at(st, kU0 + 3, s, a.ns, a.B);
    state_at(st, kU0, s, a.ns, a.B) = mp;
    state_at(st, kU0 + 1, s, a.ns, a.B) = sp_old * epi::uf_exp<T>(mp_old - mp) + sp;
    state_at(st, kU0 + 2, s, a.ns, a.B) = mn;
    state_at(st, kU0 + 3, s, a.ns, a.B) = sn_old * alpha_n + sn;
    if (Grads) {
      T& hh = state_at(st, kUh, s, a.ns, a.B);
      T& cc = state_at(st, kUcp, s, a.ns, a.B);
      hh = (a.first ? T(0) : hh) * alpha_n + hn;
      cc = (a.first ? T(0) : cc) + cpos;
    }
  }
  if (Grads && !a.first && alpha_n != T(1)) rescale_row<T>(a.acc_b, s, a.B, a.D, alpha_n);
}

// grid (⌈B / kEpiWarps⌉, slices of the chunk, parts), kEpiWarps warps per block; Family:
// the margin family's softmax part (csrc/cuda/sweep_family.cuh)
template <typename T, typename X, bool Grads, bool Family>
__global__ void __launch_bounds__(kEpiWarps* kWarp) uf_fwd_epilogue(ChunkArgs<T, X> a) {
  const int64_t i = int64_t(blockIdx.x) * kEpiWarps + threadIdx.x / kWarp;
  if (i >= a.B) return;  // a whole warp: no barrier below
  const Slice s = slice_of(a, i);
  if (blockIdx.z == 0) {
    if constexpr (Family) {
      family_fwd_warp<T, X, Grads>(a, s);
    } else {
      softmax_fwd_warp<T, X, Grads>(a, s);
    }
  } else {
    uss_fwd_warp<T, X, Grads>(a, s);
  }
}

}  // namespace cuda_sweep
}  // namespace unitsface
