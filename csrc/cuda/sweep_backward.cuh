// The backward epilogue of the unitsface CUDA sweep: per chunk, the gradient tiles from the
// forward's statistics and the per-split row sums.
#pragma once

#include "cuda/sweep_chunk.cuh"
#include "cuda/sweep_family.cuh"

namespace unitsface {
namespace cuda_sweep {

// Backward: g_ij = go_i·∂L_i/∂cos_ij from the forward's statistics (final: no running max),
// written to the tile (·inv_r when fold_inv); per split the row sums Σ g·cos (∂x) and Σ g of
// the bank part (a scalar threshold's ∂b). The softmax part's loop: softmax_bwd_slice.
template <typename T, typename X>
__device__ __forceinline__ void softmax_bwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T scale = a.sp.scale;
  const T go = a.go[s.i], lse = a.stats[stats::kLse * a.B + s.i];
  T raw_t = 0, gt = 0;
  if (s.tl >= 0) {
    raw_t = dots_row(a, s, 0)[s.tl] * a.inv_x[s.i] * a.inv_w[a.col0 + s.base + s.tl];
    const T zt = epi::softmax_z<T>(raw_t, true, a.sp);
    gt = epi::softmax_grad<T>(raw_t, zt, true, lse, a.sp) * go;
  }
  softmax_bwd_slice(a, s, raw_t, gt, [&](T raw) {
    return epi::softmax_grad_other<T>(raw, scale * epi::clamp_unit<T>(raw), lse, scale) * go;
  });
}

template <typename T, typename X>
__device__ __forceinline__ void uss_bwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T ix = a.inv_x[s.i], go = a.go[s.i] * a.weight;
  const int64_t B = a.B;
  const T* us = a.stats + stats::kUss * B;  // the USS block
  const T sa = us[stats::kA * B + s.i], fa = us[stats::kSigmaA * B + s.i];
  const T sb = us[stats::kB * B + s.i], fb = us[stats::kSigmaB * B + s.i];
  X* trow = tile_row(a, s, 1);
  T h = 0, gs = 0;
  for_bank_elems(a, s, ix, trow, [&](int, int, bool pos, bool neg, T cos, T zz) {
    const bool in = pos | neg;
    const T gg = in ? epi::uss_grad<T>(zz, pos, sa, fa, sb, fb, a.up) * go : T(0);
    h += in ? gg * cos : T(0);  // (selects: a masked column's values may be garbage)
    gs += gg;
    return gg;
  });
  h = warp_sum<T>(h);
  gs = warp_sum<T>(gs);
  if (s.lane == 0) {
    T& hh = a.hs[(int64_t(kHB) * a.ns + s.k) * B + s.i];
    T& gg = a.hs[(int64_t(kGB) * a.ns + s.k) * B + s.i];
    hh = (a.first ? T(0) : hh) + h;
    gg = (a.first ? T(0) : gg) + gs;
  }
}

// grid (⌈B / kEpiWarps⌉, slices, 2): z = 0 the softmax part (skipped unless do_w; Family: the
// margin family's, csrc/cuda/sweep_family.cuh), 1 the bank
template <typename T, typename X, bool Family>
__global__ void __launch_bounds__(kEpiWarps* kWarp)
    uf_bwd_epilogue(ChunkArgs<T, X> a, bool do_w, bool do_b) {
  const int64_t i = int64_t(blockIdx.x) * kEpiWarps + threadIdx.x / kWarp;
  if (i >= a.B) return;
  const Slice s = slice_of(a, i);
  if (blockIdx.z == 0) {
    if constexpr (Family) {
      if (do_w) family_bwd_warp<T, X>(a, s);
    } else {
      if (do_w) softmax_bwd_warp<T, X>(a, s);
    }
  } else {
    if (do_b) uss_bwd_warp<T, X>(a, s);
  }
}

}  // namespace cuda_sweep
}  // namespace unitsface
