// The kernels of the unitsface family's CUDA sweep (the driver: csrc/cuda/unitsface_sweep.cu; the
// chunk and slice plan: csrc/cuda_plan.h), one file per phase: set-up (norms, column arrays,
// chunk staging: sweep_setup.cuh), the forward epilogue (sweep_forward.cuh), the backward
// epilogue (sweep_backward.cuh), the margin family's epilogues and sub-centre kernels
// (sweep_family.cuh), the ∂W projection (sweep_project.cuh) and the finishes that
// merge the splits (sweep_finish.cuh); this file holds what they share. The per-element maths
// is csrc/epilogue.h, the same functions the CPU row loops call.
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

#include "cuda/block_reduce.cuh"  // warp_sum, block_sum_all
#include "cuda_plan.h"
#include "epilogue.h"
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
  kTArg = 13,   // softmax, K > 1: the target's arg-max sub-centre r          (row_grads)
  kSo = 14,     // softmax: Σ_{c ≠ y} e^{z − m}, relative to m (row_grads): 1 − p_y = So/S
  kStateRows = 15,
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

}  // namespace cuda_sweep
}  // namespace unitsface
