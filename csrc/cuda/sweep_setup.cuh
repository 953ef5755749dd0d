// The set-up phase of the unitsface CUDA sweep (csrc/cuda/sweep_common.cuh): per call the
// norms and the padded per-column arrays, per chunk the staging of rows that cannot be read in
// place.
#pragma once

#include "cuda/sweep_common.cuh"

namespace unitsface {
namespace cuda_sweep {

// ------------------------------------------------------------------------ column set-up
// Per call: norms of x's rows, of the S·K W rows of S (K sub-centres per class, row
// index[j]·K + r) and of the bank rows of S (read rounded to
// X, an invalid bank row read as a zero row), or those norms from the forward (`have_norms`,
// the backward); then the padded per-column arrays of the epilogues (inverse norms, validity,
// thresholds) and each row's target column (the column of y_i in S, −1 when y_i is not there).
template <typename T>
struct ColumnArgs {
  const void* x;        // B × D, dtype X
  const void* centres;  // C·K × D
  DType wt;
  const void* bank;     // C × D or null
  DType bt;
  const int64_t* index;     // S classes, or null (all C)
  const bool* bank_valid;   // C or null
  const T* bias;            // 1 or C values, or null (no bank)
  bool vector_bias;
  const int64_t* labels;    // B
  int64_t B, S, C, D, K;  // C classes, K sub-centres each
  bool have_norms;          // nx, nw, nb hold the forward's norms: read, not computed
  T eps;                    // the normalisation eps (the options')
  T *nx, *nw, *nb;          // B, S·K, S (nb null without a bank)
  T *inv_x, *inv_w, *inv_b, *vb, *cb;  // B, then padded per-column arrays (inv_w: per
                                       // sub-centre row; inv_b.. null)
  int64_t* target;          // B
};

template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_columns_kernel(ColumnArgs<T> a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kRowThreads / kWarp);
  const int64_t SK = a.S * a.K;
  const int64_t tasks = a.B + SK + (a.bank != nullptr ? a.S : 0);
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
    const bool is_bank = task >= a.B + SK;
    const int64_t j = task - a.B - (is_bank ? SK : 0);  // a bank column, or a W row of S
    const int64_t jc = is_bank ? j : j / a.K;            // its class's column in S
    const int64_t cls = a.index != nullptr ? a.index[jc] : jc;
    const int64_t row = is_bank ? cls : cls * a.K + (j - jc * a.K);
    const bool valid = !is_bank || a.bank_valid == nullptr || a.bank_valid[cls];
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
// Rows [j0, j0 + n) of S of the W table (part 0: their n·K sub-centre rows) and the bank (part 1)
// into contiguous n·K × D / n × D buffers in X: `raw` (gathered through the index, converted,
// invalid bank rows as zero rows) for the GEMMs, and/or `unit` = raw·inv (normalised rows,
// |entries| ≤ 1) for the ∂x products of fp16, whose gradient tiles do not carry the inverse norms
// (fp16 overflows where g·inv_r would be stored for a row below the eps).
template <typename T>
struct StageArgs {
  const void* table[2];
  DType dt[2];
  const bool* bank_valid;   // part 1 only, or null
  const int64_t* index;     // or null
  const T* inv[2];          // padded per-row inverse norms (for `unit`)
  void* raw[2];             // n·k × D in X, or null (part not staged raw)
  void* unit[2];            // n·k × D in X, or null
  int64_t j0, n, D;
  int64_t k[2];             // rows per class: K (W), 1 (bank)
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
  const int64_t K = part == 0 ? a.k[0] : a.k[1];
  if (raw == nullptr && unit == nullptr) return;
  const int64_t warps = int64_t(gridDim.x) * (kRowThreads / kWarp);
  for (int64_t r = int64_t(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp;
       r < a.n * K; r += warps) {
    const int64_t j = a.j0 + r / K;  // the class's column in S
    const int64_t cls = a.index != nullptr ? a.index[j] : j;
    const int64_t row = cls * K + r % K;
    const bool valid = part == 0 || a.bank_valid == nullptr || a.bank_valid[cls];
    const T inv = invs != nullptr ? invs[a.j0 * K + r] : T(1);
    for (int64_t d = lane; d < a.D; d += kWarp) {
      const X v = valid ? read_as<X>(table, dt, row * a.D + d) : X(0);
      if (raw != nullptr) raw[r * a.D + d] = v;
      if (unit != nullptr) unit[r * a.D + d] = static_cast<X>(static_cast<T>(v) * inv);
    }
  }
}

}  // namespace cuda_sweep
}  // namespace unitsface
