// The kernels of the unitsface family's CUDA sweep (the driver: csrc/unitsface_cuda.cu; the
// chunk and slice plan: csrc/cuda_plan.h). The per-element maths is csrc/epilogue.h, the same
// functions the CPU row loops call.
//
// Types: T is the accumulation dtype (float; double for float64 inputs), X the dtype of x and
// of the GEMM operands (bf16, fp16, float, double); the gradient tiles are X too. Reference rows
// (centres, bank) may come in another 16/32-bit dtype: they are read through read_as<X>, i.e.
// rounded to X (docs/design.md §3).
//
// The epilogues give one warp to one (part, row, slice) of a chunk: the warp loads the slice's
// kw ≤ kSliceMax raw dots of its row with 16-byte vector loads (kVecs vectors of 4 per lane,
// kept in registers), so it knows the slice's maximum before it writes the slice's gradient
// tile, and it folds the slice into the running state of split k (one sweep per slice
// position, merged in a fixed order after the sweep). Per-element conditions are selects, never
// branches; the only branches are warp-uniform (the part, whether the target column lies in
// the slice, whether a vector lies in the slice). No atomics anywhere: every output element has
// one writer, and every sum has a fixed order (deterministic).
#pragma once

#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_plan.h"
#include "epilogue.h"
#include "epilogue_cuda.h"  // warp_sum, block_sum_all
#include "stats.h"

namespace unitsface {
namespace cuda_sweep {

constexpr int kWarp = 32;
constexpr int kVecs = 8;                         // 4-wide vectors per lane: 1024 columns
constexpr int kWarpCols = kWarp * 4;             // columns of one vector step of a warp
static_assert(kVecs * kWarpCols == cuda_plan::kSliceMax, "a warp holds a whole slice");
constexpr int kEpiWarps = 4;                     // warps per epilogue block
constexpr int kRowThreads = cuda_epi::kThreads; // threads of the per-row kernels

// The running state of the forward sweep: rows r of a [kStateRows, ns, B] tensor in the
// accumulation dtype, entry (r, split k, row i) at (r·ns + k)·B + i. The forward with the
// per-row gradients (row_grads) uses all rows, the plain forward rows kM..kZt and kU0..kU3.
enum StateRow : int {
  kM = 0,       // softmax: running max of the logits
  kS = 1,       //          Σ e^{z − m}
  kZt = 2,      //          the target logit z_iy (one split holds it, the others 0)
  kTRaw = 3,    //          the target's raw cosine          (row_grads)
  kTKappa = 4,  //          κ_t = ∂(z_iy/s)/∂cos             (row_grads)
  kHw = 5,      //          Σ e^{z − m}·κ·cos, relative to m (row_grads)
  kU0 = 6,      // USS: pairs: Σ softplus in kU0 | lse: m⁺, s⁺, m⁻, s⁻ in kU0..kU3
  kUh = 10,     //      pairs: Σ g·cos | lse: Σ_N e^{z⁻ − m⁻}·cos, relative to m⁻ (row_grads)
  kUg = 11,     //      pairs: Σ g                                           (row_grads)
  kUcp = 12,    //      lse: the cosine of the positive                      (row_grads)
  kStateRows = 13,
};

// The backward's per-split row sums: [kBwdRows, ns, B].
enum BwdRow : int {
  kHW = 0,  // Σ_c g_ic·cos_ic of the softmax part
  kHB = 1,  // Σ_j g_ij·cos_ij of the bank part
  kGB = 2,  // Σ_j g_ij of the bank part (a scalar threshold's ∂b)
  kBwdRows = 3,
};

// The storage dtype of a table read through read_as / written through write_as.
enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

template <typename X>
__device__ __forceinline__ X read_as(const void* p, DType t, int64_t k) {
  switch (t) {
    case DType::kHalf:
      return static_cast<X>(static_cast<float>(static_cast<const c10::Half*>(p)[k]));
    case DType::kBFloat16:
      return static_cast<X>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[k]));
    case DType::kDouble:
      return static_cast<X>(static_cast<const double*>(p)[k]);
    default:
      return static_cast<X>(static_cast<const float*>(p)[k]);
  }
}

template <typename T>
__device__ __forceinline__ void write_as(void* p, DType t, int64_t k, T v) {
  switch (t) {
    case DType::kHalf:
      static_cast<c10::Half*>(p)[k] = static_cast<c10::Half>(static_cast<float>(v));
      return;
    case DType::kBFloat16:
      static_cast<c10::BFloat16*>(p)[k] = static_cast<c10::BFloat16>(static_cast<float>(v));
      return;
    case DType::kDouble:
      static_cast<double*>(p)[k] = static_cast<double>(v);
      return;
    default:
      static_cast<float*>(p)[k] = static_cast<float>(v);
  }
}

// ------------------------------------------------------------------------ warp helpers
using cuda_epi::warp_sum;

// The maximum with the CPU loops' comparison (a NaN operand never wins: a NaN logit reaches the
// sums instead, where it propagates).
template <typename T>
__device__ __forceinline__ T max_keep(T a, T b) {
  return b > a ? b : a;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_keep<T>(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Four consecutive values (16-byte aligned for float, 32 for double) as T.
template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&out)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
  }
}

// Four values stored as X in one vector store (8 bytes for 16-bit X).
template <typename X, typename T>
__device__ __forceinline__ void store4(X* p, const T (&v)[4]) {
  struct alignas(4 * sizeof(X)) Pack {
    X e[4];
  };
  Pack pk;
#pragma unroll
  for (int e = 0; e < 4; ++e) pk.e[e] = static_cast<X>(v[e]);
  *reinterpret_cast<Pack*>(p) = pk;
}

// ------------------------------------------------------------------------ column set-up
// Per call: norms of x's rows, of the W rows of S and of the bank rows of S (read rounded to
// X, an invalid bank row read as a zero row), or those norms from the forward (`have_norms`,
// the backward); then the padded per-column arrays of the epilogues (inverse norms, validity,
// thresholds) and each row's target column (the column of y_i in S, −1 when y_i is not there).
template <typename T>
struct ColumnArgs {
  const void* x;        // B × D, dtype X
  const void* centres;  // C × D
  DType wt;
  const void* bank;     // C × D or null
  DType bt;
  const int64_t* index;     // S classes, or null (all C)
  const bool* bank_valid;   // C or null
  const T* bias;            // 1 or C values, or null (no bank)
  bool vector_bias;
  const int64_t* labels;    // B
  int64_t B, S, C, D;
  bool have_norms;          // nx, nw, nb hold the forward's norms: read, not computed
  T eps;                    // the normalisation eps (the options')
  T *nx, *nw, *nb;          // B, S, S (nb null without a bank)
  T *inv_x, *inv_w, *inv_b, *vb, *cb;  // B, then padded per-column arrays (inv_b.. null)
  int64_t* target;          // B
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_columns_kernel(ColumnArgs<T> a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kRowThreads / kWarp);
  const int64_t tasks = a.B + a.S * (a.bank != nullptr ? 2 : 1);
  for (int64_t task = int64_t(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp;
       task < tasks; task += warps) {
    if (task < a.B) {  // a row of x
      const int64_t i = task;
      T norm;
      if (a.have_norms) {
        norm = a.nx[i];
      } else {
        T ss = 0;
        for (int64_t d = lane; d < a.D; d += kWarp) {
          const T v = static_cast<T>(static_cast<const X*>(a.x)[i * a.D + d]);
          ss += v * v;
        }
        norm = std::sqrt(warp_sum<T>(ss));
      }
      if (lane == 0) {
        if (!a.have_norms) a.nx[i] = norm;
        a.inv_x[i] = epi::inv_norm<T>(norm, a.eps);
        const int64_t y = a.labels[i];
        int64_t t = -1;
        if (a.index == nullptr) {
          t = (y >= 0 && y < a.C) ? y : -1;
        } else {  // the first column whose class is ≥ y (the index is sorted)
          int64_t lo = 0, hi = a.S;
          while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (a.index[mid] < y) {
              lo = mid + 1;
            } else {
              hi = mid;
            }
          }
          t = (lo < a.S && a.index[lo] == y) ? lo : -1;
        }
        a.target[i] = t;
      }
      continue;
    }
    const bool is_bank = task >= a.B + a.S;
    const int64_t j = task - a.B - (is_bank ? a.S : 0);
    const int64_t row = a.index != nullptr ? a.index[j] : j;
    const bool valid = !is_bank || a.bank_valid == nullptr || a.bank_valid[row];
    T norm;
    if (a.have_norms) {
      norm = is_bank ? a.nb[j] : a.nw[j];
    } else {
      const void* table = is_bank ? a.bank : a.centres;
      const DType dt = is_bank ? a.bt : a.wt;
      T ss = 0;
      if (valid) {  // (the same for every lane)
        for (int64_t d = lane; d < a.D; d += kWarp) {
          const T v = static_cast<T>(read_as<X>(table, dt, row * a.D + d));
          ss += v * v;
        }
      }
      norm = std::sqrt(warp_sum<T>(ss));
    }
    if (lane != 0) continue;
    if (!is_bank) {
      if (!a.have_norms) a.nw[j] = norm;
      a.inv_w[j] = epi::inv_norm<T>(norm, a.eps);
    } else {
      if (!a.have_norms) a.nb[j] = norm;
      a.inv_b[j] = epi::inv_norm<T>(norm, a.eps);
      a.vb[j] = valid ? T(1) : T(0);
      a.cb[j] = a.bias[a.vector_bias ? row : 0];
    }
  }
}

// ------------------------------------------------------------------------ chunk staging
// Rows [j0, j0 + n) of S of the W table (part 0) and the bank (part 1) into contiguous
// n × D buffers in X: `raw` (gathered through the index, converted, invalid bank rows as zero
// rows) for the GEMMs, and/or `unit` = raw·inv (normalised rows, |entries| ≤ 1) for the ∂x
// products of fp16, whose gradient tiles do not carry the inverse norms (fp16 overflows where
// g·inv_r would be stored for a row below the eps).
template <typename T>
struct StageArgs {
  const void* table[2];
  DType dt[2];
  const bool* bank_valid;   // part 1 only, or null
  const int64_t* index;     // or null
  const T* inv[2];          // padded per-column inverse norms (for `unit`)
  void* raw[2];             // n × D in X, or null (part not staged raw)
  void* unit[2];            // n × D in X, or null
  int64_t j0, n, D;
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_stage_kernel(StageArgs<T> a) {
  const int lane = threadIdx.x % kWarp;
  const int part = blockIdx.y;
  // (selects, not a[part]: a run-time index into the parameter arrays would copy them to the
  // stack)
  X* raw = static_cast<X*>(part == 0 ? a.raw[0] : a.raw[1]);
  X* unit = static_cast<X*>(part == 0 ? a.unit[0] : a.unit[1]);
  const void* table = part == 0 ? a.table[0] : a.table[1];
  const DType dt = part == 0 ? a.dt[0] : a.dt[1];
  const T* invs = part == 0 ? a.inv[0] : a.inv[1];
  if (raw == nullptr && unit == nullptr) return;
  const int64_t warps = int64_t(gridDim.x) * (kRowThreads / kWarp);
  for (int64_t r = int64_t(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp; r < a.n;
       r += warps) {
    const int64_t j = a.j0 + r;
    const int64_t row = a.index != nullptr ? a.index[j] : j;
    const bool valid = part == 0 || a.bank_valid == nullptr || a.bank_valid[row];
    const T inv = invs != nullptr ? invs[j] : T(1);
    for (int64_t d = lane; d < a.D; d += kWarp) {
      const X v = valid ? read_as<X>(table, dt, row * a.D + d) : X(0);
      if (raw != nullptr) raw[r * a.D + d] = v;
      if (unit != nullptr) unit[r * a.D + d] = static_cast<X>(static_cast<T>(v) * inv);
    }
  }
}

// ------------------------------------------------------------------------ epilogues
// One chunk: columns [col0, col0 + n) of S, slices of kw columns; dots and tiles are
// [parts][B][ld] (part 1: the bank), per-column arrays indexed by the global column.
template <typename T, typename X>
struct ChunkArgs {
  const T* dots;
  X* tiles;                 // gradient tiles (row_grads forward, backward), or null
  int64_t ld, part_stride;  // row stride (the plan's c) and B·ld
  int64_t B, D, n, col0, kw, ns;
  bool first;               // the sweep's first chunk: the running state starts here
  bool fold_inv;            // tiles carry the inverse norm of their column (not fp16)
  const T* inv_x;
  const int64_t* target;
  const T *inv_w, *inv_b, *vb, *cb;
  epi::SoftmaxParams<T> sp;
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

// Forward, softmax part (docs/design.md §1.2): the slice folded into split k's running
// (max, Σ e^{z − m}) and target logit. With Grads (row_grads) also the weights of the ∂x
// product, e^{z − m_new}·κ_c (·inv_w_c), written to the tile, the running Σ e^{z − m}·κ·cos,
// the target's raw cosine and κ_t, and the lazy rescale of the accumulator row
// (csrc/unitsface_row_grads.h has the maths; this is its per-split form).
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void softmax_fwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T scale = a.sp.scale;
  const T* drow = a.dots + s.i * a.ld + s.base;
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
  X* trow = Grads ? a.tiles + s.i * a.ld + s.base : nullptr;
  // the target column's weight e^{z_t − m}·κ_t (·inv_w), placed by a select below
  const T gt = (Grads && s.tl >= 0)
                   ? epi::uf_exp<T>(zt - m_new) * kappa_t * (a.fold_inv ? inv[s.tl] : T(1))
                   : T(0);
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
        const bool use = other & (raw[v][e] >= T(-1)) & (raw[v][e] <= T(1));
        hw += use ? ee * raw[v][e] : T(0);
        g[e] = use ? ee * (a.fold_inv ? w[e] : T(1)) : T(0);
      }
    }
    if (Grads) {
#pragma unroll
      for (int e = 0; e < 4; ++e) g[e] = col_of(s.lane, v, e) == s.tl ? gt : g[e];
      store4<X, T>(trow + v * kWarpCols + s.lane * 4, g);
    }
  }
  se = warp_sum<T>(se);
  if (Grads) hw = warp_sum<T>(hw);
  const T alpha = epi::uf_exp<T>(m_old - m_new);
  if (s.tl >= 0) {
    const T et = epi::uf_exp<T>(zt - m_new);
    se += et;
    if (Grads) hw += et * kappa_t * raw_t;
  }
  if (s.lane == 0) {
    const T s_old = a.first ? T(0) : state_at(st, kS, s, a.ns, a.B);
    const T zt_old = a.first ? T(0) : state_at(st, kZt, s, a.ns, a.B);
    state_at(st, kM, s, a.ns, a.B) = m_new;
    state_at(st, kS, s, a.ns, a.B) = s_old * alpha + se;
    state_at(st, kZt, s, a.ns, a.B) = zt_old + (s.tl >= 0 ? zt : T(0));
    if (Grads) {
      const T hw_old = a.first ? T(0) : state_at(st, kHw, s, a.ns, a.B);
      state_at(st, kHw, s, a.ns, a.B) = hw_old * alpha + hw;
      if (s.tl >= 0 || a.first) {
        state_at(st, kTRaw, s, a.ns, a.B) = raw_t;
        state_at(st, kTKappa, s, a.ns, a.B) = kappa_t;
      }
    }
  }
  // (read by the lanes above before lane 0 overwrote them: the reads of m_old come first in
  // every lane, and lane 0's writes follow its own reads; no other warp touches this entry)
  if (Grads && !a.first && alpha != T(1)) rescale_row<T>(a.acc_w, s, a.B, a.D, alpha);
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
  load4<T>(a.dots + a.part_stride + s.i * a.ld + s.base + off, q.d);
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

// Forward, bank part (USS, docs/design.md §1.1, column labels = the classes of S: the positive
// of row i is its target column, when that bank row is valid). Pairs: Σ softplus; lse: running
// (max, Σ e^{z − max}) of P and N. With Grads: the ∂x weights in the tile — pairs: λ·∂ℓ/∂cos
// (final at once); lse: e^{z⁻ − m⁻_new} on N (its factor λ·s·σB'/s⁻ at the end) — and the row
// sums of csrc/unitsface_row_grads.h, per split.
template <typename T, typename X, bool Grads>
__device__ __forceinline__ void uss_fwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T neg_big = static_cast<T>(epi::kNegBig);
  const int64_t c0 = a.col0 + s.base;
  const T ix = a.inv_x[s.i];
  X* trow = Grads ? a.tiles + a.part_stride + s.i * a.ld + s.base : nullptr;
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

// grid (⌈B / kEpiWarps⌉, slices of the chunk, parts), kEpiWarps warps per block
template <typename T, typename X, bool Grads>
__global__ void __launch_bounds__(kEpiWarps* kWarp) uf_fwd_epilogue(ChunkArgs<T, X> a) {
  const int64_t i = int64_t(blockIdx.x) * kEpiWarps + threadIdx.x / kWarp;
  if (i >= a.B) return;  // a whole warp: no barrier below
  const Slice s = slice_of(a, i);
  if (blockIdx.z == 0) {
    softmax_fwd_warp<T, X, Grads>(a, s);
  } else {
    uss_fwd_warp<T, X, Grads>(a, s);
  }
}

// Backward: g_ij = go_i·∂L_i/∂cos_ij from the forward's statistics (final: no running max),
// written to the tile (·inv_r when fold_inv); per split the row sums Σ g·cos (∂x) and Σ g of
// the bank part (a scalar threshold's ∂b).
template <typename T, typename X>
__device__ __forceinline__ void softmax_bwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T scale = a.sp.scale;
  const T* drow = a.dots + s.i * a.ld + s.base;
  const T* inv = a.inv_w + a.col0 + s.base;
  const T ix = a.inv_x[s.i], go = a.go[s.i], lse = a.stats[stats::kLse * a.B + s.i];
  T raw_t = 0, gt = 0;
  if (s.tl >= 0) {
    raw_t = drow[s.tl] * ix * inv[s.tl];
    const T zt = epi::softmax_z<T>(raw_t, true, a.sp);
    gt = epi::softmax_grad<T>(raw_t, zt, true, lse, a.sp) * go;
  }
  X* trow = a.tiles + s.i * a.ld + s.base;
  T h = 0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (v * kWarpCols >= a.kw) break;
    T d[4], w[4], g[4];
    const int64_t off = v * kWarpCols + s.lane * 4;
    load4<T>(drow + off, d);
    load4<T>(inv + off, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = col_of(s.lane, v, e);
      const bool other = (jj < s.width) & (jj != s.tl);
      const T raw = d[e] * ix * w[e];
      const T zz = scale * epi::clamp_unit<T>(raw);
      const T gg = other ? epi::softmax_grad_other<T>(raw, zz, lse, scale) * go : T(0);
      h += other ? gg * raw : T(0);  // (selects: a masked column's values may be garbage)
      g[e] = other ? gg * (a.fold_inv ? w[e] : T(1)) : T(0);
      g[e] = jj == s.tl ? gt * (a.fold_inv ? w[e] : T(1)) : g[e];
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

template <typename T, typename X>
__device__ __forceinline__ void uss_bwd_warp(const ChunkArgs<T, X>& a, const Slice& s) {
  const T ix = a.inv_x[s.i], go = a.go[s.i] * a.weight;
  const int64_t B = a.B;
  const T* us = a.stats + stats::kUss * B;  // the USS block
  const T sa = us[stats::kA * B + s.i], fa = us[stats::kSigmaA * B + s.i];
  const T sb = us[stats::kB * B + s.i], fb = us[stats::kSigmaB * B + s.i];
  X* trow = a.tiles + a.part_stride + s.i * a.ld + s.base;
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

// grid (⌈B / kEpiWarps⌉, slices, 2): z = 0 the softmax part (skipped unless do_w), 1 the bank
template <typename T, typename X>
__global__ void __launch_bounds__(kEpiWarps* kWarp)
    uf_bwd_epilogue(ChunkArgs<T, X> a, bool do_w, bool do_b) {
  const int64_t i = int64_t(blockIdx.x) * kEpiWarps + threadIdx.x / kWarp;
  if (i >= a.B) return;
  const Slice s = slice_of(a, i);
  if (blockIdx.z == 0) {
    if (do_w) softmax_bwd_warp<T, X>(a, s);
  } else {
    if (do_b) uss_bwd_warp<T, X>(a, s);
  }
}

// ------------------------------------------------------------------------ ∂W projection
// Rows j0 .. j0 + n of the compact ∂centres from Q = tileᵀ·x̂ (docs/design.md §2): one warp
// per row j, ∂W_j = f·(Q_j − [‖w_j‖ ≥ eps]·inv_j²·(Q_j·w_j)·w_j), f = 1 when the tile carried
// inv_j (Q_j is then already scaled by it), else inv_j; w_j read rounded to X.
template <typename T>
struct ProjectArgs {
  const T* q;             // n × D
  const void* centres;
  DType wt;
  const int64_t* index;   // or null
  const T* nw;            // S: the norms
  const T* inv_w;         // padded
  void* out;              // S × D compact rows, the centres' dtype
  DType ot;
  int64_t j0, n, D;
  bool fold_inv;
  T eps;                  // the normalisation eps
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_project_kernel(ProjectArgs<T> a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kRowThreads / kWarp);
  for (int64_t r = int64_t(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp; r < a.n;
       r += warps) {
    const int64_t j = a.j0 + r;
    const int64_t row = a.index != nullptr ? a.index[j] : j;
    const T* q = a.q + r * a.D;
    T h = 0;
    for (int64_t d = lane; d < a.D; d += kWarp) {
      h += q[d] * static_cast<T>(read_as<X>(a.centres, a.wt, row * a.D + d));
    }
    h = warp_sum<T>(h);
    const T inv = a.inv_w[j];
    const T coef = a.nw[j] >= a.eps ? h * inv * inv : T(0);
    const T f = a.fold_inv ? T(1) : inv;
    for (int64_t d = lane; d < a.D; d += kWarp) {
      const T w = static_cast<T>(read_as<X>(a.centres, a.wt, row * a.D + d));
      write_as<T>(a.out, a.ot, j * a.D + d, f * (q[d] - coef * w));
    }
  }
}

// ------------------------------------------------------------------------ finishes
// ∂L/∂x_i = inv_x·G − [‖x_i‖ ≥ eps]·h·inv_x²·x_i (chunking::normalised_grad), element d
template <typename T>
__device__ __forceinline__ T normalised_grad(T G, T h, T x, T nx, T inv_x, T eps) {
  const T proj = nx >= eps ? h * inv_x : T(0);
  return inv_x * (G - proj * x);
}

template <typename T>
struct FinishArgs {
  int64_t B, D, ns, C;
  const T* state;           // forward: [kStateRows, ns, B]
  const T *acc_w, *acc_b;   // forward (row_grads): [ns, B, D]; acc_b null without a bank
  bool has_bank, grads;
  epi::UssParams<T> up;
  T scale, weight, eps;     // s, λ, the normalisation eps
  const void* x;            // B × D in X
  const T *nx, *inv_x;
  const int64_t *labels, *target;
  const void* centres;      // for the target row w_y (row_grads)
  DType wt;
  const void* bank;         // for the positive's bank row b_y (row_grads, lse)
  DType bt;
  const bool* bank_valid;
  const T *inv_w, *inv_b;   // padded per-column arrays
  T *rows, *stats;          // outputs: [B], [stats::kUnitsfaceRows, B]
  T *dx_rows, *db_rows;     // outputs (row_grads)
};

// One block per row: the splits merged in order k = 0, 1, ... (deterministic), the per-row
// loss and statistics of the contract, and with row_grads ∂L_i/∂x_i and ∂L_i/∂b
// (csrc/unitsface_row_grads.cpp's RowGrads::finish, per row).
template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_fwd_finish(FinishArgs<T> a) {
  const int64_t i = blockIdx.x, B = a.B, ns = a.ns;
  auto st = [&](int r, int64_t k) { return a.state[(int64_t(r) * ns + k) * B + i]; };
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T inf = std::numeric_limits<T>::infinity();
  // softmax: (max, Σ) merged, the target logit
  T m = neg_big;
  for (int64_t k = 0; k < ns; ++k) m = max_keep<T>(m, st(kM, k));
  T S = 0, zt = 0, hw = 0, traw = 0, tkappa = 0;
  for (int64_t k = 0; k < ns; ++k) {
    const T f = epi::uf_exp<T>(st(kM, k) - m);
    S += f * st(kS, k);
    zt += st(kZt, k);
    if (a.grads) {
      hw += f * st(kHw, k);
      traw += st(kTRaw, k);
      tkappa += st(kTKappa, k);
    }
  }
  const T lse = S == T(0) ? -inf : m + std::log(S);
  // USS
  T uss = 0, A = -inf, sigA = 0, Bs = -inf, sigB = 0, mn = neg_big, sn = 0;
  T uh = 0, ug = 0, ucp = 0;
  if (a.has_bank) {
    if (!a.up.lse) {
      for (int64_t k = 0; k < ns; ++k) {
        uss += st(kU0, k);
        if (a.grads) {
          uh += st(kUh, k);
          ug += st(kUg, k);
        }
      }
    } else {
      T mp = neg_big, sp = 0;
      for (int64_t k = 0; k < ns; ++k) {
        mp = max_keep<T>(mp, st(kU0, k));
        mn = max_keep<T>(mn, st(kU0 + 2, k));
      }
      for (int64_t k = 0; k < ns; ++k) {
        sp += epi::uf_exp<T>(st(kU0, k) - mp) * st(kU0 + 1, k);
        const T fn = epi::uf_exp<T>(st(kU0 + 2, k) - mn);
        sn += fn * st(kU0 + 3, k);
        if (a.grads) {
          uh += fn * st(kUh, k);
          ucp += st(kUcp, k);
        }
      }
      A = sp == T(0) ? -inf : mp + std::log(sp);
      Bs = sn == T(0) ? -inf : mn + std::log(sn);
      // chunking::uss_lse_rows: softplus of each statistic (the official clamp first), σ where
      // the statistic is not empty and not clamped
      const T sc = a.up.scale;
      const T stat[2] = {A, Bs};
      T sig[2];
      for (int q = 0; q < 2; ++q) {
        const T x = stat[q];
        const bool empty = x == -inf;
        const T arg = a.up.clamp ? epi::clamp_sym<T>(x, sc) : x;
        uss += empty ? T(0) : epi::softplus<T>(arg);
        const bool inside = a.up.clamp ? !((x < -sc) | (x > sc)) : !empty;
        sig[q] = inside ? epi::sigmoid<T>(x) : T(0);
      }
      sigA = sig[0];
      sigB = sig[1];
    }
  }
  if (threadIdx.x == 0) {
    const bool lse_stats = a.has_bank && a.up.lse;
    T* us = a.stats + stats::kUss * B;  // the USS block
    a.stats[stats::kLse * B + i] = lse;
    us[stats::kA * B + i] = lse_stats ? A : T(0);
    us[stats::kSigmaA * B + i] = lse_stats ? sigA : T(0);
    us[stats::kB * B + i] = lse_stats ? Bs : T(0);
    us[stats::kSigmaB * B + i] = lse_stats ? sigB : T(0);
    a.stats[stats::kTargetLogit * B + i] = zt;
    a.stats[stats::kUssLoss * B + i] = a.has_bank ? uss : T(0);
    a.rows[i] = lse - zt + (a.has_bank ? a.weight * uss : T(0));
  }
  if (!a.grads) return;
  // ∂L_i/∂x_i: softmax: (s/S)·Σ_k f_k·acc_w[k] − s·κ_t·ŵ_t; USS pairs: + Σ_k acc_b[k];
  // USS lse: + c_n·Σ_k f⁻_k·acc_b[k] − λ·s·σA'·b̂_t
  const T s = a.scale, lam = a.weight;
  const int64_t t = a.target[i];
  const bool has_t = t >= 0;
  const int64_t tcol = has_t ? t : 0;
  int64_t y = a.labels[i];
  y = y < 0 ? 0 : (y >= a.C ? a.C - 1 : y);
  const T p_norm = s / S;
  const T coef_t = has_t ? -s * tkappa : T(0);
  const T wt_coef = coef_t * a.inv_w[tcol];
  T h = hw * p_norm + coef_t * traw;
  T gsum = 0, c_n = 0, g_p = 0, bt_coef = 0;
  if (a.has_bank) {
    if (!a.up.lse) {
      h += uh;
      gsum = ug;
    } else {
      c_n = sn > T(0) ? lam * s * sigB / sn : T(0);
      g_p = -lam * s * sigA;
      h += c_n * uh + g_p * ucp;
      gsum = lam * s * sigB + g_p;
      const bool bt_valid = a.bank_valid == nullptr || a.bank_valid[y];
      bt_coef = bt_valid ? g_p * a.inv_b[tcol] : T(0);
    }
  }
  // the splits' factors again (cheap: ns scalars per thread, L1 hits)
  for (int64_t d = threadIdx.x; d < a.D; d += kRowThreads) {
    T gw = 0, gb = 0;
    for (int64_t k = 0; k < ns; ++k) {
      gw += epi::uf_exp<T>(st(kM, k) - m) * a.acc_w[(k * B + i) * a.D + d];
      if (a.has_bank) {
        const T fb = a.up.lse ? epi::uf_exp<T>(st(kU0 + 2, k) - mn) : T(1);
        gb += fb * a.acc_b[(k * B + i) * a.D + d];
      }
    }
    T G = gw * p_norm;
    if (has_t) G += wt_coef * static_cast<T>(read_as<X>(a.centres, a.wt, y * a.D + d));
    if (a.has_bank) {
      G += (a.up.lse ? c_n : T(1)) * gb;
      if (a.up.lse && bt_coef != T(0)) {
        G += bt_coef * static_cast<T>(read_as<X>(a.bank, a.bt, y * a.D + d));
      }
    }
    const T xd = static_cast<T>(static_cast<const X*>(a.x)[i * a.D + d]);
    a.dx_rows[i * a.D + d] = normalised_grad<T>(G, h, xd, a.nx[i], a.inv_x[i], a.eps);
  }
  if (threadIdx.x == 0) a.db_rows[i] = gsum * (T(-1) / s);
}

// The backward's per-row work outside the sweep. Blocks 0..B−1: row i — x̂_i in X for the ∂W
// product (xh, when asked), ∂x_i from the forward's per-row gradients (row_grads: dx =
// go·dx_rows) or from the sweep's accumulators (plain: dx = normalised_grad(Σ_k acc[k], Σ h)).
// Block B: a scalar threshold's ∂b, summed over the rows in a fixed order.
template <typename T>
struct RowsArgs {
  int64_t B, D, ns;
  const void* x;
  const T *nx, *inv_x, *go;
  void* xh;                 // B × D in X, or null
  const T* dx_rows;         // row_grads: B × D, or null
  const T* db_rows;         // row_grads: B, or null
  const T* acc;             // plain: [ns, B, D], or null
  const T* hs;              // plain: [kBwdRows, ns, B], or null
  bool hb;                  // plain: the bank part was swept (hs's bank rows are written)
  void* dx;                 // B × D in dx_t, or null
  DType dx_t;
  void* db;                 // 1 value in db_t (a scalar threshold), or null
  DType db_t;
  T db_scale;               // −1/s
  T eps;                    // the normalisation eps
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_rows_kernel(RowsArgs<T> a) {
  const int64_t i = blockIdx.x, B = a.B;
  if (i == B) {  // ∂b of a scalar threshold (this block exists only when db is asked for)
    T v = 0;
    for (int64_t r = threadIdx.x; r < B; r += kRowThreads) {
      if (a.db_rows != nullptr) {
        v += a.db_rows[r] * a.go[r];
      } else {
        T g = 0;
        for (int64_t k = 0; k < a.ns; ++k) g += a.hs[(int64_t(kGB) * a.ns + k) * B + r];
        v += g * a.db_scale;
      }
    }
    v = cuda_epi::block_sum_all<T>(v);
    if (threadIdx.x == 0) write_as<T>(a.db, a.db_t, 0, v);
    return;
  }
  const X* xr = static_cast<const X*>(a.x) + i * a.D;
  T h = 0;
  if (a.dx != nullptr && a.dx_rows == nullptr) {
    for (int64_t k = 0; k < a.ns; ++k) {
      h += a.hs[(int64_t(kHW) * a.ns + k) * B + i];
      if (a.hb) h += a.hs[(int64_t(kHB) * a.ns + k) * B + i];
    }
  }
  for (int64_t d = threadIdx.x; d < a.D; d += kRowThreads) {
    const T xd = static_cast<T>(xr[d]);
    if (a.xh != nullptr) static_cast<X*>(a.xh)[i * a.D + d] = static_cast<X>(xd * a.inv_x[i]);
    if (a.dx == nullptr) continue;
    T v;
    if (a.dx_rows != nullptr) {
      v = a.dx_rows[i * a.D + d] * a.go[i];
    } else {
      T G = 0;
      for (int64_t k = 0; k < a.ns; ++k) G += a.acc[(k * B + i) * a.D + d];
      v = normalised_grad<T>(G, h, xd, a.nx[i], a.inv_x[i], a.eps);
    }
    write_as<T>(a.dx, a.dx_t, i * a.D + d, v);
  }
}

}  // namespace cuda_sweep
}  // namespace unitsface
