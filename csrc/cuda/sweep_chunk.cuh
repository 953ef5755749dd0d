// What the forward and backward epilogues of the unitsface CUDA sweep share
// (csrc/cuda/sweep_forward.cuh, csrc/cuda/sweep_backward.cuh): the chunk's arguments, one
// warp's slice of a row, the softmax part's backward loop over a slice and the loop over the
// bank part's elements of a slice.
#pragma once

#include "cuda/sweep_common.cuh"

namespace unitsface {
namespace cuda_sweep {

// ------------------------------------------------------------------------ epilogues
// One chunk: columns [col0, col0 + n) of S, slices of kw columns, per-column arrays indexed by
// the global column. The dots are [parts][B][ld] (part 1: the bank) in the order in which the
// chunk's GEMMs wrote them: when one batched GEMM wrote both parts from rows ordered by
// address, the bank's may come first (dots_part < 0). The tiles are [B][parts][ld] (row
// stride tld = parts·ld): slice k of part p starts at column p·ld + k·kw of a row, so that
// the ∂x products of both parts have one batch stride (kw) in the tile (unitsface_sweep.cu).
template <typename T, typename X>
struct ChunkArgs {
  const T* dots;            // the W part's dots
  X* tiles;                 // gradient tiles (row_grads forward, backward), or null
  int64_t ld;               // the dots' row stride (the plan's c), the tiles' part stride
  int64_t dots_part;        // the bank part's dots from the W part's: B·ld or −B·ld
  int64_t tld;              // the tiles' row stride: parts·ld
  int64_t B, D, n, col0, kw, ns;
  bool first;               // the sweep's first chunk: the running state starts here
  bool fold_inv;            // tiles carry the inverse norm of their column (not fp16)
  const T* inv_x;
  const int64_t* target;
  const T *inv_w, *inv_b, *vb, *cb;
  epi::SoftmaxParams<T> sp;
  // the margin family (csrc/cuda/sweep_family.cuh)
  const T* margin_rows;     // [4, B] (csrc/stats.h margin_row), or null
  bool cosines;             // K > 1: the W part's dots are the class cosines (sub-centre max)
  const int32_t* arg;       // K > 1: [B, ld] the arg-max sub-centre of each class column
  epi::UssParams<T> up;
  T weight;                 // λ
  // forward
  T* state;                 // [kStateRows, ns, B]
  T *acc_w, *acc_b;         // [ns, B, D] ∂x accumulators of the row_grads forward, or null
  // backward
  const T* go;              // B, upstream gradient per row
  const T* stats;           // [stats::kUnitsfaceRows, B] (the forward's statistics)
  T* hs;                    // [kBwdRows, ns, B]
};

// The slice of one warp: columns [base, base + width) of the chunk.
struct Slice {
  int64_t i, base, width, tl;  // row, first column, columns, the row's target column or −1
  int k, lane;
};

// The first element of a slice's row in part p's dots (0: W, 1: the bank) and tile.
template <typename T, typename X>
__device__ __forceinline__ const T* dots_row(const ChunkArgs<T, X>& a, const Slice& s, int p) {
  return a.dots + (p == 0 ? 0 : a.dots_part) + s.i * a.ld + s.base;
}
template <typename T, typename X>
__device__ __forceinline__ X* tile_row(const ChunkArgs<T, X>& a, const Slice& s, int p) {
  return a.tiles + s.i * a.tld + p * a.ld + s.base;
}

template <typename T, typename X>
__device__ __forceinline__ Slice slice_of(const ChunkArgs<T, X>& a, int64_t i) {
  Slice s;
  s.i = i;
  s.k = blockIdx.y;
  s.lane = threadIdx.x % kWarp;
  s.base = int64_t(s.k) * a.kw;
  const int64_t rest = a.n - s.base;
  s.width = rest < a.kw ? rest : a.kw;
  const int64_t t = a.target[i] - a.col0 - s.base;
  s.tl = (t >= 0 && t < s.width) ? t : -1;
  return s;
}

// column index of element e of vector v of this lane, inside the slice
__device__ __forceinline__ int64_t col_of(int lane, int v, int e) {
  return int64_t(v) * kWarpCols + lane * 4 + e;
}

template <typename T>
__device__ __forceinline__ T& state_at(T* st, int r, const Slice& s, int64_t ns, int64_t B) {
  return st[(int64_t(r) * ns + s.k) * B + s.i];
}

// acc[k][i][:] *= f (the lazy rescale of a ∂x accumulator row when its running max moved)
template <typename T>
__device__ __forceinline__ void rescale_row(T* acc, const Slice& s, int64_t B, int64_t D, T f) {
  T* row = acc + (int64_t(s.k) * B + s.i) * D;
  for (int64_t d = s.lane; d < D; d += kWarp) row[d] *= f;
}


// The raw class cosine of element (v, e) of the slice: the reduced cosine (K > 1: the margin
// family's sub-centres, csrc/cuda/sweep_family.cuh) or dot·inv_x·inv_w; and the factor its
// tile entry carries (inv_w when the tiles carry the inverse norms and the tile is per
// column; 1 for K > 1: uf_expand_kernel folds it).
template <typename T, typename X>
__device__ __forceinline__ T class_raw(const ChunkArgs<T, X>& a, T d, T ix, T w) {
  return a.cosines ? d : d * ix * w;
}
template <typename T, typename X>
__device__ __forceinline__ T class_fold(const ChunkArgs<T, X>& a, T w) {
  return (a.fold_inv & !a.cosines) ? w : T(1);
}

// The softmax part's backward over this lane's vectors of the slice, for the plain and the
// family warps alike: g = grad_of(raw) on every other column (raw: its class cosine), the
// target's gt (computed by the caller with its margin), written to the tile times class_fold;
// per split Σ g·raw into the row sums (∂x's h).
template <typename T, typename X, typename G>
__device__ __forceinline__ void softmax_bwd_slice(const ChunkArgs<T, X>& a, const Slice& s,
                                                  T raw_t, T gt, const G& grad_of) {
  const T* drow = dots_row(a, s, 0);
  const T* inv = a.inv_w + a.col0 + s.base;
  const T ix = a.inv_x[s.i];
  X* trow = tile_row(a, s, 0);
  T h = 0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;
    T d[4], w[4] = {T(1), T(1), T(1), T(1)}, g[4];
    const int64_t off = v * kWarpCols + s.lane * 4;
    load4<T>(drow + off, d);
    if (!a.cosines) load4<T>(inv + off, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      const T raw = class_raw(a, d[e], ix, w[e]);
      const T gg = other ? grad_of(raw) : T(0);
      h += other ? gg * raw : T(0);  // (selects: a padded column's values may be garbage)
      g[e] = other ? gg * class_fold(a, w[e]) : T(0);
      g[e] = jj == s.tl ? gt * class_fold(a, w[e]) : g[e];
    }
    store4<X, T>(trow + off, g);
  }
  h = warp_sum<T>(h);
  if (s.tl >= 0) h += gt * raw_t;
  if (s.lane == 0) {
    T& hh = a.hs[(int64_t(kHW) * a.ns + s.k) * a.B + s.i];
    hh = (a.first ? T(0) : hh) + h;
  }
}

// The bank part's inputs of one 4-column vector of a lane: raw dots, inverse norms, validity
// (1 / 0) and thresholds.
template <typename T>
struct BankVec {
  T d[4], w[4], val[4], b[4];
};

template <typename T, typename X>
__device__ __forceinline__ void load_bank_vec(const ChunkArgs<T, X>& a, const Slice& s,
                                              int64_t off, BankVec<T>& q) {
  const int64_t c0 = a.col0 + s.base;
  load4<T>(dots_row(a, s, 1) + off, q.d);
  load4<T>(a.inv_b + c0 + off, q.w);
  load4<T>(a.vb + c0 + off, q.val);
  load4<T>(a.cb + c0 + off, q.b);
}

// USS membership of element e of vector v of this lane from its column's validity: P = {the
// target column}, N = the slice's other columns
__device__ __forceinline__ void bank_member(const Slice& s, int v, int e, bool valid, bool& pos,
                                            bool& neg) {
  const int64_t jj = col_of(s.lane, v, e);
  const bool ok = (jj < s.width) & valid;
  pos = ok & (jj == s.tl);
  neg = ok & (jj != s.tl);
}

// The bank part's elements of this lane's vectors of the slice: r = f(v, e, pos, neg, cos, z)
// for each (z = z⁺ on P, z⁻ elsewhere), and, when trow is given, the tile's value r·inv_b (r
// where the tile does not carry the inverse norms) written where the element is in P or N, 0
// elsewhere (a select: a masked column's inverse norm may be garbage, and 0·NaN is NaN).
template <typename T, typename X, typename F>
__device__ __forceinline__ void for_bank_elems(const ChunkArgs<T, X>& a, const Slice& s, T ix,
                                               X* trow, F&& f) {
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;  // warp-uniform: the slice ends
    BankVec<T> q;
    T g[4];
    const int64_t off = v * kWarpCols + s.lane * 4;
    load_bank_vec(a, s, off, q);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bool pos, neg;
      bank_member(s, v, e, q.val[e] != T(0), pos, neg);
      const T cos = q.d[e] * ix * q.w[e];
      const T r = f(v, e, pos, neg, cos, epi::uss_z<T>(cos, q.b[e], pos, a.up));
      g[e] = (pos | neg) ? r * (a.fold_inv ? q.w[e] : T(1)) : T(0);
    }
    if (trow != nullptr) store4<X, T>(trow + off, g);
  }
}

}  // namespace cuda_sweep
}  // namespace unitsface
