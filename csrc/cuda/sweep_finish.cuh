// The finishes of the unitsface CUDA sweep: the splits merged in a fixed order into the
// contract's rows and statistics (forward, with row_grads the per-row gradients), and the
// backward's per-row work outside the sweep (x̂, ∂x, a scalar threshold's ∂b).
#pragma once

#include "cuda/block_reduce.cuh"
#include "cuda/sweep_common.cuh"

namespace unitsface {
namespace cuda_sweep {

// ------------------------------------------------------------------------ finishes
// ∂L/∂x_i = inv_x·G − [‖x_i‖ ≥ eps]·h·inv_x²·x_i (chunking::normalised_grad), element d
template <typename T>
__device__ __forceinline__ T normalised_grad(T G, T h, T x, T nx, T inv_x, T eps) {
  const T proj = nx >= eps ? h * inv_x : T(0);
  return inv_x * (G - proj * x);
}

template <typename T>
struct FinishArgs {
  int64_t B, D, ns, C, K;  // C classes, K sub-centres each
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
  const T *inv_w, *inv_b;   // padded per-column arrays (inv_w: per sub-centre row)
  T *rows, *stats;          // outputs: [B], [stats::kUnitsfaceRows, B]
  T *dx_rows, *db_rows;     // outputs (row_grads)
};

// One block per row: the splits merged in order k = 0, 1, ... (deterministic), the per-row
// loss and statistics of the contract, and with row_grads ∂L_i/∂x_i and ∂L_i/∂b
// (csrc/cpu/unitsface_row_grads.cpp's RowGrads::finish, per row).
template <typename T, typename X>
__global__ void __launch_bounds__(kRowThreads) uf_fwd_finish(FinishArgs<T> a) {
  const int64_t i = blockIdx.x, B = a.B, ns = a.ns;
  auto st = [&](int r, int64_t k) { return a.state[(int64_t(r) * ns + k) * B + i]; };
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T inf = std::numeric_limits<T>::infinity();
  // softmax: (max, Σ) merged, the target logit
  T m = neg_big;
  for (int64_t k = 0; k < ns; ++k) m = max_keep<T>(m, st(kM, k));
  T S = 0, zt = 0, hw = 0, traw = 0, tkappa = 0, targ = 0, so = 0;
  for (int64_t k = 0; k < ns; ++k) {
    const T f = epi::uf_exp<T>(st(kM, k) - m);
    S += f * st(kS, k);
    zt += st(kZt, k);
    if (a.grads) {
      hw += f * st(kHw, k);
      so += f * st(kSo, k);
      traw += st(kTRaw, k);
      tkappa += st(kTKappa, k);
      if (a.K > 1) targ += st(kTArg, k);
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
  // ∂L_i/∂x_i: softmax: (s/S)·Σ_k f_k·acc_w[k] (the other columns) + s·(p_t − 1)·κ_t·ŵ_t
  // with p_t − 1 = −So/S (no cancellation when p_t ≈ 1); USS pairs: + Σ_k acc_b[k];
  // USS lse: + c_n·Σ_k f⁻_k·acc_b[k] − λ·s·σA'·b̂_t
  const T s = a.scale, lam = a.weight;
  const int64_t t = a.target[i];
  const bool has_t = t >= 0;
  const int64_t tcol = has_t ? t : 0;
  int64_t y = a.labels[i];
  y = y < 0 ? 0 : (y >= a.C ? a.C - 1 : y);
  const T p_norm = s / S;
  const T coef_t = has_t ? -tkappa * so * p_norm : T(0);
  // the target class's arg-max sub-centre row (K > 1)
  const int64_t t_sub = static_cast<int64_t>(targ);
  const T wt_coef = coef_t * a.inv_w[tcol * a.K + t_sub];
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
    if (has_t) {
      G += wt_coef * static_cast<T>(read_as<X>(a.centres, a.wt, (y * a.K + t_sub) * a.D + d));
    }
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
