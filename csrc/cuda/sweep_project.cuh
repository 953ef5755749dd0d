// The ∂W projection of the unitsface CUDA sweep's backward (after each chunk's Q = tileᵀ·x̂).
#pragma once

#include "cuda/sweep_common.cuh"

namespace unitsface {
namespace cuda_sweep {

// ------------------------------------------------------------------------ ∂W projection
// Rows j0 .. j0 + n of the compact ∂centres (rows of S·K: j = column·K + r) from Q = tileᵀ·x̂
// (docs/design.md §2): one warp per row j, ∂W_j = f·(Q_j − [‖w_j‖ ≥ eps]·inv_j²·(Q_j·w_j)·w_j),
// f = 1 when the tile carried inv_j (Q_j is then already scaled by it), else inv_j; w_j read
// rounded to X.
template <typename T>
struct ProjectArgs {
  const T* q;             // n × D
  const void* centres;
  DType wt;
  const int64_t* index;   // or null
  int64_t k;              // K sub-centres per class: row j is centres row index[j / K]·K + j % K
  const T* nw;            // S·K: the norms
  const T* inv_w;         // padded
  void* out;              // S·K × D compact rows, the centres' dtype
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
    const int64_t jc = j / a.k;
    const int64_t row = (a.index != nullptr ? a.index[jc] : jc) * a.k + (j - jc * a.k);
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

}  // namespace cuda_sweep
}  // namespace unitsface
